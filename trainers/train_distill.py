"""Recipe: distillation into language experts, with Lightning.

Three students:

* ``kind="clsr"`` (DistilWhisper): the base converted to CLSR with a path and gate per language, trained on
  one-language batches with CE + gate budget (+ KD from a teacher); one ``clsr`` expert per language, each from
  its own best validation epoch (:mod:`trainers.clsr_experts`).
* ``kind="lora"`` (the LoRA-language-experts recipe): one LoRA expert serving all the languages, taught by
  the teachers, typically one LoRA language expert per language (``--teachers uk-espeak,ru-espeak``).
* ``kind="full"`` (distil-whisper's student): the region's weights themselves (the decoder by default) trained
  against the teachers, stored as a ``task_vector`` expert of the student base: how a student cut from a larger
  Whisper (``whisper-experts base shrink``) relearns its shared weights before language experts go on it.

The teacher is a spec (:mod:`distill.teachers`): any Whisper the base loader can load, or a base plus an expert;
it is read online (a teacher forward per step) or from a top-k cache filled once (``teacher_cache``). Without a
teacher, a CLSR student trains with CE + gate budget only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import get_args

import lightning as L

from registry.expert_file import Expert
from trainers.configs import (  # noqa: F401
    DistillConfig, DistillKind, default_lr, default_precision, loss_config, progress_bar_callbacks)

log = logging.getLogger(__name__)
KINDS = get_args(DistillKind)


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
                        progress: bool = True, precision: str | None = None):
    """The teacher source of a run: None without teachers, a cached source with ``cache``, else online.

    Args:
        student_base: the student's ``registry.bases.Base`` (teachers must share its tokenizer).
        teacher / teachers: one spec for every language, or one per language (see :mod:`distill.teachers`).
        cache: directory of the top-k cache; None reads the teachers online.
        precision: the run's Lightning precision (None: the machine's default); the cache's one-time scoring pass
            runs under bf16 autocast when it is a bf16 one, in float32 otherwise, as the training steps do.
    """
    from distill.sources import CachedTeacher, OnlineTeacher
    from distill.teacher_cache import TeacherCache
    from distill.teachers import load_teachers

    if not teacher and not teachers:
        return None
    loaded = load_teachers(teacher or list(teachers), student_base, default_base=teacher_base, registry=registry,
                           device="cpu")
    if cache:
        bf16 = (precision or default_precision()).startswith("bf16")
        return CachedTeacher(loaded, TeacherCache(cache, top_k), batch_size=batch_size, progress=progress,
                             precision="bf16" if bf16 else "32")
    return OnlineTeacher(loaded)


def make_trainer(cfg: DistillConfig, callbacks: list) -> L.Trainer:
    """The run's Trainer: best-by-``val_wer`` checkpoint and ``last.ckpt`` (what ``--resume`` continues from), early
    stopping, CSV (+ TensorBoard) logs under run_dir (the checkpoints in the CSV log's version folder,
    ``run_dir/logs/version_N/checkpoints``: one folder per run)."""
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    from trainers.train_lora import best_and_last_checkpoints

    run_dir = Path(cfg.run_dir)
    callbacks = [*callbacks, best_and_last_checkpoints(),
                 EarlyStopping(monitor="val_wer", mode="min", patience=cfg.patience,
                               check_on_train_epoch_end=False), *progress_bar_callbacks(cfg.progress)]
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
        precision=cfg.precision or default_precision(), callbacks=callbacks,
        logger=loggers, strategy=strategy, devices=cfg.devices, enable_progress_bar=cfg.progress, log_every_n_steps=1,
        num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False, default_root_dir=run_dir)


def train_distilled(cfg: DistillConfig) -> tuple[list[Expert], dict]:
    """Train a distilled student and return its experts (one per language for CLSR, one for LoRA) and a report.

    Under DDP every rank returns the same experts; only rank 0 evaluates the test split (``report["rank"]``).

    Returns:
        (experts, report with the per-epoch history, best epochs, the teacher source's report, timings, test).
    """
    from trainers.language_batches import DistillDataModule
    from trainers.train_lora import fit, load_checked_base, resume_checkpoint

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.time()
    lora = cfg.lora()
    base, lora, _, _ = load_checked_base(cfg.base, (), lora)
    if cfg.kind == "clsr":  # a negative --encoder-start counts from the top of this base's encoder
        cfg = replace(cfg, encoder_start=cfg.clsr().for_encoder(base.model.config.encoder_layers).encoder_start)
    source = load_teacher_source(base, teacher=cfg.teacher, teachers=cfg.teachers, teacher_base=cfg.teacher_base,
                                 registry=cfg.registry, cache=cfg.teacher_cache, top_k=cfg.top_k,
                                 batch_size=cfg.batch_size, progress=cfg.progress, precision=cfg.precision)
    languages = list(cfg.languages) or (source.teachers.languages if source is not None else [])
    if not languages:
        raise ValueError("no --languages given (and no --teachers whose experts name their languages)")
    _check_languages(base, languages)
    if source is not None:
        source.teachers.check_covers(languages)
    cache, layer = encoder_cache_plan(cfg.clsr() if cfg.kind == "clsr" else lora, source)
    cache = cache and cfg.cache_encoder
    data_options = dict(max_train=cfg.max_train, max_validation=cfg.max_validation, seed=cfg.seed,
                        progress=cfg.progress, multilingual=base.multilingual, teacher=source,
                        encoder=base.model.model.encoder if cache else None, encoder_layer=layer,
                        cache_dir=cfg.cache_dir, base_fingerprint=base.fingerprint)
    if cfg.kind == "clsr":
        from trainers.clsr_experts import KeepBestLanguages
        from trainers.clsr_module import ClsrExpertModule

        module = ClsrExpertModule(base.model, base.processor, languages, cfg.clsr(), cfg.loss(), source,
                                  **cfg.optimization())
        # The CLSR layers are in place (the encoder cache below them is the base's): build the data after.
        data = DistillDataModule(cfg.data, base.processor, languages, cfg.batch_size, language_batches=True,
                                 **data_options)
        keep = KeepBestLanguages(languages)
    else:
        from trainers.lora_student import FullStudentModule, LoraStudentModule
        from trainers.train_lora import KeepBestExpert

        student = LoraStudentModule if cfg.kind == "lora" else FullStudentModule
        module = student(base.model, base.processor, lora, teacher=source, loss=cfg.loss(),
                         lr=cfg.learning_rate(), weight_decay=cfg.weight_decay,
                         warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                         val_max_new_tokens=cfg.val_max_new_tokens)
        data = DistillDataModule(cfg.data, base.processor, languages, cfg.batch_size, language_batches=False,
                                 **data_options)
        keep = KeepBestExpert()
    if cfg.resume:  # checked before the data's teacher and encoder passes
        resume_checkpoint(cfg.resume, module, "whisper-experts distill")
    data.setup("fit")
    prepared = time.time()
    trainer = make_trainer(cfg, [keep])
    fit(trainer, module, data, cfg.resume)
    if not keep.history:  # max_steps ended training before an epoch's validation: validate once
        trainer.validate(module, datamodule=data, verbose=False)
    trained = time.time()
    report = {"languages": languages, "history": keep.history, "teacher": data.teacher_report,
              "seconds": {"prepare": round(prepared - t0, 1), "train": round(trained - prepared, 1)},
              "rank": trainer.global_rank, "world_size": trainer.world_size,
              "checkpoint": trainer.checkpoint_callback.best_model_path or None}
    test = cfg.test and trainer.is_global_zero
    if cfg.kind == "clsr":
        from trainers.clsr_experts import clsr_experts

        experts, results = clsr_experts(module, base, keep, data, test=test, test_limit=cfg.test_limit,
                                        batch_size=cfg.batch_size, progress=cfg.progress)
        report["best"] = keep.best
    else:
        make = _lora_expert if cfg.kind == "lora" else _full_expert
        expert, results = make(module, base, keep, data, languages, cfg, test)
        experts = [expert]
        report["best"] = {"epoch": keep.best_epoch, "wer": keep.best_wer}
    for expert in experts:  # the weights differ with it (bf16 autocast against float32), as LoRA's manifest says
        expert.manifest.setdefault("hyperparameters", {}).setdefault("precision", str(trainer.precision))
    if results is not None:
        report["test"] = results
        report["seconds"]["test"] = round(time.time() - trained, 1)
    return experts, report


def _check_languages(base, languages) -> None:
    unknown = [lang for lang in languages if base.multilingual and lang not in base.languages]
    if unknown:
        raise ValueError(f"unknown language(s) {', '.join(unknown)} for {base.name}; see `whisper-experts base info`")


def _full_expert(module, base, keep, data, languages, cfg: DistillConfig, test: bool) -> tuple[Expert, dict | None]:
    """The distilled full student as a ``task_vector`` expert (trained - student base, the region only): the
    fine-tune recipe's expert (:func:`trainers.train_full.finetune_expert`) plus the KD options and the teachers'
    lineage."""
    from trainers.clsr_experts import teacher_lineage
    from trainers.train_full import finetune_expert

    if keep.tensors is None:
        raise RuntimeError("training produced no validated student (no validation epoch ran); raise --epochs")
    loss = module.loss_config
    expert, results = finetune_expert(module, base, keep, data, languages, mode="distilled", biases=True,
                                      lr=cfg.learning_rate(), schedule=cfg.schedule, batch_size=cfg.batch_size,
                                      seed=cfg.seed, lineage=teacher_lineage(module.teacher),
                                      test_data=cfg.data if test else None, test_limit=cfg.test_limit,
                                      progress=cfg.progress, kd=loss.kd, kd_weight=loss.kd_weight,
                                      ce_weight=loss.ce_weight, temperature=loss.temperature,
                                      label_smoothing=loss.label_smoothing)
    expert.manifest["data"]["languages"] = data.summary.get("languages", {})
    return expert, results


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
