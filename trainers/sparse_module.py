"""The Lightning module that fine-tunes a sparse expert: only the masked entries of frozen Whisper weights train.

It is :class:`~trainers.lora_module.LoraExpertModule` with the LoRA adapter replaced by sparse parametrizations
(``lora_experts.sparse_layer``): the same loss (cross-entropy on transcript tokens, cached encoder outputs when
the mask leaves the encoder alone), the same validation WER each epoch, the same optimizer and schedule over the
trainable tensors (here the masked values alone). Checkpoints hold the masks and values only, never the base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning as L
import torch
from torch.nn.utils import parametrize

from lora_experts.config import LoraExpertConfig
from lora_experts.sparse_layer import add_trainable_sparse, trained_values
from lora_experts.task_vectors import Delta, dense
from trainers.lora_module import LoraExpertModule


def mask_region(names: Iterable[str]) -> LoraExpertConfig:
    """The part of Whisper masks over ``names`` (parameter names) touch, as the data module needs it:
    ``side`` and, on the encoder, the lowest adapted layer (``encoder_start``; the layers below are cached)."""
    encoder = [n for n in names if n.startswith("model.encoder.")]
    decoder = any(n.startswith("model.decoder.") for n in names)
    if not encoder:
        return LoraExpertConfig(side="decoder")
    layers = [int(n.split(".")[3]) for n in encoder if n.startswith("model.encoder.layers.")]
    start = min(layers) if len(layers) == len(encoder) else 0  # convolutions / positions: run the whole encoder
    return LoraExpertConfig(side="both" if decoder else "encoder", encoder_start=start)


class SparseExpertModule(LoraExpertModule):
    """Sparse fine-tuning of chosen entries of a frozen base Whisper.

    Args:
        model: the base ``WhisperForConditionalGeneration`` (frozen here).
        processor: its ``WhisperProcessor``.
        masks: parameter name -> ascending flat indices to train; may be given later with :meth:`set_masks`
            (e.g. after :meth:`gradient_importance` scored a phase-1 delta on this module's loss).
        lr, weight_decay, warmup_steps, schedule, label_smoothing, val_max_new_tokens: as ``LoraExpertModule``.
    """

    def __init__(self, model, processor, masks: Mapping[str, torch.Tensor] | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 10, schedule: str = "linear",
                 label_smoothing: float = 0.0, val_max_new_tokens: int = 128):
        L.LightningModule.__init__(self)  # not LoraExpertModule's: that one injects a LoRA adapter
        # Given explicitly: Lightning's frame inspection finds no ``__class__`` cell here (no bare ``super()``).
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                                   "schedule": schedule, "label_smoothing": label_smoothing,
                                   "val_max_new_tokens": val_max_new_tokens})
        self.model, self.processor = model, processor
        self.config = LoraExpertConfig(side="decoder")
        self.strict_loading = False  # checkpoints carry the sparse values only
        self._val_rows: dict[int, tuple[str, str]] = {}
        model.requires_grad_(False)
        if masks:
            self.set_masks(masks)

    def set_masks(self, masks: Mapping[str, torch.Tensor], region: LoraExpertConfig | None = None) -> list[str]:
        """Make the masked entries trainable (values start at 0: the model starts as the base).

        Args:
            region: where the batches' cached encoder states come from (``mask_region`` of the names the data
                module was set up for); default the masks' own region.
        """
        self.config = region or mask_region(masks)
        names = add_trainable_sparse(self.model, masks)
        self.model.train()
        return names

    def validation_step(self, batch, batch_idx):
        # Decoding reads every weight once per generated token: compute each W0 + scatter(values) once per batch.
        with parametrize.cached():
            return super().validation_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if ".parametrizations." in k and not k.endswith(".original")}

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its trained values (CPU float32), what ``KeepBestExpert`` keeps."""
        return trained_values(self.model)

    def gradient_importance(self, batches: Iterable[dict], task_vector: Mapping[str, Delta],
                            max_batches: int = 4) -> dict[str, torch.Tensor]:
        """``sum_batches |grad * dW|`` per entry, gradients of this module's loss at the weights ``W0 + dW``.

        Call before :meth:`set_masks`. The weights are restored exactly afterwards.

        Args:
            batches: training batches (a data loader).
            task_vector: parameter name -> the phase-1 delta (dense or low-rank).
            max_batches: how many batches to accumulate over.
        """
        params = dict(self.model.named_parameters())
        deltas = {n: dense(d).to(params[n].device, torch.float32) for n, d in task_vector.items()}
        saved = {n: params[n].detach().clone() for n in deltas}
        scores = {n: torch.zeros_like(d) for n, d in deltas.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for n, d in deltas.items():
                    params[n].add_(d.to(params[n].dtype))
                    params[n].requires_grad_(True)
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                batch = {k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                self.model.zero_grad(set_to_none=True)
                self._loss(batch).backward()
                for n, d in deltas.items():
                    scores[n] += (params[n].grad.float() * d).abs()
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)
                    params[n].requires_grad_(False)
                    params[n].grad = None
            self.model.train(was_training)
        return scores
