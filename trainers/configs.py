"""The options of every training recipe, one frozen dataclass each: the single source of their flags and keys.

Each field carries its type (``Literal`` for a choice), its default and a one-line comment (or
``metadata={"help": ...}``) that is its help text. :mod:`trainers.options` derives the command-line flags, the
``--config`` YAML keys and the LightningCLI ``model:``/``data:`` options from them, so a field added here appears
in all of them. This module imports no torch: ``whisper-experts --help`` builds its flags from it.

- :class:`TrainConfig`: a LoRA expert (``trainers.train_lora``; ``whisper-experts train``, ``lightning``);
  :class:`SparseTrainConfig` (``--kind sparse``) and :class:`FullTrainConfig` (``--kind task_vector``) extend it.
- :class:`DistillConfig`: CLSR gated experts or a LoRA student taught by teachers (``whisper-experts distill``).
- :class:`RouterTrainConfig`: a learned router over a pack (``whisper-experts router train``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from lora_experts.config import ATTENTION, FFN, LoraExpertConfig

Side = Literal["decoder", "encoder", "both"]
Schedule = Literal["linear", "cosine", "constant"]
MaskScope = Literal["global", "per_matrix"]  # lora_experts.sparse_masks.SCOPES
MaskScore = Literal["magnitude", "gradient"]
DistillKind = Literal["clsr", "lora", "full"]
ClsrPath = Literal["full", "lowrank"]  # distill.clsr.config.PATH_KINDS


# The decoder-only recipe: the default before real-speech measurements replaced it (the synthetic-speech tables in
# docs/results.md were measured with it, in float32: bf16 became the default later, so the recipe pins float32 and
# those tables rerun as they were measured). ``TrainConfig(..., **DECODER_RECIPE)``: about 7x cheaper steps.
DECODER_RECIPE = {"side": "decoder", "encoder_start": 0, "dropout": 0.05, "precision": "32-true"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a LoRA expert training run needs. Frozen: vary with ``dataclasses.replace``."""

    data: str  # corpus directory (from `corpus synth` / `corpus from-dir`); validation and test use it alone
    languages: tuple[str, ...]  # Whisper codes the expert serves, comma-separated (batches may mix them)
    base: str = "whisper-base"  # base model: an imported or bundled name, a directory or a hub id
    rank: int = 16  # LoRA rank
    alpha: float = 32.0  # LoRA alpha (the update is scaled by alpha / rank)
    dropout: float = 0.0  # LoRA dropout (measured on real speech: 0 trains faster and no worse)
    # Linear layers to adapt, comma-separated (default all: q_proj,k_proj,v_proj,out_proj,fc1,fc2).
    target_modules: tuple[str, ...] = ATTENTION + FFN
    # Where to adapt: decoder and top encoder layers (measured best on real speech), the decoder alone (cheapest:
    # trains on cached encoder outputs, about 7x faster steps) or the encoder alone.
    side: Side = "both"
    cross_attention: bool = True  # adapt the decoder's cross-attention q/out too
    cross_attention_kv: bool = False  # also adapt cross-attention k/v (acts on all encoder frames: ~2x slower steps)
    # With side encoder/both: adapt encoder layers from this index up only; the frozen layers below are cached,
    # so steps cost only the top layers (0: all). Negative counts from the top (-3: the top three, layers 3-5 of
    # whisper-base; all layers when the encoder has fewer).
    encoder_start: int = -3
    lr: float = 1e-3  # peak learning rate
    schedule: Schedule = "linear"  # decay after warm-up
    warmup_steps: int = 10  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    epochs: int = 10  # maximum epochs
    max_steps: int = -1  # stop after this many optimizer steps (-1: the epochs decide)
    batch_size: int = 16  # utterances per batch
    accumulate: int = 1  # gradient accumulation steps
    # Lightning precision (default bf16-mixed where the machine computes bf16 natively: CUDA, or a CPU with AMX or
    # AVX512-BF16; else 32-true)
    precision: str | None = None
    seed: int = 0  # seeds data order, dropout, LoRA init and augmentation
    max_train: int | None = None  # at most this many training utterances per language of the first --data
    max_validation: int | None = None  # at most this many validation utterances per language
    patience: int = 3  # early stopping: epochs without a better validation WER
    init_from: str | None = None  # warm start from this expert (registry spec or file)
    run_dir: str = "runs/expert"  # logs and checkpoints (checkpoints hold the expert only)
    # Continue an interrupted LoRA run from its Lightning checkpoint (the run's logs/version_N/checkpoints/last.ckpt)
    # with the options it was started with (--epochs may grow); its optimizer, schedule, early stopping, history and
    # best expert so far carry over
    resume: str | None = None
    # Cache what the expert cannot change: the encoder output, or the input of the lowest adapted encoder layer.
    cache_encoder: bool = True
    cache_dir: str | None = None  # encoder cache directory (default <corpus>/.cache, each corpus its own)
    strategy: str = "auto"  # Lightning strategy, e.g. ddp (one process per device)
    devices: str = "auto"  # Lightning devices, e.g. 2 (GPUs, or CPU processes without one)
    test: bool = True  # evaluate the best expert (and the base) on the test split
    test_limit: int | None = None  # at most this many test utterances per language
    val_max_new_tokens: int = 128  # bound on the tokens of each validation transcript
    progress: bool = True  # progress bars
    # Several corpora (trainers/corpus_mix.py): `data` is the target (validation and test come from it alone)
    extra_data: tuple[str, ...] = ()  # further training corpora, each DIR or DIR:WEIGHT (weight default 1)
    data_weight: float = 1.0  # weight of `data`: an epoch draws round(weight x its training rows) from a corpus
    # Augmentation (trainers/augment.py); training rows only, deterministic given `seed`
    spec_augment: bool = False  # SpecAugment masks on each training batch (on the cached activations when cached)
    spec_freq_masks: int = 2  # frequency masks per utterance (channel masks on cached activations)
    spec_freq_width: int = 27  # widest frequency mask in mel bins (the same share of d_model on activations)
    spec_time_masks: int = 2  # time masks per utterance
    spec_time_width: int = 100  # widest time mask in 10 ms mel frames (half as many 20 ms encoder frames)
    spec_time_ratio: float = 0.05  # and at most this fraction of the utterance's frames
    # Speed factors, e.g. 0.9,1.0,1.1: a resampled copy of the training set per factor other than 1, featurized and
    # cached once (3x the cache, the one-time encoder pass and the steps per epoch).
    speed_perturb: tuple[float, ...] = ()
    noise_snr_db: float | None = None  # add a noisy copy of the training set at this SNR in dB (featurized, cached)
    noise_kind: Literal["white", "pink"] = "pink"  # generated noise (seeded per utterance)
    noise_dir: str | None = None  # mix in excerpts of the noise recordings in this directory instead

    def augmentation(self):
        """The run's :class:`trainers.augment.AugmentConfig` (checks the values)."""
        from trainers.augment import AugmentConfig

        return AugmentConfig(**{f.name: getattr(self, f.name) for f in fields(AugmentConfig)})

    def corpora(self, check: bool = True) -> list:
        """The training corpora (:class:`trainers.corpus_mix.CorpusSpec`), target first; ``check``: the further
        corpora's directories exist (the target's own loading reports a missing one)."""
        from trainers.corpus_mix import parse_corpora

        specs = parse_corpora(self.data, self.extra_data, self.data_weight)
        return specs[:1] + [s.check() for s in specs[1:]] if check else specs

    def lora(self) -> LoraExpertConfig:
        """The expert's shape; a negative ``encoder_start`` is resolved on the base (``for_encoder``)."""
        return LoraExpertConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                                target_modules=tuple(self.target_modules), side=self.side,
                                cross_attention=self.cross_attention, cross_attention_kv=self.cross_attention_kv,
                                encoder_start=self.encoder_start)


