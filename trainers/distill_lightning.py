"""CLSR (+ KD) training driven by Lightning's own CLI: ``whisper-experts distill lightning fit --config X.yaml``.

The recipe of :func:`trainers.train_distill.train_distilled` for CLSR students, built from plain config values so
that :class:`~lightning.pytorch.cli.LightningCLI` can read it from YAML:

- :class:`ClsrExpertTask` (``model:``) loads the base, converts it to CLSR with a path and gate per language,
  and loads the teacher (online, or cached with ``teacher_cache``);
- :class:`ClsrCorpusDataModule` (``data:``) reads a corpus directory into one-language training batches and
  prepares the teacher source on the training rows;
- :class:`StoreBestClsrExperts` (``expert:``) keeps each language's best epoch and, when fitting ends, tests
  and stores one ``clsr`` expert per language in the registry (rank 0 only);
- ``checkpoint:`` and ``early_stopping:`` watch ``val_wer``.

The options are the fields of :class:`~trainers.configs.DistillConfig` (the flags of ``whisper-experts distill``),
placed as :func:`trainers.lightning_cli.lightning_keys` says; ``model:`` holds the rest, every CLSR field included.
Under DDP set ``trainer.strategy:
  ddp_find_unused_parameters_true`` (ranks train different languages' paths in one step).
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from lora_experts.config import LoraExpertConfig
from trainers.clsr_experts import KeepBestLanguages, clsr_experts, expert_names
from trainers.clsr_module import ClsrExpertModule
from trainers.configs import DistillConfig
from trainers.language_batches import DistillDataModule
from trainers.lightning_cli import ExpertLightningCLI, section_fields
from trainers.options import config_values, give_signature
from trainers.train_distill import encoder_cache_plan, load_teacher_source
from trainers.train_lora import load_checked_base


class ClsrExpertTask(ClsrExpertModule):
    """CLSR language paths and gates on a frozen base Whisper, built from config values.

    Its options are the fields of :class:`~trainers.configs.DistillConfig` that no other section holds (``kind`` is
    clsr), every field of :class:`~distill.clsr.ClsrConfig` among them (``path`` is its ``kind``).
    """

    def __init__(self, **options):
        cfg = DistillConfig(data="", kind="clsr", **config_values(DistillConfig, options))  # the corpus is data:'s
        loaded, _, _, _ = load_checked_base(cfg.base, cfg.languages, LoraExpertConfig())
        source = load_teacher_source(loaded, teacher=cfg.teacher, teachers=cfg.teachers, teacher_base=cfg.teacher_base,
                                     registry=cfg.registry, cache=cfg.teacher_cache, top_k=cfg.top_k)
        # As the recipe: no languages given are the teachers' (their experts name them)
        languages = list(cfg.languages) or (source.teachers.languages if source is not None else [])
        if source is not None:
            source.teachers.check_covers(languages)
        # The parent by name, not super(): see trainers.options.give_signature.
        ClsrExpertModule.__init__(self, loaded.model, loaded.processor, languages, cfg.clsr(), cfg.loss(),
                                  source, **cfg.optimization())
        # LightningCLI records the config's values as the hyperparameters, where lr may be null (the default)
        self.hparams["lr"] = cfg.learning_rate()
        self.base = loaded


give_signature(ClsrExpertTask, DistillConfig, section_fields(DistillConfig, "model", fixed=["kind"]))


class ClsrCorpusDataModule(DistillDataModule):
    """One-language training batches from a corpus directory, for the :class:`ClsrExpertTask` being trained.

    Its options are the ``data.*`` fields of :class:`~trainers.configs.DistillConfig`. The processor, the languages
    and the teacher source come from the model when the Trainer sets this up.
    """

    def __init__(self, **options):
        cfg = DistillConfig(**config_values(DistillConfig, options))
        # The parent by name, not super(): see trainers.options.give_signature.
        DistillDataModule.__init__(self, cfg.data, None, (), cfg.batch_size, max_train=cfg.max_train,
                                   max_validation=cfg.max_validation, cache_dir=cfg.cache_dir, seed=cfg.seed,
                                   progress=cfg.progress)
        self.cache_encoder = cfg.cache_encoder

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            task = self.trainer.lightning_module
            if not isinstance(task, ClsrExpertTask):
                raise TypeError(f"ClsrCorpusDataModule feeds a ClsrExpertTask, not a {type(task).__name__}")
            self.processor, self.languages, self.teacher = task.processor, list(task.languages), task.teacher
            self.base_fingerprint, self.multilingual = task.base.fingerprint, task.base.multilingual
            cache, layer = encoder_cache_plan(task.clsr_config, task.teacher)
            if self.cache_encoder and cache:
                self.encoder = task.model.model.encoder.to(self.trainer.strategy.root_device)
                self.encoder_layer = layer
        super().setup(stage)


give_signature(ClsrCorpusDataModule, DistillConfig, section_fields(DistillConfig, "data"))


class StoreBestClsrExperts(KeepBestLanguages):
    """Keeps each language's best epoch; when fitting ends, tests them and stores one ``clsr`` expert per language.

    Args:
        name: registry name: NAME for one language, NAME-<lang> for several (default <lang>-clsr[-kd]).
        registry: registry directory (default: <home>/registry).
        test: evaluate the base and each expert on the test split (the manifests' test metrics).
        test_limit: at most this many test utterances per language.
        tags: registry tags for the stored versions.
    """

    def __init__(self, name: str | None = None, registry: str | None = None, test: bool = DistillConfig.test,
                 test_limit: int | None = DistillConfig.test_limit, tags: list[str] | None = None):
        super().__init__()
        self.name, self.registry, self.test, self.test_limit, self.tags = name, registry, test, test_limit, tags or []
        self.records: list = []
        self.test_results: dict | None = None

    def setup(self, trainer, module, stage: str) -> None:
        super().setup(trainer, module, stage)
        if stage == "fit":
            expert_names(self.name, self.languages, module.teacher is not None)  # refuse a bad name before training

    def on_fit_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        from registry.store import Registry

        data = trainer.datamodule
        experts, self.test_results = clsr_experts(module, module.base, self, data, test=self.test,
                                                  test_limit=self.test_limit, batch_size=data.batch_size,
                                                  progress=data.progress)
        names = expert_names(self.name, module.languages, module.teacher is not None)
        registry = Registry(self.registry)
        for expert in experts:
            lang = expert.languages[0]
            self.records.append(registry.add(expert, names[lang], tags=self.tags))
            rank_zero_info(f"stored {self.records[-1].ref} in the registry (best epoch {self.best[lang]['epoch']}, "
                           f"validation WER {100 * self.best[lang]['wer']:.1f}%)")


class DistillLightningCLI(ExpertLightningCLI):
    """``LightningCLI`` over :class:`ClsrExpertTask` and :class:`ClsrCorpusDataModule` with the recipe's defaults:
    ``expert:`` (:class:`StoreBestClsrExperts`), best-by-``val_wer`` checkpointing and early stopping, bf16-mixed on
    CUDA, and the data module's own DDP sharding (``use_distributed_sampler`` off).

    Args:
        args: command-line arguments, e.g. ``["fit", "--config", "x.yaml"]``.
        run: run the subcommand (False: only parse and instantiate).
    """

    config_class = DistillConfig
    task_class = ClsrExpertTask
    data_class = ClsrCorpusDataModule
    expert_class = StoreBestClsrExperts
    prog = "whisper-experts distill lightning"
    description = "Train CLSR gated language experts (+ KD) with LightningCLI."
