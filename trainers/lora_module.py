"""The Lightning module that trains a LoRA language expert on a frozen Whisper.

Training minimizes cross-entropy on the transcript tokens (prompt targets masked, optional label
smoothing). Validation computes the loss and, each epoch, greedy transcripts of the validation set scored
with normalized WER (``val_wer``, what checkpointing and early stopping watch). Checkpoints hold the expert's
LoRA matrices only, never the frozen base. Under DDP each rank decodes its share of the validation set and the
WER is computed over the union, so every rank logs the same ``val_wer``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from transformers.modeling_outputs import BaseModelOutput

from inference.decoding import transcribe_batch
from inference.evaluation import error_rates
from lora_experts.config import LoraExpertConfig
from lora_experts.model import DEFAULT_ADAPTER, add_trainable_expert, attach_expert, expert_tensors
from trainers.data import IGNORE, cached_encoder_states
from trainers.distributed import gather_union


def lr_lambda(total: int, warmup: int, schedule: str):
    """Linear warm-up over ``warmup`` steps, then ``linear`` / ``cosine`` decay to 0 at ``total``, or ``constant``."""
    warmup = min(warmup, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)

    return factor


class LoraExpertModule(L.LightningModule):
    """A LoRA expert on a frozen base Whisper.

    Args:
        model: the base ``WhisperForConditionalGeneration`` (frozen here).
        processor: its ``WhisperProcessor``.
        config: the expert's shape.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay on the LoRA matrices.
        warmup_steps: linear warm-up steps; then the ``schedule`` decays to 0 over the remaining steps.
        schedule: ``linear``, ``cosine`` or ``constant``.
        label_smoothing: cross-entropy label smoothing.
        init_from: (tensors, hyperparameters) of an expert to start from (warm start); else B = 0.
        val_max_new_tokens: bound for validation decoding.
    """

    def __init__(self, model, processor, config: LoraExpertConfig = LoraExpertConfig(), lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 10, schedule: str = "linear",
                 label_smoothing: float = 0.0, init_from: tuple[dict, dict] | None = None,
                 val_max_new_tokens: int = 128):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "processor", "init_from"])
        self.model, self.processor, self.config = model, processor, config
        if init_from is None:
            add_trainable_expert(model, config, DEFAULT_ADAPTER)
        else:
            model.requires_grad_(False)
            attach_expert(model, init_from[0], {**init_from[1], "dropout": config.dropout}, DEFAULT_ADAPTER,
                          trainable=True)
        self.strict_loading = False  # checkpoints carry the expert only
        self.model.train()  # bases load in eval mode; LoRA dropout needs train mode (see on_train_epoch_start)
        self._val_rows: dict[int, tuple[str, str]] = {}  # validation row index -> (reference, hypothesis)

    def on_train_epoch_start(self):
        # Bases load in eval mode and Lightning keeps submodule modes; LoRA dropout needs train mode (Whisper's
        # own dropout probabilities are 0, so nothing else changes).
        self.model.train()
        # Lightning sets the epoch of plain samplers only; ours is the batch sampler. Every rank sets the same
        # epoch, so all agree on the shuffle (and a resumed run replays the right order).
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------ steps
    def _encoder_states(self, batch) -> torch.Tensor | None:
        """Encoder outputs from the cache, or the adapted top layers run on cached layer inputs (else None)."""
        return cached_encoder_states(self.model.model.encoder, batch, self.config.encoder_start, self.dtype)

    def _logits(self, batch) -> torch.Tensor:
        states = self._encoder_states(batch)
        if states is not None:
            enc = BaseModelOutput(last_hidden_state=states)
            out = self.model(encoder_outputs=enc, decoder_input_ids=batch["decoder_input_ids"])
        else:
            out = self.model(input_features=batch["input_features"].to(self.dtype),
                             decoder_input_ids=batch["decoder_input_ids"])
        return out.logits

    def _loss(self, batch) -> torch.Tensor:
        logits = self._logits(batch)
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"],
                                                 ignore_index=IGNORE, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0], sync_dist=True)
        kwargs = {}
        states = self._encoder_states(batch)
        if states is not None:
            kwargs["encoder_hidden_states"] = states
        else:
            kwargs["features"] = batch["input_features"].to(self.dtype)
        out = transcribe_batch(self.model, self.processor, languages=batch["language"],
                               max_new_tokens=self.hparams.val_max_new_tokens, **kwargs)
        for i, ref, hyp in zip(batch["index"].tolist(), batch["text"], out.texts):
            self._val_rows[i] = (ref, hyp)

    def on_validation_epoch_end(self):
        # Under DDP each rank decoded its share of the validation set (plus a few repeats that make the shares
        # equal): score the union, keyed by row, so every rank logs the same WER over the whole set and
        # checkpointing and early stopping decide alike.
        rows = gather_union(self._val_rows) if self.trainer.world_size > 1 else self._val_rows
        if rows:
            refs, hyps = zip(*(rows[i] for i in sorted(rows)))
            rates = error_rates(list(refs), list(hyps))
            # Identical on every rank already; sync_dist with "max" keeps the figure exact (and Lightning quiet).
            for key in ("wer", "cer"):
                value = rates[key] if not math.isnan(rates[key]) else 1.0
                self.log(f"val_{key}", value, prog_bar=key == "wer", sync_dist=True, reduce_fx="max")
        self._val_rows = {}

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = lr_lambda(total, self.hparams.warmup_steps, self.hparams.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: the expert only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """The expert's current LoRA matrices (CPU float32)."""
        return expert_tensors(self.model, DEFAULT_ADAPTER)