@dataclass(frozen=True)
class SparseTrainConfig(TrainConfig):
    """A sparse expert run: the LoRA options shape phase 1; ``lr`` is phase 1's, ``sparse_lr`` phase 2's;
    ``epochs``, ``max_steps`` and ``patience`` bound each phase. Its measured recipe adapts the decoder alone."""

    side: Side = "decoder"  # where phase 1 adapts (decoder and top encoder layers: both, with encoder_start)
    encoder_start: int = 0  # side encoder/both: the lowest adapted encoder layer (negative: from the top)
    dropout: float = 0.05  # phase-1 LoRA dropout

    sparsity: float = 0.99  # fraction of the phase-1 matrices' entries left at the base value (0.99: 1% trained)
    mask_scope: MaskScope = "global"  # rank entries over all matrices together, or in each matrix alone
    mask_score: MaskScore = "magnitude"  # mask by |dW|, or by |grad * dW| summed over a few training batches
    score_batches: int = 4  # mask_score gradient: training batches to sum over
    sparse_lr: float = 1e-4  # phase-2 peak learning rate (AdamW on the masked weight entries)
    mask_from: str | None = None  # take dW from this expert (registry spec or file) instead of training phase 1

    def __post_init__(self):
        if self.resume:
            raise ValueError("--resume continues a LoRA run; a sparse expert's two phases start afresh")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1) (0.99 keeps 1% of the entries), got {self.sparsity}")
        if self.mask_scope not in get_args(MaskScope):
            raise ValueError(f"mask_scope must be one of {', '.join(get_args(MaskScope))}, got {self.mask_scope!r}")
        if self.mask_score not in get_args(MaskScore):
            raise ValueError(f"mask_score must be one of {', '.join(get_args(MaskScore))}, got {self.mask_score!r}")

    def phase1(self) -> TrainConfig:
        """Phase 1's LoRA run (logs under ``<run_dir>/phase1``; no test split: only its delta is used)."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainConfig)}
        return TrainConfig(**{**values, "run_dir": str(Path(self.run_dir) / "phase1"), "test": False})


@dataclass(frozen=True)
class FullTrainConfig(TrainConfig):
    """A fine-tune run; ``rank``, ``alpha``, ``dropout`` and ``init_from`` do not apply. ``lr`` defaults far below
    LoRA's, as full fine-tunes need."""

    lr: float = 3e-5
    side: Side = "decoder"  # the fine-tuned region: the decoder, or with both/encoder the top encoder layers too
    encoder_start: int = 0  # side encoder/both: the lowest fine-tuned encoder layer (negative: from the top)
    biases: bool = True  # train the biases of the fine-tuned linear layers too

    def __post_init__(self):
        if self.init_from:
            raise ValueError("a fine-tune starts from the base; --init-from applies to LoRA experts")
        if self.resume:
            raise ValueError("--resume continues a LoRA run; a fine-tune writes no checkpoints to resume from")


