"""CLSR (+ KD) training driven by Lightning's own CLI: ``whisper-experts distill lightning fit --config X.yaml``.

The recipe of :func:`trainers.train_distill.train_distilled` for CLSR students, built from plain config values so
that :class:`~lightning.pytorch.cli.LightningCLI` can read it from YAML:

- :class:`ClsrExpertTask` (``model:``) loads the base, converts it to CLSR with a path and gate per language,
  and loads the teacher (online, or cached with ``teacher_cache``);
- :class:`ClsrCorpusDataModule` (``data:``) reads a corpus directory into one-language training batches and
  prepares the teacher source on the training rows;
- :class:`StoreBestClsrExperts` (``expert:``) keeps each language's best epoch and, when fitting ends, tests
  and stores one ``clsr`` expert per language in the registry (rank 0 only);
- ``checkpoint:`` and ``early_stopping:`` watch ``val_wer``. Under DDP set ``trainer.strategy:
  ddp_find_unused_parameters_true`` (ranks train different languages' paths in one step).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from distill.clsr import ClsrConfig
from lora_experts.config import LoraExpertConfig
from trainers.clsr_experts import KeepBestLanguages, clsr_experts, expert_names
from trainers.clsr_module import ClsrExpertModule
from trainers.language_batches import DistillDataModule
from trainers.train_distill import default_lr, encoder_cache_plan, load_teacher_source, loss_config
from trainers.lightning_cli import ExpertLightningCLI
from trainers.train_lora import load_checked_base


class ClsrExpertTask(ClsrExpertModule):
    """CLSR language paths and gates on a frozen base Whisper, built from config values.

    Args:
        languages: Whisper codes, one path and gate each.
        base: student base: an imported or bundled name, a local directory, or a hub id.
        path: full (a copy of the FFN per language, as DistilWhisper) or lowrank (a rank-r delta on it).
        side: FFN blocks that get CLSR paths: both (every encoder and decoder FFN, the paper), decoder (the encoder
            stays untouched and training caches its output, with a cached teacher or none) or encoder.
        encoder_start: with side both/encoder, only encoder layers >= this get CLSR paths (the input of this
            layer is cached).
        rank: lowrank rank.
        alpha: lowrank alpha (the delta is scaled by alpha / rank).
        gate_hidden: hidden size of each gate.
        teacher: one teacher for every language: BASE or BASE+EXPERT (e.g. openai/whisper-large-v2).
        teachers: one teacher per language: EXPERT or BASE+EXPERT each (their experts name the languages).
        teacher_base: base of `teachers` experts given without one (default: the student's base).
        teacher_cache: directory of a top-k teacher cache (filled once); unset: the teacher runs every step.
        top_k: teacher log-probabilities kept per position in the cache.
        registry: registry directory for teacher expert specs.
        kd: KD loss, js (Jensen-Shannon, DistilWhisper's) or kl.
        temperature: KD temperature.
        ce_weight: weight of CE (default 0.25 with a teacher, 1 without).
        gate_weight: weight of the gate budget loss (default 0.25 with a teacher, 1 without).
        kd_weight: weight of KD (default 0.5 with a teacher).
        label_smoothing: CE label smoothing.
        gate_budget: target fraction of tokens on the language paths.
        max_noise: gate noise scale reached at the end of training.
        lr: peak learning rate (default 1e-4 for full paths, 1e-3 for lowrank).
        gate_lr: the gates' peak learning rate (default: lr).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        schedule: decay after warm-up.
        val_max_new_tokens: bound for validation decoding.
    """

    def __init__(self, languages: list[str], base: str = "whisper-base", path: Literal["full", "lowrank"] = "full",
                 side: Literal["both", "decoder", "encoder"] = "both", encoder_start: int = 0, rank: int = 16,
                 alpha: float = 32.0, gate_hidden: int = 64, teacher: str | None = None,
                 teachers: list[str] | None = None, teacher_base: str | None = None, teacher_cache: str | None = None,
                 top_k: int = 32, registry: str | None = None, kd: Literal["js", "kl"] = "js", temperature: float = 1.0,
                 ce_weight: float | None = None, gate_weight: float | None = None, kd_weight: float | None = None,
                 label_smoothing: float = 0.1, gate_budget: float = 0.5, max_noise: float = 5.0,
                 lr: float | None = None, weight_decay: float = 0.0, warmup_steps: int = 10,
                 schedule: Literal["linear", "cosine", "constant"] = "linear", val_max_new_tokens: int = 128,
                 gate_lr: float | None = None):
        loaded, _, _ = load_checked_base(base, languages, LoraExpertConfig())
        source = load_teacher_source(loaded, teacher=teacher, teachers=teachers or (), teacher_base=teacher_base,
                                     registry=registry, cache=teacher_cache, top_k=top_k)
        loss = loss_config(source is not None, ce_weight=ce_weight, gate_weight=gate_weight, kd_weight=kd_weight,
                           label_smoothing=label_smoothing, gate_budget=gate_budget, kd=kd, temperature=temperature)
        if source is not None:
            source.teachers.check_covers(languages)
        lr = default_lr("clsr", path) if lr is None else lr
        super().__init__(loaded.model, loaded.processor, languages,
                         ClsrConfig(kind=path, rank=rank, alpha=alpha, gate_hidden=gate_hidden, side=side,
                                    encoder_start=encoder_start), loss, source, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule, max_noise=max_noise,
                         val_max_new_tokens=val_max_new_tokens, gate_lr=gate_lr)
        self.base = loaded


class ClsrCorpusDataModule(DistillDataModule):
    """One-language training batches from a corpus directory, for the :class:`ClsrExpertTask` being trained.

    The processor, the languages and the teacher source come from the model when the Trainer sets this up.

    Args:
        data: corpus directory (from `whisper-experts corpus synth` / `corpus from-dir`).
        batch_size: utterances per batch.
        max_train: at most this many training utterances per language.
        max_validation: at most this many validation utterances per language.
        cache_encoder: cache the encoder output (or the input of the lowest CLSR encoder layer) when the student's
            layout leaves it alone and the teacher is cached (or absent).
        cache_dir: encoder cache location (default: <data>/.cache).
        seed: seeds the batch order.
        progress: progress bars for feature extraction and the teacher cache.
    """

    def __init__(self, data: str, batch_size: int = 16, max_train: int | None = None,
                 max_validation: int | None = None, cache_encoder: bool = True, cache_dir: str | None = None,
                 seed: int = 0, progress: bool = True):
        super().__init__(data, None, (), batch_size, max_train=max_train, max_validation=max_validation,
                         cache_dir=cache_dir, seed=seed, progress=progress)
        self.cache_encoder = cache_encoder

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


class StoreBestClsrExperts(KeepBestLanguages):
    """Keeps each language's best epoch; when fitting ends, tests them and stores one ``clsr`` expert per language.

    Args:
        name: registry name: NAME for one language, NAME-<lang> for several (default <lang>-clsr[-kd]).
        registry: registry directory (default: <home>/registry).
        test: evaluate the base and each expert on the test split (the manifests' test metrics).
        test_limit: at most this many test utterances per language.
        tags: registry tags for the stored versions.
    """

    def __init__(self, name: str | None = None, registry: str | None = None, test: bool = True,
                 test_limit: int | None = None, tags: list[str] | None = None):
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

    task_class = ClsrExpertTask
    data_class = ClsrCorpusDataModule
    expert_class = StoreBestClsrExperts
    prog = "whisper-experts distill lightning"
    description = "Train CLSR gated language experts (+ KD) with LightningCLI."
