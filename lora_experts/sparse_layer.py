"""Training a sparse expert: only the masked entries of frozen Whisper weights are trainable.

Each masked weight is parametrized (``torch.nn.utils.parametrize``) as ``W = W0 + scatter(values)``: ``W0`` stays
the frozen base tensor, ``values`` (one float32 per masked entry, starting at 0, so the model starts as the
base) is the only trainable tensor. The optimizer therefore holds state for the masked entries alone, and
gradients reach nothing else. Removing the parametrizations puts the untouched ``W0`` back (bit-exact base);
:func:`trained_values` reads the values out for ``lora_experts.sparse.sparse_expert``.

Every access to ``W`` recomputes it; wrap decoding in ``torch.nn.utils.parametrize.cached()`` so a generated
sequence computes each weight once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.utils import parametrize


class MaskedDelta(torch.nn.Module):
    """The parametrization ``W0 -> W0 + scatter(values)`` over fixed flat indices.

    Args:
        indices: (n,) ascending flat indices into the weight.
        init: (n,) starting values (default zeros: the base itself).
    """

    def __init__(self, indices: torch.Tensor, init: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("indices", indices.long().clone())
        start = torch.zeros(indices.numel()) if init is None else init.detach().float().clone()
        self.values = torch.nn.Parameter(start)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1).index_add(0, self.indices, self.values.to(weight.dtype))
        return flat.view_as(weight)


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def add_trainable_sparse(model: torch.nn.Module, masks: Mapping[str, torch.Tensor],
                         init: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Freeze ``model`` and make the masked entries of the named weights trainable.

    Args:
        masks: parameter name (``model.decoder.layers.0.fc1.weight``) -> ascending flat indices.
        init: parameter name -> starting values (default zeros).

    Returns:
        The parametrized parameter names, sorted.
    """
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise ValueError(f"mask names parameters this model does not have, e.g. {missing[0]}; it was made for "
                         "another Whisper size")
    model.requires_grad_(False)
    for name, idx in sorted(masks.items()):
        module, attr = _split(name)
        owner = model.get_submodule(module)
        delta = MaskedDelta(idx.to(params[name].device), None if init is None else init.get(name))
        parametrize.register_parametrization(owner, attr, delta.to(params[name].device))
    return sorted(masks)


def _parametrized(model: torch.nn.Module):
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, MaskedDelta):
                        yield (f"{path}.{attr}" if path else attr), module, attr, p


def trained_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> its trained values (CPU float32 copies), in the order of its mask's indices."""
    return {name: p.values.detach().to("cpu", torch.float32).clone() for name, _, _, p in _parametrized(model)}


def trained_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> the flat indices being trained (CPU)."""
    return {name: p.indices.detach().cpu() for name, _, _, p in _parametrized(model)}


def remove_trainable_sparse(model: torch.nn.Module) -> None:
    """Drop every sparse parametrization: each weight is its original, untouched base tensor again."""
    for _, module, attr, _ in list(_parametrized(model)):
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