@dataclass(frozen=True)
class DistillConfig:
    """Everything a distillation run needs. Frozen: vary with ``dataclasses.replace``.

    The CLSR fields are :class:`distill.clsr.ClsrConfig`'s, with the same defaults (``path`` is its ``kind``).
    """

    data: str  # corpus directory
    languages: tuple[str, ...] = ()  # student languages, comma-separated (default with teachers: theirs)
    base: str = "whisper-base"  # student base: an imported or bundled name, a directory or a hub id
    # student: clsr (a path and gate per language), lora (one LoRA for all) or full (the region's weights themselves,
    # stored as a task_vector: a student cut with `base shrink` relearns its shared weights)
    kind: DistillKind = "clsr"
    teacher: str | None = None  # one teacher for every language: BASE or BASE+EXPERT, e.g. whisper-base+uk-teacher
    teachers: tuple[str, ...] = ()  # one teacher per language: EXPERT or BASE+EXPERT each (experts name languages)
    teacher_base: str | None = None  # base of teachers given as EXPERT alone (default: the student's base)
    teacher_cache: str | None = None  # cache the teachers' top-k log-probabilities here, once (else online)
    top_k: int = 32  # log-probabilities kept per position in the teacher cache
    registry: str | None = None  # registry directory of teacher experts (and the results; default <home>/registry)
    path: ClsrPath = "full"  # clsr language path: a copy of the FFN per language (the paper), or a low-rank delta
    # FFN blocks the student adapts (default clsr: both, as the paper; lora: decoder). A student that leaves the
    # encoder alone trains on encoder outputs cached once (with a cached teacher or none): far faster on CPU.
    side: Side | None = None
    # side both/encoder: adapt encoder layers >= this only (its input is cached; negative: from the top)
    encoder_start: int = 0
    # clsr: also gate the attention projections of those layers (self-attention q/k/v/out, cross-attention q/out),
    # each with its own gate and a path of --path's kind: the modules LoRA adapts beside fc1/fc2 (beyond the paper)
    attention: bool = False
    rank: int = 16  # clsr lowrank rank, or the LoRA student's rank
    alpha: float = 32.0  # low-rank / LoRA alpha
    gate_hidden: int = 64  # clsr: hidden size of each gate's ReLU layer
    gate_dropout: float = 0.1  # clsr: dropout on a gate's input in training (DistilWhisper's code uses 0.1)
    # clsr: target mean of every gate value in a batch (encoder frames included: with encoder paths they far
    # outnumber decoder tokens and the budget holds the encoder gates near it); 1 opens every gate
    gate_budget: float = 0.5
    max_noise: float = 5.0  # clsr: gate noise scale reached at the end of training (it ramps up from 0)
    # clsr: fraction of the training steps over which the training gates go from held open (1) to as learned
    # (0: none, the paper's recipe). For small data, where the gates shut before the paths learn anything.
    gate_warmup: float = 0.0
    # clsr: fraction of the training steps over which the path dropout rises from 0 to --path-dropout (0: none)
    path_dropout_ramp: float = 0.0
    path_dropout: float = 0.3  # clsr: dropout on a language path's output in training (DistilWhisper's 0.3)
    # clsr: what the path dropout drops: the language path's whole output (the paper's), or, with --path lowrank, the
    # low-rank delta alone (as LoRA's dropout; the shared part of the path stays clean)
    path_dropout_on: Literal["output", "delta"] = "output"
    shared_only_prob: float = 0.2  # clsr: per layer call in training, run only the shared path with this probability
    # clsr: how inference uses the gates, in validation (the best epoch), the test and the expert file (every loader
    # applies it): hard, 1[G >= 0] (the paper), or soft, both paths mixed by sigmoid(G) (4% better on real speech,
    # where the gates stayed near 0: docs/results.md)
    gate_inference: Literal["hard", "soft"] = "hard"
    kd: Literal["js", "kl"] = "js"  # KD loss: Jensen-Shannon (DistilWhisper's) or KL
    temperature: float = 1.0  # KD temperature
    ce_weight: float | None = None  # weight of CE (default 0.25 with a teacher, 1 without)
    gate_weight: float | None = None  # clsr: weight of the gate budget loss (default 0.25 with a teacher, 1 without)
    kd_weight: float | None = None  # weight of KD (default 0.5 with a teacher)
    label_smoothing: float = 0.1  # CE label smoothing
    lr: float | None = None  # peak learning rate (default 1e-4 for full clsr paths, 1e-3 for lowrank and LoRA)
    # clsr: the gates' peak learning rate (default: lr). On short runs a gate trained at a full path's 1e-4 stays
    # near G = 0 and its hard decision is noise; try 1e-3.
    gate_lr: float | None = None
    # clsr: the decoder-side language paths' peak learning rate (default: lr). Measured on real speech: at lr the
    # decoder gates either stay closed (path dropout 0.3) or open and overfit (path dropout 0); a lower rate here is
    # the next thing to measure.
    decoder_lr: float | None = None
    schedule: Schedule = "linear"  # decay after warm-up
    warmup_steps: int = 10  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    epochs: int = 10  # maximum epochs
    max_steps: int = -1  # stop after this many optimizer steps (-1: the epochs decide)
    batch_size: int = 16  # utterances per batch
    accumulate: int = 1  # gradient accumulation steps
    # Lightning precision (default bf16-mixed where the machine computes bf16 natively: CUDA, or a CPU with AMX or
    # AVX512-BF16; else 32-true)
    precision: str | None = None
    seed: int = 0  # seeds data order and initialization
    max_train: int | None = None  # at most this many training utterances per language
    max_validation: int | None = None  # at most this many validation utterances per language
    patience: int = 3  # early stopping: epochs without a better validation WER (all languages)
    run_dir: str = "runs/distill"  # logs, checkpoints and the report
    # Continue an interrupted run from its Lightning checkpoint (the run's logs/version_N/checkpoints/last.ckpt) with
    # the options it was started with (--epochs may grow); its optimizer, schedule, early stopping, history and best
    # epochs so far carry over
    resume: str | None = None
    # Cache the student's encoder side when it leaves the encoder (or its lower layers) alone and the teacher is
    # cached (or absent).
    cache_encoder: bool = True
    cache_dir: str | None = None  # encoder cache directory (default <data>/.cache)
    strategy: str = "auto"  # Lightning strategy, e.g. ddp
    devices: str = "auto"  # Lightning devices
    test: bool = True  # evaluate the experts (and the base) on the test split
    test_limit: int | None = None  # at most this many test utterances per language
    val_max_new_tokens: int = 128  # bound on the tokens of each validation transcript
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.kind not in get_args(DistillKind):
            raise ValueError(f"--kind must be one of {', '.join(get_args(DistillKind))}, got {self.kind!r}")
        if self.teacher and self.teachers:
            raise ValueError("give one --teacher for every language or --teachers (one per language), not both")
        self.clsr() if self.kind == "clsr" else self.lora()  # refuse a bad side / encoder_start now
        if self.attention and self.kind != "clsr":
            raise ValueError(f"--attention gates CLSR paths on the attention projections; a --kind {self.kind} "
                             "student has no gates (a LoRA student adapts the attention projections already)")
        if self.kind in ("lora", "full") and not (self.teacher or self.teachers):
            what = "a LoRA" if self.kind == "lora" else "a full"
            alone = "a LoRA expert" if self.kind == "lora" else "a fine-tune (--kind task_vector)"
            raise ValueError(f"{what} student is distilled from teachers: give --teachers (or --teacher); to train "
                             f"{alone} on labels alone use `whisper-experts train`")

    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher or self.teachers)

    def clsr(self):
        """The student's :class:`distill.clsr.ClsrConfig`: every one of its fields is a field here (``path`` is
        its ``kind``; ``side`` None is its default, both)."""
        from distill.clsr.config import ClsrConfig

        given = {"kind": self.path, "side": self.side or "both"}
        return ClsrConfig(**{f.name: given.get(f.name, getattr(self, f.name)) for f in fields(ClsrConfig)})

    def lora(self) -> LoraExpertConfig:
        return LoraExpertConfig(rank=self.rank, alpha=self.alpha, side=self.side or "decoder",
                                encoder_start=self.encoder_start)

    def loss(self):
        """The run's :class:`distill.losses.DistillationLossConfig`."""
        return loss_config(self.has_teacher, ce_weight=self.ce_weight, gate_weight=self.gate_weight,
                           kd_weight=self.kd_weight, label_smoothing=self.label_smoothing,
                           gate_budget=self.gate_budget, kd=self.kd, temperature=self.temperature)

    def learning_rate(self) -> float:
        return default_lr(self.kind, self.path) if self.lr is None else self.lr

    def optimization(self) -> dict:
        """The optimizer and schedule arguments of :class:`trainers.clsr_module.ClsrExpertModule`."""
        return {"lr": self.learning_rate(), "gate_lr": self.gate_lr, "decoder_lr": self.decoder_lr,
                "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps, "schedule": self.schedule,
                "max_noise": self.max_noise, "gate_warmup": self.gate_warmup,
                "path_dropout_ramp": self.path_dropout_ramp, "val_max_new_tokens": self.val_max_new_tokens}


