"""Recipe: a full or partial fine-tune of a Whisper, stored as a ``task_vector`` expert (fine-tuned - base).

The task-arithmetic-with-support-languages work fine-tunes small Whispers fully and adds their task vectors;
this recipe gives the fusion code that input. The region trained is chosen like a LoRA expert's (``side``,
``encoder_start``, ``target_modules``, cross-attention): the decoder's linear layers by default (the encoder
cache applies), the top encoder layers too with ``side="both", encoder_start=K``. Everything else of
:func:`trainers.train_lora.train_lora_expert` is the same: validation WER every epoch, the best epoch kept,
early stopping, CSV logs, test split beside the base, the full manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from lora_experts.task_vectors import expert_from_task_vector
from registry.expert_file import Expert
from trainers.configs import FullTrainConfig
from trainers.train_lora import (KeepBestExpert, expert_data, expert_manifest, expert_trainer,
                                 load_checked_base)


def train_full_expert(cfg: FullTrainConfig) -> tuple[Expert, dict]:
    """Fine-tune the region, select by validation WER, test, and describe the ``task_vector`` expert.

    Returns:
        (the expert, a report with the per-epoch ``history``, ``best_epoch``, ``best_val_wer``, ``seconds``,
        ``rank``, ``parameters`` (entries trained) and ``test`` when evaluated).
    """
    from lightning.pytorch.loggers import CSVLogger

    from trainers.finetune_module import FullFinetuneModule

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.time()
    region = cfg.lora()
    base, region, _, _ = load_checked_base(cfg.base, cfg.languages, region)
    module = FullFinetuneModule(base.model, base.processor, region, biases=cfg.biases, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                label_smoothing=cfg.label_smoothing, val_max_new_tokens=cfg.val_max_new_tokens)
    data = expert_data(cfg, base, region.touches_encoder, region.encoder_start)
    prepared = time.time()

    run_dir = Path(cfg.run_dir)
    keep = KeepBestExpert()
    # No checkpoints: a fine-tune's checkpoint is the size of the region (tens of MB per epoch); the best epoch's
    # deltas are kept in memory by KeepBestExpert and written once as the expert.
    trainer = expert_trainer(cfg, run_dir, keep, [CSVLogger(run_dir, name="logs")], checkpoints=False)
    trainer.fit(module, datamodule=data)
    if keep.tensors is None:  # max_steps ended training before an epoch's validation: validate once
        trainer.validate(module, datamodule=data, verbose=False)
    if keep.tensors is None:
        raise RuntimeError("the fine-tune produced no validated expert (no validation epoch ran); raise --epochs")
    trained = time.time()

    expert, test = finetune_expert(module, base, keep, data, cfg.languages, mode="fine-tune", biases=cfg.biases,
                                   lr=cfg.lr, schedule=cfg.schedule, batch_size=cfg.batch_size, seed=cfg.seed,
                                   lineage={"parents": [], "method": "fine-tune"},
                                   test_data=cfg.data if cfg.test and trainer.is_global_zero else None,
                                   test_limit=cfg.test_limit, progress=cfg.progress)
    report = {"history": keep.history, "best_epoch": keep.best_epoch, "best_val_wer": keep.best_wer,
              "rank": trainer.global_rank, "world_size": trainer.world_size,
              "parameters": sum(t.numel() for t in keep.tensors.values()),
              "seconds": {"prepare": round(prepared - t0, 1), "train": round(trained - prepared, 1)}}
    if test is not None:
        report["test"] = test
        report["seconds"]["test"] = round(time.time() - trained, 1)
    return expert, report


def finetune_expert(module, base, keep, data, languages, *, mode: str, biases: bool, lr: float, schedule: str,
                    batch_size: int, seed: int, lineage: dict, test_data: str | None = None,
                    test_limit: int | None = None, progress: bool = True, **extra) -> tuple[Expert, dict | None]:
    """The ``task_vector`` expert of a trained fine-tune module (its best epoch, kept by ``keep``), with the base
    put back in the model; tested on ``test_data``'s test split when given. Shared by the fine-tune recipe and
    the distilled full student (``mode`` and ``extra`` hyperparameters tell them apart).

    Returns:
        (the expert, its test results or None).
    """
    from trainers.train_sparse import evaluate_expert_on_test_split

    base.model.cpu().eval()
    module.restore_base()
    hyper = {**module.config.hyperparameters(), "mode": mode, "biases": biases, "lr": lr, "schedule": schedule,
             "epochs_run": keep.history[-1]["epoch"] + 1, "best_epoch": keep.best_epoch, "batch_size": batch_size,
             "seed": seed, **extra}
    for unused in ("rank", "alpha", "dropout"):
        hyper.pop(unused, None)
    expert = expert_from_task_vector(keep.tensors, languages=languages, base=base, hyperparameters=hyper,
                                     lineage=lineage)
    test = None
    if test_data is not None:
        test = evaluate_expert_on_test_split(base, expert, test_data, languages, limit=test_limit,
                                             batch_size=batch_size, progress=progress)
    described = expert_manifest(base, languages, module.config, keep, data, lr=lr, schedule=schedule, test=test)
    expert.manifest.update(data=described["data"], metrics=described["metrics"])
    return expert, test
