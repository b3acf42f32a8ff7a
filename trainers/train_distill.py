"""Recipe: distillation into language experts, with Lightning.

Two students:

* ``kind="clsr"`` (DistilWhisper): the base converted to CLSR with a path and gate per language, trained on
  one-language batches with CE + gate budget (+ KD from a teacher); one ``clsr`` expert per language, each from
  its own best validation epoch (:mod:`trainers.clsr_experts`).
* ``kind="lora"`` (the LoRA-language-experts recipe): one LoRA expert serving all the languages, taught by
  the teachers, typically one LoRA language expert per language (``--teachers uk-espeak,ru-espeak``).

The teacher is a spec (:mod:`distill.teachers`): any Whisper the base loader can load, or a base plus an expert;
it is read online (a teacher forward per step) or from a top-k cache filled once (``teacher_cache``). Without a
teacher, a CLSR student trains with CE + gate budget only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from distill.clsr import ClsrConfig
from distill.losses import DistillationLossConfig
from registry.expert_file import Expert

log = logging.getLogger(__name__)
KINDS = ("clsr", "lora")


@dataclass(frozen=True)
class DistillConfig:
    """Everything a distillation run needs. Frozen: vary with ``dataclasses.replace``."""

    data: str  # corpus directory
    languages: tuple[str, ...] = ()  # student languages (default with --teachers: the teachers' languages)
    base: str = "whisper-base"  # student base: name, directory or hub id
    kind: str = "clsr"  # clsr (a path + gate per language) | lora (one LoRA for all the languages)
    teacher: str | None = None  # one teacher for every language: BASE or BASE+EXPERT
    teachers: tuple[str, ...] = ()  # one teacher per language: EXPERT or BASE+EXPERT each (experts name languages)
    teacher_base: str | None = None  # base of --teachers experts given without one (default: the student's base)
    teacher_cache: str | None = None  # cache directory: top-k teacher log-probabilities computed once (else online)
    top_k: int = 32  # log-probabilities kept per position in the cache
    registry: str | None = None  # registry directory for teacher expert specs
    path: str = "full"  # clsr: full copy of the FFN per language | lowrank delta
    # Which blocks the student adapts: both | decoder | encoder (default: clsr both, the paper; lora decoder). A
    # student that leaves the encoder alone trains on cached encoder outputs (with a cached teacher or none).
    side: str | None = None
    encoder_start: int = 0  # side both/encoder: only encoder layers >= this (the input of this layer is cached)
    rank: int = 16  # clsr lowrank rank, or the LoRA student's rank
    alpha: float = 32.0  # low-rank / LoRA alpha
    gate_budget: float = 0.5  # clsr: target fraction b of tokens on the language paths
    max_noise: float = 5.0  # clsr: gate noise scale reached at the end of training
    path_dropout: float = 0.3  # clsr: dropout on the language path's output in training (DistilWhisper's 0.3)
    shared_only_prob: float = 0.2  # clsr: per layer call in training, run only the shared path with this probability
    kd: str = "js"  # KD loss: js | kl
    temperature: float = 1.0  # KD temperature
    ce_weight: float | None = None  # loss weights; default 0.25 / 0.25 / 0.5 with a teacher, 1 / 1 / 0 without
    gate_weight: float | None = None
    kd_weight: float | None = None
    label_smoothing: float = 0.1
    lr: float | None = None  # default 1e-4 (clsr full), 1e-3 (clsr lowrank, lora)
    gate_lr: float | None = None  # clsr: the gates' learning rate (default: lr)
    schedule: str = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    epochs: int = 10
    max_steps: int = -1
    batch_size: int = 16
    accumulate: int = 1
    precision: str | None = None  # default bf16-mixed on CUDA, 32-true on CPU
    seed: int = 0
    max_train: int | None = None  # at most this many training utterances per language
    max_validation: int | None = None
    patience: int = 3  # early stopping on val_wer (all languages)
    run_dir: str = "runs/distill"
    cache_dir: str | None = None  # encoder cache location (default <data>/.cache; not with an online teacher)
    strategy: str = "auto"
    devices: str = "auto"
    test: bool = True
    test_limit: int | None = None
    val_max_new_tokens: int = 128  # bound for validation decoding
    progress: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.teacher and self.teachers:
            raise ValueError("give one --teacher for every language or --teachers (one per language), not both")
        self.clsr() if self.kind == "clsr" else self.lora()  # refuse a bad side / encoder_start now
        if self.kind == "lora" and not (self.teacher or self.teachers):
            raise ValueError("a LoRA student is distilled from teachers: give --teachers (or --teacher); to train a "
                             "LoRA expert on labels alone use `whisper-experts train`")

    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher or self.teachers)

    def clsr(self) -> ClsrConfig:
        return ClsrConfig(kind=self.path, rank=self.rank, alpha=self.alpha, side=self.side or "both",
                          encoder_start=self.encoder_start, path_dropout=self.path_dropout,
                          shared_only_prob=self.shared_only_prob)

    def lora(self):
        from lora_experts.config import LoraExpertConfig

        return LoraExpertConfig(rank=self.rank, alpha=self.alpha, side=self.side or "decoder",
                                encoder_start=self.encoder_start)

    def loss(self) -> DistillationLossConfig:
        return loss_config(self.has_teacher, ce_weight=self.ce_weight, gate_weight=self.gate_weight,
                           kd_weight=self.kd_weight, label_smoothing=self.label_smoothing,
                           gate_budget=self.gate_budget, kd=self.kd, temperature=self.temperature)

    def learning_rate(self) -> float:
        return default_lr(self.kind, self.path) if self.lr is None else self.lr


def default_lr(kind: str, path: str) -> float:
    """1e-4 for full CLSR paths (copies of pretrained FFNs, as DistilWhisper), 1e-3 for low-rank paths and LoRA."""
    return 1e-4 if kind == "clsr" and path == "full" else 1e-3


def loss_config(has_teacher: bool, *, ce_weight: float | None = None, gate_weight: float | None = None,
                kd_weight: float | None = None, **fields) -> DistillationLossConfig:
    """The loss weights of a run: DistilWhisper's (0.25 CE, 0.25 gate, 0.5 KD) with a teacher, CE + gate (1, 1)
    without; weights given here override them; ``fields`` are other :class:`DistillationLossConfig` fields."""
    default = DistillationLossConfig() if has_teacher else DistillationLossConfig.without_teacher()
    weights = {k: v for k, v in (("ce_weight", ce_weight), ("gate_weight", gate_weight), ("kd_weight", kd_weight))
               if v is not None}
    return dataclasses.replace(default, **fields, **weights)


def encoder_cache_plan(student, source) -> tuple[bool, int | None]:
    """Whether a distillation run caches the student's encoder side, and which: ``(cache, layer)``.

    As for a LoRA expert (``trainers.train_lora.expert_data``): a student that leaves the encoder alone trains on
    cached encoder outputs (``layer`` None), one that adapts encoder layers >= K only on the cached input of layer
    K. A cached teacher (or none) needs no audio during training; an online teacher reads every batch's log-mel
    features (it may adapt the encoder itself), so it turns the cache off.

    Args:
        student: the student's :class:`~distill.clsr.ClsrConfig` or ``LoraExpertConfig`` (``touches_encoder``,
            ``encoder_start``).
        source: the teacher source, or None.
    """
    if source is not None and source.kind != "cached":
        return False, None
    if student.touches_encoder and student.encoder_start == 0:
        return False, None
    return True, student.encoder_start if student.touches_encoder else None


def load_teacher_source(student_base, *, teacher: str | None = None, teachers=(), teacher_base: str | None = None,
                        registry: str | None = None, cache: str | None = None, top_k: int = 32, batch_size: int = 16,
                        progress: bool = True):
    """The teacher source of a run: None without teachers, a cached source with ``cache``, else online.

    Args:
        student_base: the student's ``registry.bases.Base`` (teachers must share its tokenizer).
        teacher / teachers: one spec for every language, or one per language (see :mod:`distill.teachers`).
        cache: directory of the top-k cache; None reads the teachers online.
    """
    from distill.sources import CachedTeacher, OnlineTeacher
    from distill.teacher_cache import TeacherCache
    from distill.teachers import load_teachers

    if not teacher and not teachers:
        return None
    loaded = load_teachers(teacher or list(teachers), student_base, default_base=teacher_base, registry=registry,
                           device="cpu")
    if cache:
        return CachedTeacher(loaded, TeacherCache(cache, top_k), batch_size=batch_size, progress=progress)
    return OnlineTeacher(loaded)


def make_trainer(cfg: DistillConfig, callbacks: list) -> L.Trainer:
    """The run's Trainer: best-by-``val_wer`` checkpoint, early stopping, CSV (+ TensorBoard) logs under run_dir."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    run_dir = Path(cfg.run_dir)
    callbacks = [*callbacks, ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val_wer", mode="min",
                                             save_top_k=1, filename="best-{epoch}-{val_wer:.4f}"),
                 EarlyStopping(monitor="val_wer", mode="min", patience=cfg.patience,
                               check_on_train_epoch_end=False)]
    loggers = [CSVLogger(run_dir, name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
    except ImportError:
        pass
    strategy = cfg.strategy
    if cfg.kind == "clsr" and strategy == "ddp":
        strategy = "ddp_find_unused_parameters_true"  # ranks train different languages' paths in one step
    return L.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps, accumulate_grad_batches=cfg.accumulate,
        precision=cfg.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true"), callbacks=callbacks,
        logger=loggers, strategy=strategy, devices=cfg.devices, enable_progress_bar=cfg.progress, log_every_n_steps=1,
        num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False, default_root_dir=run_dir)


def train_distilled(cfg: DistillConfig) -> tuple[list[Expert], dict]:
    """Train a distilled student and return its experts (one per language for CLSR, one for LoRA) and a report.

    Under DDP every rank returns the same experts; only rank 0 evaluates the test split (``report["rank"]``).

    Returns:
        (experts, report with the per-epoch history, best epochs, the teacher source's report, timings, test).
    """
    from trainers.language_batches import DistillDataModule
    from trainers.train_lora import load_checked_base

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.time()
    lora = cfg.lora()
    base, _, _ = load_checked_base(cfg.base, (), lora)
    source = load_teacher_source(base, teacher=cfg.teacher, teachers=cfg.teachers, teacher_base=cfg.teacher_base,
                                 registry=cfg.registry, cache=cfg.teacher_cache, top_k=cfg.top_k,
                                 batch_size=cfg.batch_size, progress=cfg.progress)
    languages = list(cfg.languages) or (source.teachers.languages if source is not None else [])
    if not languages:
        raise ValueError("no --languages given (and no --teachers whose experts name their languages)")
    _check_languages(base, languages)
    if source is not None:
        source.teachers.check_covers(languages)
    cache, layer = encoder_cache_plan(cfg.clsr() if cfg.kind == "clsr" else lora, source)
    data_options = dict(max_train=cfg.max_train, max_validation=cfg.max_validation, seed=cfg.seed,
                        progress=cfg.progress, multilingual=base.multilingual, teacher=source,
                        encoder=base.model.model.encoder if cache else None, encoder_layer=layer,
                        cache_dir=cfg.cache_dir, base_fingerprint=base.fingerprint)
    if cfg.kind == "clsr":
        from trainers.clsr_experts import KeepBestLanguages
        from trainers.clsr_module import ClsrExpertModule

        module = ClsrExpertModule(base.model, base.processor, languages, cfg.clsr(), cfg.loss(), source,
                                  lr=cfg.learning_rate(), weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                  schedule=cfg.schedule, max_noise=cfg.max_noise, gate_lr=cfg.gate_lr,
                                  val_max_new_tokens=cfg.val_max_new_tokens)
        # The CLSR layers are in place (the encoder cache below them is the base's): build the data after.
        data = DistillDataModule(cfg.data, base.processor, languages, cfg.batch_size, language_batches=True,
                                 **data_options)
        keep = KeepBestLanguages(languages)
    else:
        from trainers.lora_student import LoraStudentModule
        from trainers.train_lora import KeepBestExpert

        module = LoraStudentModule(base.model, base.processor, lora, teacher=source, loss=cfg.loss(),
                                   lr=cfg.learning_rate(), weight_decay=cfg.weight_decay,
                                   warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                   val_max_new_tokens=cfg.val_max_new_tokens)
        data = DistillDataModule(cfg.data, base.processor, languages, cfg.batch_size, language_batches=False,
                                 **data_options)
        keep = KeepBestExpert()
    data.setup("fit")
    prepared = time.time()
    trainer = make_trainer(cfg, [keep])
    trainer.fit(module, datamodule=data)
    if not keep.history:  # max_steps ended training before an epoch's validation: validate once
        trainer.validate(module, datamodule=data, verbose=False)
    trained = time.time()
    report = {"languages": languages, "history": keep.history, "teacher": data.teacher_report,
              "seconds": {"prepare": round(prepared - t0, 1), "train": round(trained - prepared, 1)},
              "rank": trainer.global_rank, "world_size": trainer.world_size}
    test = cfg.test and trainer.is_global_zero
    if cfg.kind == "clsr":
        from trainers.clsr_experts import clsr_experts

        experts, results = clsr_experts(module, base, keep, data, test=test, test_limit=cfg.test_limit,
                                        batch_size=cfg.batch_size, progress=cfg.progress)
        report["best"] = keep.best
    else:
        expert, results = _lora_expert(module, base, keep, data, languages, cfg, test)
        experts = [expert]
        report["best"] = {"epoch": keep.best_epoch, "wer": keep.best_wer}
    if results is not None:
        report["test"] = results
        report["seconds"]["test"] = round(time.time() - trained, 1)
    return experts, report


def _check_languages(base, languages) -> None:
    unknown = [lang for lang in languages if base.multilingual and lang not in base.languages]
    if unknown:
        raise ValueError(f"unknown language(s) {', '.join(unknown)} for {base.name}; see `whisper-experts base info`")


def _lora_expert(module, base, keep, data, languages, cfg: DistillConfig, test: bool) -> tuple[Expert, dict | None]:
    """The distilled LoRA student as an expert: the LoRA recipe's manifest plus the teachers' lineage."""
    from lora_experts.model import remove_experts
    from trainers.clsr_experts import teacher_lineage
    from trainers.train_lora import evaluate_on_test_split, expert_manifest

    if keep.tensors is None:
        raise RuntimeError("training produced no validated expert (no validation epoch ran); raise --epochs")
    model = module.model.cpu().eval()
    remove_experts(model)
    results = None
    if test:
        results = evaluate_on_test_split(base, keep.tensors, module.config.hyperparameters(), cfg.data, languages,
                                         limit=cfg.test_limit, batch_size=cfg.batch_size, progress=cfg.progress)
    manifest = expert_manifest(base, languages, module.config, keep, data, lr=cfg.learning_rate(),
                               schedule=cfg.schedule, test=results)
    loss = module.loss_config
    manifest["hyperparameters"].update(kd=loss.kd, kd_weight=loss.kd_weight, ce_weight=loss.ce_weight,
                                       temperature=loss.temperature, label_smoothing=loss.label_smoothing)
    manifest["lineage"] = teacher_lineage(module.teacher)
    manifest["data"]["languages"] = data.summary.get("languages", {})
    return Expert(keep.tensors, manifest), results