def loss_config(has_teacher: bool, *, ce_weight: float | None = None, gate_weight: float | None = None,
                kd_weight: float | None = None, **fields):
    """The loss weights of a run: DistilWhisper's (0.25 CE, 0.25 gate, 0.5 KD) with a teacher, CE + gate (1, 1)
    without; weights given here override them; ``fields`` are other :class:`DistillationLossConfig` fields."""
    from distill.losses import DistillationLossConfig

    default = DistillationLossConfig() if has_teacher else DistillationLossConfig.without_teacher()
    weights = {k: v for k, v in (("ce_weight", ce_weight), ("gate_weight", gate_weight), ("kd_weight", kd_weight))
               if v is not None}
    return dataclasses.replace(default, **fields, **weights)


def default_precision() -> str:
    """``bf16-mixed`` where the machine computes bf16 natively (CUDA with bf16; a CPU with AMX or AVX512-BF16),
    else ``32-true``. Measured: bf16 autocast makes LoRA training steps 1.7-2.4x faster on a CPU with bf16 units
    (benchmarks/precision_speed.py) and a Czech expert trained so cut real-speech WER by 31%."""
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private but long-standing torch.cpu probes
    native = any(getattr(cpu, name, lambda: False)() for name in probes)
    return "bf16-mixed" if native else "32-true"


