"""Recipe: train a LoRA language expert with Lightning and return it as an :class:`~registry.expert_file.Expert`.

The base is loaded once and frozen; a decoder-only expert trains on cached encoder outputs. Validation WER is
computed every epoch; the expert with the best validation WER is kept (early stopping watches the same
figure), evaluated on the test split, and returned with a full manifest (base fingerprints, hyperparameters,
data summary, validation and test metrics, lineage).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from lora_experts.config import LoraExpertConfig
from lora_experts.model import DEFAULT_ADAPTER, attach_expert, remove_experts
from registry.expert_file import Expert, check_compatible, new_manifest
from trainers.configs import TrainConfig, default_precision, progress_bar_callbacks

log = logging.getLogger(__name__)


class KeepBestExpert(L.Callback):
    """Keeps a copy of the expert's matrices from the epoch with the lowest validation WER (and the run's
    Lightning precision, which the manifest records). Its state travels in the run's checkpoints, so a resumed run
    (``--resume``) still returns the best epoch's expert when that epoch came before the interruption."""

    def __init__(self):
        self.best_wer = float("inf")
        self.best_epoch = -1
        self.tensors: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self.precision: str | None = None
        self._legacy: dict | None = None  # a checkpoint without this callback's state: its own score and epoch

    def on_fit_start(self, trainer, module):
        self.precision = str(trainer.precision)

    def state_dict(self) -> dict:
        return {"best_wer": self.best_wer, "best_epoch": self.best_epoch, "tensors": self.tensors,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best_wer, self.best_epoch = state["best_wer"], state["best_epoch"]
        self.tensors, self.history = state["tensors"], list(state["history"])

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        # Checkpoints written before this callback had a state: a best-epoch checkpoint's weights are its expert.
        if not any(key.startswith("KeepBestExpert") for key in checkpoint.get("callbacks", {})):
            scores = [s for key, s in checkpoint.get("callbacks", {}).items() if key.startswith("ModelCheckpoint")]
            current = scores[0].get("current_score") if scores else None
            if current is not None:
                self._legacy = {"epoch": checkpoint["epoch"], "step": checkpoint["global_step"],
                                "val_wer": float(current)}

    def on_train_start(self, trainer, module):
        # Lightning has restored the module's weights by now: they are the legacy checkpoint's expert.
        if self._legacy is not None and self.tensors is None:
            self.best_wer, self.best_epoch = self._legacy["val_wer"], self._legacy["epoch"]
            self.tensors = copy.deepcopy(module.expert_tensors())
            self.history.append(self._legacy)
        self._legacy = None

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        wer = metrics.get("val_wer", float("inf"))
        if wer < self.best_wer:
            self.best_wer, self.best_epoch = wer, trainer.current_epoch
            self.tensors = copy.deepcopy(module.expert_tensors())


def checkpoint_globals():
    """The context under which a run's Lightning checkpoint loads with ``weights_only=True``: the config classes its
    hyperparameters hold are allowed, nothing else that is not plain data."""
    from distill.clsr import ClsrConfig
    from distill.losses import DistillationLossConfig

    return torch.serialization.safe_globals([LoraExpertConfig, ClsrConfig, DistillationLossConfig])


def best_and_last_checkpoints():
    """The ``ModelCheckpoint`` of every recipe: the best epoch by validation WER (``best-{epoch}-{val_wer}.ckpt``)
    and ``last.ckpt`` after every validation, what ``--resume`` continues an interrupted run from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(monitor="val_wer", mode="min", save_top_k=1, save_last=True,
                           filename="best-{epoch}-{val_wer:.4f}")


def fit(trainer: L.Trainer, module, data, resume: str | None = None) -> None:
    """``trainer.fit``, from the checkpoint ``resume`` when given (checked by :func:`resume_checkpoint` before the
    data was prepared), loaded weights-only."""
    with checkpoint_globals():
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)


def resume_checkpoint(path: str, module, command: str = "whisper-experts train") -> None:
    """Check that ``path`` is a checkpoint this run can continue from, before Lightning loads it: a readable
    checkpoint of ``command`` holding the tensors ``module`` checkpoints (its expert, paths and gates: same shape
    and layout) and the same optimizer settings (they live on in the restored optimizer and schedule).

    Raises:
        ValueError: naming the file and the fix.
    """
    file = Path(path)
    fix = "an interrupted run's checkpoint is <run_dir>/logs/version_N/checkpoints/last.ckpt (or best-*.ckpt)"
    if not file.is_file():
        raise ValueError(f"--resume {path}: no such checkpoint file; {fix}")
    try:
        with checkpoint_globals():
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise ValueError(f"--resume {path}: not a readable Lightning checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); {fix}") from e
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters", "epoch"} <= set(checkpoint):
        raise ValueError(f"--resume {path}: not a checkpoint of `{command}` (no trained state or hyperparameters in "
                         f"it); {fix}")
    theirs, ours = checkpoint["hyper_parameters"], dict(module.hparams)
    differ = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in ours.items()
              if k != "val_max_new_tokens" and theirs.get(k) != v]
    if differ:
        raise ValueError(f"--resume {path}: that run was started with other options ({'; '.join(differ)}); resume "
                         "with the options it started with (--epochs may grow)")
    probe = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(probe)  # what this run's checkpoints hold
    shapes = {k: tuple(v.shape) for k, v in probe["state_dict"].items()}
    if {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()} != shapes:
        raise ValueError(f"--resume {path}: its trained tensors are not this run's ({len(checkpoint['state_dict'])} in "
                         f"the file, {len(shapes)} here, or of other shapes): it was trained on another base, rank, "
                         "layout or set of languages")


def _resolve_expert(spec: str) -> Expert:
    """An expert from a file path or a registry spec (``name``, ``name@3``, ``name@latest``)."""
    from registry.lookup import open_expert

    return open_expert(spec)[0]


def load_checked_base(spec: str, languages: Sequence[str], lora: LoraExpertConfig, init_from: str | None = None):
    """Load the base (on CPU) and check a training run against it.

    Args:
        spec: base name, directory or hub id (``registry.bases.load_base``).
        languages: the expert's Whisper codes; each must be one of the base's languages.
        lora: the expert's shape; its ``encoder_start`` must name an encoder layer of the base, or count from
            the top (negative).
        init_from: a LoRA expert to warm-start from (registry spec or file), made for this base.

    Returns:
        (the ``Base``, ``lora`` with its ``encoder_start`` resolved on this base (``LoraExpertConfig.for_encoder``),
        (tensors, hyperparameters) of the warm start or None, lineage parents).
    """
    from registry.bases import load_base

    base = load_base(spec, device="cpu")
    unknown = [lang for lang in languages if base.multilingual and lang not in base.languages]
    if unknown:
        raise ValueError(f"unknown language(s) {', '.join(unknown)} for {base.name}; see `whisper-experts base info`")
    layers = base.model.config.encoder_layers
    if lora.touches_encoder and lora.encoder_start >= layers:
        raise ValueError(f"--encoder-start {lora.encoder_start}: {base.name}'s encoder has layers 0..{layers - 1}; "
                         f"pick a start below {layers}, a negative one (-3: the top three layers), or --side decoder")
    lora = lora.for_encoder(layers)
    init, parents = None, []
    if init_from:
        start = _resolve_expert(init_from)
        check_compatible(start.manifest, base, what=f"expert {init_from}")
        if start.kind != "lora":
            raise ValueError(f"--init-from {init_from} is a {start.kind} expert; a LoRA expert is needed")
        init = (start.tensors, start.manifest["hyperparameters"])
        parents.append({"expert": init_from, "languages": start.languages, "role": "warm start"})
    return base, lora, init, parents


def expert_data(cfg: TrainConfig, base, touches_encoder: bool, encoder_start: int):
    """The set-up training data of a run, caching what the expert cannot change: the encoder output (an expert
    that leaves the encoder alone) or the input of the lowest adapted encoder layer (one on the top layers).
    Speed and noise copies are cached like the originals; SpecAugment masks whatever is cached (or the log-mel
    features), on the fly."""
    from trainers.data import ExpertDataModule

    cache = cfg.cache_encoder and (not touches_encoder or encoder_start > 0)
    data = ExpertDataModule(cfg.data, base.processor, cfg.languages, cfg.batch_size, cfg.max_train,
                            cfg.max_validation, encoder=base.model.model.encoder if cache else None,
                            encoder_layer=encoder_start if touches_encoder else None,
                            cache_dir=cfg.cache_dir, base_fingerprint=base.fingerprint,
                            multilingual=base.multilingual, seed=cfg.seed, progress=cfg.progress,
                            extra_data=cfg.extra_data, data_weight=cfg.data_weight, augment=cfg.augmentation())
    data.setup("fit")
    return data


def expert_trainer(cfg: TrainConfig, run_dir: Path, keep: KeepBestExpert, loggers: list, *,
                   checkpoints: bool = True, **options) -> L.Trainer:
    """The Lightning ``Trainer`` of every expert recipe (LoRA, sparse, fine-tune): ``cfg``'s epochs, steps,
    accumulation, precision (bf16-mixed on CUDA by default), strategy and devices; ``keep`` plus early stopping
    on validation WER, and (``checkpoints``) the best epoch's checkpoint and the last one (``last.ckpt``, what
    ``--resume`` continues from) beside the first logger's files
    (``run_dir/logs/version_N/checkpoints``, as Lightning places it: a rerun in the same ``run_dir`` gets its own
    version folder, never a stale checkpoint of an earlier run beside its own).

    Args:
        options: further ``Trainer`` arguments.
    """
    from lightning.pytorch.callbacks import EarlyStopping

    callbacks = [keep, EarlyStopping(monitor="val_wer", mode="min", patience=cfg.patience,
                                     check_on_train_epoch_end=False), *progress_bar_callbacks(cfg.progress)]
    if checkpoints:
        callbacks.append(best_and_last_checkpoints())
    else:
        options["enable_checkpointing"] = False
    return L.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps, accumulate_grad_batches=cfg.accumulate,
        precision=cfg.precision or default_precision(), callbacks=callbacks,
        logger=loggers, strategy=cfg.strategy, devices=cfg.devices, enable_progress_bar=cfg.progress,
        log_every_n_steps=1, num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=run_dir, **options)


def train_lora_expert(cfg: TrainConfig) -> tuple[Expert, dict]:
    """Train, select by validation WER, test, and describe a LoRA expert.

    With ``strategy="ddp"`` Lightning starts one process per device, each running the whole script: every rank
    trains on its share of the batches and returns the same expert tensors, but only rank 0 evaluates the test
    split (``report["rank"]`` says which rank this is; store or write the expert from rank 0 only).

    Returns:
        (the expert, a report dict with the per-epoch history, base and expert test results, timings, rank).
    """
    from lightning.pytorch.loggers import CSVLogger

    from trainers.lora_module import LoraExpertModule

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.time()
    lora = cfg.lora()
    cfg.augmentation(), cfg.corpora()  # bad options and missing corpora fail before the base loads
    base, lora, init, parents = load_checked_base(cfg.base, cfg.languages, lora, cfg.init_from)

    model = base.model
    module = LoraExpertModule(model, base.processor, lora, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                              label_smoothing=cfg.label_smoothing, init_from=init,
                              val_max_new_tokens=cfg.val_max_new_tokens)
    if cfg.resume:  # checked before the data's one-time encoder pass
        resume_checkpoint(cfg.resume, module)
    data = expert_data(cfg, base, lora.touches_encoder, lora.encoder_start)
    prepared = time.time()

    run_dir = Path(cfg.run_dir)
    keep = KeepBestExpert()
    loggers = [CSVLogger(run_dir, name="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
    except ImportError:
        pass
    trainer = expert_trainer(cfg, run_dir, keep, loggers, deterministic=False)
    fit(trainer, module, data, cfg.resume)
    if keep.tensors is None:  # --max-steps ended training before an epoch's validation: validate once
        trainer.validate(module, datamodule=data, verbose=False)
    trained = time.time()
    if keep.tensors is None:
        raise RuntimeError("training produced no validated expert (no validation epoch ran); raise --epochs")

    report = {"history": keep.history, "best_epoch": keep.best_epoch, "best_val_wer": keep.best_wer,
              "seconds": {"prepare": round(prepared - t0, 1), "train": round(trained - prepared, 1)},
              "rank": trainer.global_rank, "world_size": trainer.world_size,
              "checkpoint": trainer.checkpoint_callback.best_model_path or None}
    model = model.cpu().eval()
    remove_experts(model)
    test = None
    if cfg.test and trainer.is_global_zero:
        # Under DDP every rank holds the same expert; rank 0 alone evaluates it (the others would repeat the work,
        # and only rank 0 stores the expert).
        test = report["test"] = evaluate_on_test_split(base, keep.tensors, lora.hyperparameters(), cfg.data,
                                                       cfg.languages, limit=cfg.test_limit,
                                                       batch_size=cfg.batch_size, progress=cfg.progress)
        report["seconds"]["test"] = round(time.time() - trained, 1)
    manifest = expert_manifest(base, cfg.languages, lora, keep, data, lr=cfg.lr, schedule=cfg.schedule, test=test,
                               parents=parents)
    return Expert(keep.tensors, manifest), report


def expert_manifest(base, languages: Sequence[str], lora: LoraExpertConfig, keep: KeepBestExpert, data,
                    *, lr: float, schedule: str, test: dict | None = None, parents: Sequence[dict] = ()) -> dict:
    """The manifest of an expert trained by this recipe (``train_lora_expert`` and ``whisper-experts lightning``).

    Args:
        base: the ``registry.bases.Base`` it was trained on.
        languages: Whisper codes the expert serves.
        lora: the expert's shape.
        keep: the callback that kept the best expert (validation WER, epochs run, best epoch).
        data: the ``ExpertDataModule`` it was trained on (corpora, split sizes, batch size, seed, augmentation).
        lr, schedule: optimizer settings recorded as hyperparameters.
        test: ``evaluate_on_test_split``'s result, or None when the test split was not evaluated.
        parents: lineage entries (a warm start's expert).
    """
    metrics = {lang: {"validation": {"wer": keep.best_wer if len(languages) == 1 else None}} for lang in languages}
    for lang, row in (test or {}).get("expert", {}).items():
        metrics[lang]["test"] = {k: row[k] for k in ("wer", "cer", "n")}
        metrics[lang]["base_test"] = {k: test["base"][lang][k] for k in ("wer", "cer", "n")}
    from trainers.augment import AugmentConfig

    augment = getattr(data, "augment", None) or AugmentConfig()
    hyper = {**lora.hyperparameters(), "lr": lr, "schedule": schedule, "epochs_run": keep.history[-1]["epoch"] + 1,
             "best_epoch": keep.best_epoch, "batch_size": data.batch_size, "seed": data.seed,
             "augmentation": augment.hyperparameters()}
    if keep.precision:  # the weights differ with it (bf16 autocast against float32), so it is part of the recipe
        hyper["precision"] = keep.precision
    summary = {"corpus": str(data.data), **{f"{k}_{m}": v for k, d in data.summary.items() for m, v in d.items()}}
    summary.update(utterances=data.summary["train"]["utterances"], hours=data.summary["train"]["hours"])
    if getattr(data, "corpora_summary", None):
        # Every training corpus: its weight, utterances, copies (originals + speed/noise) and rows per epoch.
        summary["corpora"] = data.corpora_summary
    return new_manifest("lora", languages, base, hyper, data=summary, metrics=metrics,
                        lineage={"parents": list(parents)})


def evaluate_on_test_split(base, tensors: dict[str, torch.Tensor], hyperparameters: dict, data: str,
                           languages: Sequence[str], *, limit: int | None = None, batch_size: int = 16,
                           progress: bool = True) -> dict:
    """Test-split WER of the base alone and with the expert (same utterances, same decoding).

    ``base.model`` must carry no expert; it is left without one.

    Returns:
        ``{"base": {lang: row}, "expert": {lang: row}, "paired": {lang: difference}, "guard": ...}``, rows as
        in ``inference.evaluation``; ``paired`` is the expert's WER minus the base's with its paired-bootstrap
        95% interval and p-value (:func:`inference.evaluation.paired_comparison`).
    """
    from trainers.corpus.loading import load_corpus
    from inference.evaluation import DecodeOptions, evaluate, paired_comparison, utterances_from_dataset

    utts = utterances_from_dataset(load_corpus(data)["test"], languages, limit)
    opts = DecodeOptions(batch_size=batch_size)
    base_report = evaluate(base.model, base.processor, utts, opts, progress=progress)
    out = {"base": base_report.as_dict()["languages"]}
    attach_expert(base.model, tensors, hyperparameters, DEFAULT_ADAPTER)
    report = evaluate(base.model, base.processor, utts, opts, progress=progress)
    out["expert"] = report.as_dict()["languages"]
    out["paired"] = paired_comparison(base_report, report)
    out["guard"] = report.guard
    remove_experts(base.model)
    return out


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
