"""Weight deltas: the types a task vector is made of, the LoRA expert's delta, and adding deltas to a model.

A delta is a dense tensor or a :class:`LowRank` ``scale * B @ A`` (kept factored); a task vector maps Whisper
parameter names to deltas (see :mod:`lora_experts.task_vectors`, which re-exports everything here). These are the
pieces the expert kinds table (:mod:`lora_experts.kinds`) builds on, so they sit below it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lora_experts.model import lora_modules


@dataclass(frozen=True)
class LowRank:
    """An exact low-rank delta ``scale * B @ A``.

    Attributes:
        A: (rank, in_features).
        B: (out_features, rank).
        scale: LoRA's ``alpha / rank`` (1.0 for factors that already carry it).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def dim(self) -> int:
        return 2

    def dense(self) -> torch.Tensor:
        """``scale * B @ A`` as an (out, in) tensor in the factors' dtype (computed in float32)."""
        b, a = self.B.float(), self.A.float()
        out = (b * self.scale if self.scale != 1.0 else b) @ a
        return out.to(self.A.dtype)

    def to(self, *args, **kwargs) -> LowRank:
        return LowRank(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs), self.scale)


Delta = torch.Tensor | LowRank
TaskVector = dict[str, Delta]


def dense(delta: Delta) -> torch.Tensor:
    """A delta as a dense tensor."""
    return delta.dense() if isinstance(delta, LowRank) else delta


def dense_task_vector(task_vector: Mapping[str, Delta]) -> dict[str, torch.Tensor]:
    """Every entry of ``task_vector`` as a dense tensor."""
    return {k: dense(v) for k, v in task_vector.items()}


def lora_scale(hyperparameters: Mapping, module: str, rank: int) -> float:
    """The LoRA scaling ``alpha / rank`` of ``module``, read exactly as ``attach_expert`` (peft) applies it.

    Args:
        hyperparameters: a LoRA manifest's ``alpha`` (default: ``rank``, then 8) and optional ``alpha_pattern``
            (peft semantics: a key matches a module path that ends in it, as a regex).
        module: the module path, e.g. ``model.decoder.layers.0.fc1``.
        rank: that module's LoRA rank (rows of its ``lora_A``).
    """
    alpha = float(hyperparameters.get("alpha", hyperparameters.get("rank", 8)))
    for pattern, value in (hyperparameters.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / rank


def lora_task_vector(tensors: Mapping[str, torch.Tensor], hyperparameters: Mapping, *,
                     as_dense: bool = False) -> TaskVector:
    """The task vector of a LoRA expert: ``<module>.weight`` -> ``(alpha / rank) * B @ A``.

    Args:
        tensors: ``<module>.lora_A`` (rank, in) / ``.lora_B`` (out, rank) matrices (any ranks per module).
        hyperparameters: the expert manifest's ``hyperparameters`` (``alpha``, optional ``alpha_pattern``).
        as_dense: materialise each delta instead of keeping :class:`LowRank` factors.
    """
    out = {}
    for module, rank in sorted(lora_modules(dict(tensors)).items()):
        delta = LowRank(tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"],
                        lora_scale(hyperparameters, module, rank))
        out[f"{module}.weight"] = delta.dense() if as_dense else delta
    return out


def apply_task_vector(model: torch.nn.Module, task_vector: Mapping[str, Delta], scale: float = 1.0) -> None:
    """Add ``scale * delta`` to ``model``'s parameters in place (``scale=-1`` takes it out again, up to rounding).

    Args:
        task_vector: parameter name -> delta; every name must be a parameter of ``model`` with that shape.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in task_vector.items():
            if name not in params or params[name].shape != delta.shape:
                found = tuple(params[name].shape) if name in params else "no such parameter"
                raise ValueError(f"task vector entry {name} of shape {tuple(delta.shape)} does not fit this model "
                                 f"({found}); it was made for another Whisper size")
            p = params[name]
            p.add_((dense(delta).to(p.device, torch.float32) * scale).to(p.dtype))

