"""The Lightning module of a full or partial fine-tune stored as a ``task_vector`` expert.

Task arithmetic with support languages was introduced on fully fine-tuned small Whispers; this module trains
the weight matrices themselves (those a LoRA expert of the same :class:`~lora_experts.config.LoraExpertConfig`
would adapt: decoder, top encoder layers or both, attention and/or feed-forward), and the expert it yields is the
difference ``fine-tuned - base`` of exactly those parameters. Loss, validation WER, encoder caching, optimizer
and schedule are :class:`~trainers.lora_module.LoraExpertModule`'s. Checkpoints hold the trained matrices only.
"""

from __future__ import annotations

import re

import lightning as L
import torch
from torch import nn

from lora_experts.config import LoraExpertConfig
from trainers.lora_module import LoraExpertModule


def finetuned_parameters(model: nn.Module, config: LoraExpertConfig, biases: bool = True) -> list[str]:
    """Names of the parameters a fine-tune of ``config``'s region trains: the weights (and biases) of the linear
    layers a LoRA expert of that config would adapt, in model order.

    Raises:
        ValueError: the region holds no linear layer of this model.
    """
    pattern = re.compile(config.target_regex())
    names = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern.fullmatch(path):
            names.append(f"{path}.weight")
            if biases and module.bias is not None:
                names.append(f"{path}.bias")
    if not names:
        raise ValueError(f"no linear layer of this model matches the fine-tune region (side {config.side}, modules "
                         f"{', '.join(config.target_modules)})")
    return names


class FullFinetuneModule(LoraExpertModule):
    """Fine-tunes the matrices of one region of a Whisper; everything else stays frozen.

    Args:
        model: the base ``WhisperForConditionalGeneration``; its region's parameters are trained in place (keep
            the base elsewhere if you need it afterwards: :meth:`expert_tensors` holds the deltas).
        processor: its ``WhisperProcessor``.
        config: the region (``side``, ``encoder_start``, ``target_modules``, cross-attention); rank and alpha
            are unused.
        biases: train the biases of those layers too.
        lr: peak learning rate (AdamW); full fine-tunes want ~1e-5..1e-4, far below LoRA's.
        weight_decay, warmup_steps, schedule, label_smoothing, val_max_new_tokens: as ``LoraExpertModule``.
    """

    def __init__(self, model, processor, config: LoraExpertConfig = LoraExpertConfig(), biases: bool = True,
                 lr: float = 3e-5, weight_decay: float = 0.0, warmup_steps: int = 10, schedule: str = "linear",
                 label_smoothing: float = 0.0, val_max_new_tokens: int = 128):
        L.LightningModule.__init__(self)  # not LoraExpertModule's: that one injects a LoRA adapter
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                                   "schedule": schedule, "label_smoothing": label_smoothing,
                                   "val_max_new_tokens": val_max_new_tokens, "biases": biases})
        self.model, self.processor, self.config = model, processor, config
        self.strict_loading = False  # checkpoints carry the trained matrices only
        self._val_rows: dict[int, tuple[str, str]] = {}
        model.requires_grad_(False)
        self.names = finetuned_parameters(model, config, biases)
        params = dict(model.named_parameters())
        # The base values, to take the difference from; kept on CPU (the model may move to a GPU).
        self._base = {n: params[n].detach().to("cpu", copy=True) for n in self.names}
        for n in self.names:
            params[n].requires_grad_(True)
        self.model.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trained = {f"model.{n}" for n in self.names}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Parameter name -> ``fine-tuned - base`` (CPU float32): what ``KeepBestExpert`` keeps."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().float().cpu() - self._base[n].float() for n in self.names}

    def restore_base(self) -> None:
        """Put the base values back into the model (bit-exact), e.g. to evaluate the base afterwards."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, value in self._base.items():
                params[n].copy_(value.to(params[n].device))
                params[n].requires_grad_(False)
