"""The batched per-sample LoRA layer: one ``nn.Linear`` carrying N experts, each sample of a batch using its own.

peft's mixed-batch inference (``adapter_names=``) loops over adapters and runs one sub-batch per adapter. Here
the experts of a layer are stacked into two tensors, padded with zeros to the largest rank:

- ``lora_A``: (experts, rank, in_features)
- ``lora_B``: (experts, out_features, rank)

and a batch is routed by a :class:`Routing`: per sample, ``k`` expert indices and ``k`` mixing weights
(``k = 1`` for hard routing; :data:`BASE_ONLY` = -1 means "no expert", the base layer alone). The forward
gathers each sample's matrices and runs two batched matmuls::

    h     = x_n @ [A_e1; ...; A_ek]^T * (w_ni * s_ei)      (n, T, k*rank)   s_e = alpha_e / r_e
    y_n   = W x_n + b + h @ [B_e1, ..., B_ek]^T             (n, T, out_features)

Zero-padded rank rows and columns add exact zeros, so the result equals running sample n alone with its
expert(s). When generation expands a batch of B samples to B * m rows (beam search, ``num_return_sequences``)
transformers repeats each sample consecutively (``repeat_interleave``); the routing follows that expansion.

Sparse experts of the same bank live in the same layer (:attr:`BatchedLoraLinear.sparse`, a
:class:`~inference.batched_sparse.BatchedSparseDelta`): the same routing adds each row's sparse delta
``D_e x`` in one block-diagonal sparse matmul. An expert slot holds LoRA matrices, a sparse delta, or neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from inference.batched_sparse import BatchedSparseDelta
from lora_experts.sparse import SparseDelta

BASE_ONLY = -1  # expert index meaning "no expert": the sample is served by the base model alone


@dataclass
class Routing:
    """Which experts serve each sample of a batch, and with which weights.

    Attributes:
        experts: (batch, k) long, indices into the bank's experts; :data:`BASE_ONLY` for none. None when
            ``uniform`` routes every sample of any batch size.
        weights: (batch, k) float mixing weights (1 for hard routing); may require grad (a learned router).
        uniform: set when every sample uses one expert at weight 1 (or :data:`BASE_ONLY`): the layer then
            runs one plain LoRA matmul, as a single attached expert would.
        version: distinguishes routings, so layers can cache the matrices they gathered for this one.
    """

    experts: torch.Tensor | None
    weights: torch.Tensor | None
    uniform: int | None = None
    version: int = 0
    _expanded: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int | None:
        return None if self.experts is None else self.experts.shape[0]

    def expand(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts, weights) for ``rows`` rows: the routing's batch, each sample repeated ``rows // batch``
        times consecutively (as ``generate`` expands a batch for beams).

        Raises:
            RuntimeError: ``rows`` is not a multiple of the routed batch size.
        """
        if rows not in self._expanded:
            batch = self.batch_size
            if rows % batch:
                raise RuntimeError(
                    f"the routing was set for a batch of {batch} samples, but a layer got {rows} rows; set the "
                    "routing for the batch you run (generate may expand it only by whole repeats per sample, "
                    "e.g. num_beams)")
            repeats = rows // batch
            experts, weights = self.experts, self.weights
            if repeats > 1:
                experts, weights = experts.repeat_interleave(repeats, 0), weights.repeat_interleave(repeats, 0)
            self._expanded[rows] = (experts, weights)
        return self._expanded[rows]


class RoutingState:
    """The routing shared by every batched layer of one model (the bank sets it; layers read it)."""

    def __init__(self):
        self.routing: Routing | None = None


_WRAPPED = "base_layer."


