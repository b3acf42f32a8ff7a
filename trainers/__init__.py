"""Recipes and the command line: the libraries wired into jobs.

Lightning modules, data modules and recipes (``train_lora``, ``train_sparse``, ``train_full``,
``train_distill``, ``train_router``), their options (``configs``: one dataclass per recipe, from which ``options``
makes the flags, YAML keys and LightningCLI options), corpora (``trainers.corpus``: synthetic, Hugging Face, a folder of
recordings, Fish Fillets), fusion weight search (``fusion``), and ``whisper-experts`` (``trainers.cli``).
May import every other package; none imports it.
"""

from registry.faces import exports_of, lazy_face

_EXPORTS = exports_of({
    "trainers.configs": "TrainConfig SparseTrainConfig FullTrainConfig DistillConfig RouterTrainConfig",
    "trainers.train_lora": "train_lora_expert",
    "trainers.train_sparse": "train_sparse_expert",
    "trainers.train_distill": "train_distilled",
    "trainers.fusion": "fuse_for_target search_weights",
    "trainers.corpus.loading": "load_corpus",
})
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
