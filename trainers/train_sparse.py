"""Recipe: a sparse language expert by two-phase (lottery-ticket) sparse fine-tuning.

Phase 1 trains a LoRA expert for the language with ``train_lora_expert`` (decoder-only by default, so the encoder
cache applies) and takes its task vector ``dW = (alpha / r) B A`` per adapted matrix; or it takes the task vector
of an existing expert (``mask_from``). The mask keeps the ``1 - sparsity`` fraction of those matrices' entries
with the highest score: ``|dW|``, or ``sum |grad * dW|`` over a few training batches (``mask_score="gradient"``).
Phase 2 resets to the base and fine-tunes only the masked entries of the weights themselves (``W = W0 +
scatter(values)``, the values the only trainable tensor) on the same data, with validation WER every epoch;
the values of the best epoch are kept, the expert is tested beside the base, and returned as a ``sparse``
expert whose manifest records the sparsity, the mask's choice, both phases' hyperparameters, the data, the
metrics and, as lineage, the phase-1 expert.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence, get_args

import lightning as L
import torch

from lora_experts.sparse import SparseDelta, sparse_expert, sparse_size
from lora_experts.sparse_layer import remove_trainable_sparse
from lora_experts.sparse_masks import magnitude_scores, top_k_masks
from lora_experts.task_vectors import task_vector
from registry.expert_file import Expert, check_compatible, save_expert
from trainers.configs import MaskScore, SparseTrainConfig
from trainers.train_lora import (KeepBestExpert, expert_data, expert_manifest, expert_trainer,
                                 load_checked_base, train_lora_expert)

MASK_SCORES = get_args(MaskScore)


def _phase1(cfg: SparseTrainConfig, given: Expert | None, name: str | None) -> tuple[Expert, dict, dict]:
    """(the expert whose delta picks the mask, its lineage entry, phase-1 report)."""
    from registry.packs import tensor_digest

    if given is not None:
        expert, source, report = given, name or "(in memory)", {}
    elif cfg.mask_from:
        from trainers.train_lora import _resolve_expert

        expert, source, report = _resolve_expert(cfg.mask_from), cfg.mask_from, {}
    else:
        expert, report = train_lora_expert(cfg.phase1())
        path = Path(cfg.run_dir) / "phase1" / "lora.safetensors"
        if report.get("rank", 0) == 0:
            save_expert(expert, path)
        source = str(path)
    parent = {"expert": source, "kind": expert.kind, "languages": expert.languages, "role": "mask (phase 1)",
              "digest": tensor_digest(expert.tensors), "hyperparameters": expert.manifest.get("hyperparameters", {})}
    if report:
        parent["validation_wer"] = report.get("best_val_wer")
    return expert, parent, report


def train_sparse_expert(cfg: SparseTrainConfig, phase1: Expert | None = None,
                        phase1_name: str | None = None) -> tuple[Expert, dict]:
    """Select a mask from a phase-1 delta, fine-tune the masked entries, test, and describe a sparse expert.

    Args:
        cfg: the run (see :class:`SparseTrainConfig`).
        phase1: an expert already trained for these languages on this base whose delta picks the mask (skips
            phase 1; e.g. the LoRA expert a benchmark compares against); ``phase1_name`` names it in the lineage.

    Returns:
        (the ``sparse`` expert, a report with ``phase1`` (its report when trained here), phase 2's ``history``,
        ``best_epoch``, ``best_val_wer``, ``seconds`` per phase, ``size`` (``sparse_size`` totals), ``test``).
    """
    from lightning.pytorch.loggers import CSVLogger

    from trainers.sparse_module import SparseExpertModule, mask_region

    t0 = time.time()
    source, parent, phase1_report = _phase1(cfg, phase1, phase1_name)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t1 = time.time()
    base, _, _, _ = load_checked_base(cfg.base, cfg.languages, cfg.lora())
    check_compatible(source.manifest, base, what=f"phase-1 expert {parent['expert']}")
    delta = task_vector(source)
    model = base.model
    region = mask_region(delta)
    module = SparseExpertModule(model, base.processor, lr=cfg.sparse_lr, weight_decay=cfg.weight_decay,
                                warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                label_smoothing=cfg.label_smoothing, val_max_new_tokens=cfg.val_max_new_tokens)
    data = expert_data(cfg, base, region.touches_encoder, region.encoder_start)
    if cfg.mask_score == "gradient":
        if torch.cuda.is_available():
            model.cuda()
        scores = module.gradient_importance(data.train_dataloader(), delta, cfg.score_batches)
        model.cpu()
    else:
        scores = magnitude_scores(delta)
    masks = top_k_masks(scores, 1 - cfg.sparsity, cfg.mask_scope)
    del scores
    module.set_masks(masks, region)
    prepared = time.time()

    run_dir = Path(cfg.run_dir) / "phase2"
    keep = KeepBestExpert()
    trainer = expert_trainer(cfg, run_dir, keep, [CSVLogger(run_dir, name="logs")])
    trainer.fit(module, datamodule=data)
    if keep.tensors is None:  # max_steps ended training before an epoch's validation: validate once
        trainer.validate(module, datamodule=data, verbose=False)
    if keep.tensors is None:
        raise RuntimeError("phase 2 produced no validated expert (no validation epoch ran); raise --epochs")
    trained = time.time()

    model = model.cpu().eval()
    remove_trainable_sparse(model)
    params = dict(model.named_parameters())
    deltas = {n: SparseDelta(idx, keep.tensors[n].to(params[n].dtype), params[n].shape) for n, idx in masks.items()}
    candidates = sum(params[n].numel() for n in delta)
    kept = sum(idx.numel() for idx in masks.values())
    hyper = {"sparsity": cfg.sparsity, "sparsity_achieved": 1 - kept / candidates, "candidate_entries": candidates,
             "mask_scope": cfg.mask_scope, "mask_score": cfg.mask_score, "lr": cfg.sparse_lr,
             "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay,
             "epochs_run": keep.history[-1]["epoch"] + 1, "best_epoch": keep.best_epoch,
             "batch_size": cfg.batch_size, "seed": cfg.seed,
             "phase1": {**parent["hyperparameters"], **({"lr": cfg.lr} if phase1_report else {})}}
    if cfg.mask_score == "gradient":
        hyper["score_batches"] = cfg.score_batches
    lineage = {"parents": [{k: v for k, v in parent.items() if k != "hyperparameters"}],
               "method": "lottery-ticket sparse fine-tuning"}
    expert = sparse_expert(deltas, languages=cfg.languages, base=base, hyperparameters=hyper, lineage=lineage)
    report = {"phase1": phase1_report, "history": keep.history, "best_epoch": keep.best_epoch,
              "best_val_wer": keep.best_wer, "rank": trainer.global_rank, "world_size": trainer.world_size,
              "seconds": {"phase1": round(t1 - t0, 1), "prepare": round(prepared - t1, 1),
                          "train": round(trained - prepared, 1)}}
    test = None
    if cfg.test and trainer.is_global_zero:
        test = report["test"] = evaluate_expert_on_test_split(base, expert, cfg.data, cfg.languages,
                                                              limit=cfg.test_limit, batch_size=cfg.batch_size,
                                                              progress=cfg.progress)
        report["seconds"]["test"] = round(time.time() - trained, 1)
    described = expert_manifest(base, cfg.languages, region, keep, data, lr=cfg.sparse_lr, schedule=cfg.schedule,
                                test=test)
    expert.manifest.update(data=described["data"], metrics=described["metrics"])
    report["size"] = {k: v for k, v in sparse_size(expert).items() if k != "parameters"}
    return expert, report


def evaluate_expert_on_test_split(base, expert: Expert, data: str, languages: Sequence[str], *,
                                  limit: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """Test-split WER of the base alone and with ``expert`` applied (any kind ``expert_applied`` takes).

    Returns:
        ``{"base": {lang: row}, "expert": {lang: row}, "guard": ...}``, rows as in ``inference.evaluation``.
    """
    from trainers.corpus.loading import load_corpus
    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset
    from inference.language_matrix import expert_applied

    utts = utterances_from_dataset(load_corpus(data)["test"], languages, limit)
    opts = DecodeOptions(batch_size=batch_size)
    out = {"base": evaluate(base.model, base.processor, utts, opts, progress=progress).as_dict()["languages"]}
    with expert_applied(base.model, expert):
        report = evaluate(base.model, base.processor, utts, opts, progress=progress)
    out["expert"], out["guard"] = report.as_dict()["languages"], report.guard
    return out
