"""Recipes and the command line: the libraries wired into jobs.

Lightning modules, data modules and recipes (``train_lora``, ``train_sparse``, ``train_full``,
``train_distill``, ``train_router``), their options (``configs``: one dataclass per recipe, from which ``options``
makes the flags, YAML keys and LightningCLI options), corpora (``trainers.corpus``: synthetic, Hugging Face, a folder of
recordings, Fish Fillets), fusion weight search (``fusion``), and ``whisper-experts`` (``trainers.cli``).
May import every other package; none imports it.
"""

from registry.faces import exports_of, lazy_attribute

_EXPORTS = exports_of({
    "trainers.configs": "TrainConfig SparseTrainConfig FullTrainConfig DistillConfig RouterTrainConfig",
    "trainers.train_lora": "train_lora_expert",
    "trainers.train_sparse": "train_sparse_expert",
    "trainers.train_distill": "train_distilled",
    "trainers.fusion": "fuse_for_target search_weights",
    "trainers.corpus.loading": "load_corpus",
})
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    return lazy_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