def progress_bar_callbacks(enabled: bool, stream=None) -> list:
    """The Trainer's progress bar, as extra callbacks: none on a terminal (Lightning's default bar, Rich's where
    installed) or when progress is off; on a log file or a pipe (``nohup``, CI) a TQDM bar, which writes and flushes
    its state at every step, where Rich's live display shows nothing until an epoch ends.

    Args:
        enabled: the config's ``progress`` (the Trainer's ``enable_progress_bar``).
        stream: where the bar would write (default ``sys.stdout``, Lightning's).
    """
    import sys

    if not enabled or (stream or sys.stdout).isatty():
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    return [TQDMProgressBar()]


def default_lr(kind: str, path: str) -> float:
    """1e-4 for full CLSR paths (copies of pretrained FFNs, as DistilWhisper) and full students (distil-whisper's
    decoder learning rate), 1e-3 for low-rank paths and LoRA."""
    return 1e-4 if kind == "full" or (kind == "clsr" and path == "full") else 1e-3


@dataclass(frozen=True)
class RouterTrainConfig:
    """Everything a router training run needs. Frozen: vary with ``dataclasses.replace``. An empty ``pack`` routes
    the experts already on the base given to :func:`trainers.train_router.train_router`."""

    data: str  # corpus directory holding every language of the mix (train and validation splits)
    languages: tuple[str, ...]  # codes of the mix, comma-separated; a code no expert serves gets a base-model slot
    pack: tuple[str, ...] = ()  # expert pack files (.safetensors) whose experts the router chooses between
    base: str | None = None  # base model (default: the pack's base)
    hidden: int = 64  # hidden width of the router (0: a linear gate)
    dropout: float = 0.1  # dropout on the router's hidden layer
    lr: float = 3e-3  # AdamW peak learning rate (cosine decay to 0)
    weight_decay: float = 0.01  # AdamW weight decay
    aux_weight: float = 1.0  # weight of the router-vs-own-slot cross-entropy (0: the decoder's loss only)
    epochs: int = 6  # epochs, validated after each
    batch_size: int = 16  # utterances per step
    max_train: int | None = None  # at most this many training utterances per language
    max_validation: int | None = None  # at most this many validation utterances per language
    seed: int = 0  # router init and data order
    cache_dir: str | None = None  # encoder-output cache directory (default <data>/.cache)
    device: str | None = None  # cpu, cuda, cuda:1 (default: CUDA when available)
    force: bool = False  # attach experts trained on other weights of the same architecture and tokenizer
    progress: bool = True  # progress bars