def _base_keys(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: ``<prefix>base_layer.weight`` -> ``<prefix>weight``."""
    for key in [k for k in state_dict if k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + key[len(prefix + _WRAPPED):]] = state_dict.pop(key)


def _wrapped_keys(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: the reverse of :func:`_base_keys`."""
    for name in ("weight", "bias"):
        if prefix + name in state_dict:
            state_dict[prefix + _WRAPPED + name] = state_dict.pop(prefix + name)


class BatchedLoraLinear(nn.Module):
    """An ``nn.Linear`` plus a stack of LoRA experts (and the sparse deltas of sparse experts), routed per sample
    (see the module docstring).

    Args:
        base_layer: the wrapped linear layer; never modified, so unwrapping restores the base bit-exactly.
        state: the model-wide :class:`RoutingState`.

    The stacks are non-persistent buffers: they follow ``model.to(...)`` but never enter the model's
    ``state_dict``, whose keys stay those of the base (``fc1.weight``, not ``fc1.base_layer.weight``), so saving
    or loading the model's weights with experts attached handles the base alone.
    """

    def __init__(self, base_layer: nn.Linear, state: RoutingState):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"BatchedLoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.state = state
        self.ranks: list[int] = []  # per expert slot; 0: this expert does not adapt this layer
        self.scales: list[float] = []  # per expert slot: alpha / rank
        w = base_layer.weight
        self.register_buffer("lora_A", w.new_zeros(0, 0, base_layer.in_features), persistent=False)
        self.register_buffer("lora_B", w.new_zeros(0, base_layer.out_features, 0), persistent=False)
        self.register_buffer("scale", w.new_zeros(0), persistent=False)
        self._cache: tuple | None = None
        self.sparse: BatchedSparseDelta | None = None  # sparse experts' deltas on this layer's weight, if any
        self.register_state_dict_post_hook(_base_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``layer.weight`` (dtype, device) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, max_rank={self.lora_A.shape[1]}"

    # ---------------------------------------------------------------------------------------- expert slots
    def slots(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None, float]]:
        """Each expert's ``(A (rank, in), B (out, rank), scale)``, unpadded views; ``(None, None, 0.0)`` where an
        expert does not adapt this layer."""
        out = []
        for e, (rank, scale) in enumerate(zip(self.ranks, self.scales)):
            out.append((self.lora_A[e, :rank], self.lora_B[e, :, :rank], scale) if rank else (None, None, 0.0))
        return out

    def set_slots(self, slots: list[tuple[torch.Tensor | None, torch.Tensor | None, float]]) -> None:
        """Rebuild the stacks from per-expert ``(A, B, scale)`` (None for absent), zero-padded to the largest rank.

        Tensors are copied to the base layer's device and dtype.
        """
        w = self.base_layer.weight
        ranks = [0 if a is None else a.shape[0] for a, _, _ in slots]
        width = max(ranks, default=0)
        # Uninitialised stacks, each slot written once: zero-filling 64 experts' stacks first costs more than
        # copying them (pack loading); only the padding beyond an expert's rank (or an absent expert) is zeroed.
        lora_a = w.new_empty(len(slots), width, self.in_features)
        lora_b = w.new_empty(len(slots), self.out_features, width)
        with torch.no_grad():
            for e, (a, b, _) in enumerate(slots):
                if a is not None and (a.shape != (ranks[e], self.in_features) or b is None
                                      or b.shape != (self.out_features, ranks[e])):
                    raise ValueError(f"LoRA shapes A {tuple(a.shape)}, B {None if b is None else tuple(b.shape)} do "
                                     f"not fit a linear layer {self.in_features} -> {self.out_features}")
                if a is not None:
                    lora_a[e, :ranks[e]] = a.to(w.device, w.dtype)
                    lora_b[e, :, :ranks[e]] = b.to(w.device, w.dtype)
                lora_a[e, ranks[e]:].zero_()
                lora_b[e, :, ranks[e]:].zero_()
        self.lora_A, self.lora_B = lora_a, lora_b
        self.ranks = ranks
        self.scales = [float(s) if r else 0.0 for (_, _, s), r in zip(slots, ranks)]
        self.scale = torch.tensor(self.scales, device=w.device, dtype=w.dtype)
        self._cache = None

    def sparse_slots(self) -> list[SparseDelta | None]:
        """Each expert slot's sparse delta on this layer's weight (CPU copies), None where it has none."""
        return self.sparse.slots() if self.sparse is not None else [None] * self.num_experts

    def set_sparse_slots(self, deltas: list[SparseDelta | None]) -> None:
        """Set the sparse deltas, one entry per expert slot (after :meth:`set_slots`, which fixes the slot count)."""
        if len(deltas) != self.num_experts:
            raise ValueError(f"{len(deltas)} sparse slots for a layer with {self.num_experts} expert slots")
        self.sparse = None if all(d is None for d in deltas) else BatchedSparseDelta(deltas, self.base_layer.weight)

    def clear_cache(self) -> None:
        self._cache = None
        if self.sparse is not None:
            self.sparse.clear_cache()

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, ..., in_features) -> (batch, ..., out_features); row n uses the routing's sample n."""
        result = self.base_layer(x)
        routing = self.state.routing
        if routing is None or not self.ranks:
            return result
        if self.lora_A.shape[1]:  # some expert has LoRA matrices here
            if routing.uniform is not None:
                result = self._forward_one(x, result, routing.uniform)
            else:
                result = self._forward_mixed(x, result, routing)
        if self.sparse is not None:
            update = self.sparse.update(x, routing)
            if update is not None:
                if _in_place(result, update):
                    return result.add_(update)
                return result + update.to(result.dtype)
        return result

    def _forward_one(self, x: torch.Tensor, result: torch.Tensor, expert: int) -> torch.Tensor:
        """Every row uses ``expert``: the same two matmuls a single attached peft expert runs."""
        if expert == BASE_ONLY or not self.ranks[expert]:
            return result
        rank = self.ranks[expert]
        a, b = self.lora_A[expert, :rank], self.lora_B[expert, :, :rank]
        update = F.linear(F.linear(x.to(a.dtype), a), b)
        if _in_place(result, update):
            return result.add_(update, alpha=self.scales[expert])
        return result + (update * self.scales[expert]).to(result.dtype)

    def _gathered(self, routing: Routing, rows: int, fold: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row stacked A (rows, k*rank, in) and B (rows, out, k*rank), cached per routing and row count:
        during ``generate`` every step reuses what the first step gathered.

        With ``fold`` (mixing weights without gradients) the coefficients scale x weight are multiplied into A
        once, so the forward is two batched matmuls and nothing else; the third value is then (rows, k*rank)
        coefficients, else the (rows, k) scales, to be multiplied by the weights in the forward.
        """
        key = (routing.version, rows, fold, self.lora_A.data_ptr())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        experts, weights = routing.expand(rows)
        experts = experts.to(self.lora_A.device)
        index = experts.clamp(min=0)
        k, width = index.shape[1], self.lora_A.shape[1]
        a = self.lora_A[index].reshape(rows, k * width, self.in_features)
        b = self.lora_B[index].permute(0, 2, 1, 3).reshape(rows, self.out_features, k * width)
        # "No expert" entries keep a (harmless) gathered expert with coefficient 0.
        scale = torch.where(experts >= 0, self.scale[index], torch.zeros((), dtype=self.scale.dtype,
                                                                         device=self.scale.device))
        coef = scale
        if fold:
            coef = (scale * weights.to(scale.device, scale.dtype)).repeat_interleave(width, dim=1)
            a = a * coef.unsqueeze(-1)
        self._cache = (key, (a, b, coef))
        return a, b, coef

    def _forward_mixed(self, x: torch.Tensor, result: torch.Tensor, routing: Routing) -> torch.Tensor:
        rows = x.shape[0]
        _, weights = routing.expand(rows)
        fold = not weights.requires_grad
        a, b, coef = self._gathered(routing, rows, fold)
        h = torch.bmm(x.reshape(rows, -1, self.in_features).to(a.dtype), a.transpose(1, 2))  # (rows, T, k*rank)
        if not fold:  # a learned router's weights: applied here, in rank space, so gradients reach them
            width = self.lora_A.shape[1]
            h = h * (coef * weights.to(coef.device, coef.dtype)).repeat_interleave(width, dim=1).unsqueeze(1)
        if _in_place(result, h):
            result.view(rows, -1, self.out_features).baddbmm_(h, b.transpose(1, 2))
            return result
        out = torch.baddbmm(result.reshape(rows, -1, self.out_features).to(h.dtype), h, b.transpose(1, 2))
        return out.reshape(result.shape).to(result.dtype)


def _in_place(result: torch.Tensor, update: torch.Tensor) -> bool:
    """Whether the LoRA update can be added into the base layer's fresh output: at inference (no autograd
    graph to keep), same dtype, contiguous. Saves a pass over (batch, frames, out_features) per layer, which
    is most of the overhead on the encoder's 1,500 frames."""
    return not torch.is_grad_enabled() and result.dtype == update.dtype and result.is_contiguous()
