"""Sparse experts in the batched layer: each sample of a batch adds its own expert's sparse delta, in one matmul.

A linear layer's sparse deltas of E experts (each a :class:`~lora_experts.sparse.SparseDelta` on the weight
(out, in): ascending flat indices and values) are kept as one list of coordinates, expert after expert:

- ``rows``, ``cols``, ``values``: (nnz_total,), the entries' weight row, column and value;
- ``offsets``: (E + 1,), where each expert's entries start (expert e: ``offsets[e] : offsets[e + 1]``).

For a :class:`~inference.batched_layer.Routing` of R rows (samples, or samples x beams during ``generate``)
with k (expert, weight) pairs each, the layer builds once per routing and row count (cached, as the LoRA gather
is: every decoding step of a ``generate`` call reuses it) one block-diagonal sparse CSR matrix

    S = diag(sum_j w_1j D_e1j, ..., sum_j w_Rj D_eRj)                (R * out, R * in)

holding in block n only the entries of row n's expert(s) (none for :data:`~inference.batched_layer.BASE_ONLY`
or weight 0), and the update of the whole batch is one sparse matmul::

    X = x.transpose(1, 2).reshape(R * in, T)      Y = S @ X  -> (R, out, T) -> (R, T, out)

It is exact (each row gets ``D_e x`` of its own expert, the mixing weights folded into the values; overlapping
masks of a soft mix are summed per entry) and costs ``sum_n nnz(D_e_n) * T`` multiply-adds, what applying each
sample's expert alone would cost, whatever the number of experts in the batch: no Python loop over experts or
samples, no dense delta. One expert for every row (``Routing.uniform``) is one sparse matmul with that expert's
(out, in) matrix. With mixing weights that carry gradients (a learned router) the blocks are built per (row,
expert) pair with unit values and the weights applied to their outputs, so gradients reach the weights.

Why not the simpler alternatives (``python benchmarks/sparse_routing.py``: whisper-base's fc1, 2048 x 512,
4 experts at 1% density, 16 rows, one CPU thread on 2 cores shared with other jobs, load average ~8, so +-30%):

================================  ======================  ====================  ============================
update of 16 rows, ms             encoder (T = 1500)      decoder step (T = 1)  built and kept per routing
================================  ======================  ====================  ============================
base layer itself (dense W x)     587                     0.49                  -
block-diagonal CSR (this)         436                     0.68                  10 ms; 16 x nnz coordinates
dense deltas gathered per row     592                     9.0                   56 ms; 16 x 2048 x 512 floats
one CSR matmul per expert (loop)  741                     0.33                  -
================================  ======================  ====================  ============================

Dense stacked deltas would also keep E dense copies of every adapted matrix (what a sparse expert exists to
avoid). The loop over experts wins on a decoder step (fewer, smaller index arrays), by 0.35 ms per layer and
step, but loses 300 ms on the encoder and runs one matmul per expert in the batch. On CPU a sparse matmul at 1%
density runs at a small fraction of dense speed, so on the encoder's 1,500 frames the update costs the same
order as the base layer itself (the ``x`` transpose included); on the decoder's one token per step it is cheap.
CPU sparse kernels have no float16 / bfloat16: there the update is computed in float32.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from lora_experts.sparse import SparseDelta


def _csr(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], ordered: bool = False) -> torch.Tensor:
    """A CSR matrix from COO coordinates (2, n) and values.

    With ``ordered`` the coordinates are unique and sorted by (row, column) already, and the row pointers are
    counted directly; else they are sorted and duplicates summed (``coalesce``)."""
    with warnings.catch_warnings():  # torch warns once that CSR support is "beta"; the ops used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if ordered:
            counts = torch.bincount(indices[0], minlength=shape[0])
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            return torch.sparse_csr_tensor(crow, indices[1], values, shape, check_invariants=False)
        coo = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()
        return coo.to_sparse_csr()


class BatchedSparseDelta(nn.Module):
    """Sparse deltas of a bank's experts on one linear layer's weight, routed per sample (see the module docstring).

    Args:
        deltas: per expert slot, its :class:`SparseDelta` on this weight, or None where the expert does not change it.
        weight: the layer's weight (out, in): shapes are checked against it; values are stored in its device and dtype.

    The coordinates are non-persistent buffers: they follow ``model.to(...)`` and never enter a ``state_dict``.
    """

    def __init__(self, deltas: Sequence[SparseDelta | None], weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        for e, d in enumerate(deltas):
            if d is not None and tuple(d.shape) != tuple(weight.shape):
                raise ValueError(f"sparse delta of shape {tuple(d.shape)} (expert slot {e}) does not fit a linear "
                                 f"weight of shape {tuple(weight.shape)}")
        self.counts = [0 if d is None else d.indices.numel() for d in deltas]
        present = [d for d in deltas if d is not None]
        flat = torch.cat([d.indices.long().cpu() for d in present]) if present else torch.zeros(0, dtype=torch.long)
        values = torch.cat([d.values.cpu().to(weight.dtype) for d in present]) if present else weight.new_zeros(0)
        offsets = torch.tensor([0] + self.counts).cumsum(0)
        device = weight.device
        self.register_buffer("rows", (flat // self.in_features).to(device), persistent=False)
        self.register_buffer("cols", (flat % self.in_features).to(device), persistent=False)
        self.register_buffer("values", values.to(device), persistent=False)
        self.register_buffer("offsets", offsets.to(device), persistent=False)
        self.register_buffer("sizes", torch.tensor(self.counts, dtype=torch.long, device=device), persistent=False)
        self._cache: tuple | None = None
        self._single: dict[tuple, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, entries={sum(self.counts)}"

    def slots(self) -> list[SparseDelta | None]:
        """Each expert slot's delta (CPU copies, indices flat and ascending) or None."""
        out = []
        for e, n in enumerate(self.counts):
            if not n:
                out.append(None)
                continue
            part = slice(int(self.offsets[e]), int(self.offsets[e]) + n)
            flat = self.rows[part].cpu() * self.in_features + self.cols[part].cpu()
            out.append(SparseDelta(flat, self.values[part].detach().cpu().clone(),
                                   torch.Size((self.out_features, self.in_features))))
        return out

    def clear_cache(self) -> None:
        self._cache = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached CSR matrices out (torch cannot deep-copy sparse CSR tensors)."""
        state = self.__dict__.copy()
        state["_cache"], state["_single"] = None, {}
        return state

    def _compute_dtype(self) -> torch.dtype:
        if self.values.device.type == "cpu" and self.values.dtype in (torch.float16, torch.bfloat16):
            return torch.float32  # CPU sparse kernels have no half-precision implementation
        return self.values.dtype

    # --------------------------------------------------------------------------------------------- matrices
    def _one(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s (out, in) CSR matrix, cached."""
        key = (expert, self.values.data_ptr())
        if key not in self._single:
            part = slice(int(self.offsets[expert]), int(self.offsets[expert + 1]))
            self._single[key] = _csr(torch.stack([self.rows[part], self.cols[part]]),
                                     self.values[part].to(self._compute_dtype()),
                                     (self.out_features, self.in_features), ordered=True)
        return self._single[key]

    def _blocks(self, experts: torch.Tensor, weights: torch.Tensor, fold: bool) -> torch.Tensor | None:
        """The block-diagonal CSR matrix of a routing expanded to R rows: (R * out, R * in) with the weights folded
        into the values, or (R * k * out, R * in) with one unit-weight block per (row, expert) pair (not ``fold``).
        None when no row takes an entry of this layer."""
        rows, k = experts.shape
        e = experts.reshape(-1).to(self.sizes.device)  # (P,) pairs, P = rows * k
        w = weights.reshape(-1).to(self.sizes.device)
        take = e >= 0
        if fold:
            take &= w != 0
        e = e.clamp(min=0)
        counts = torch.where(take, self.sizes[e], torch.zeros_like(e))
        total = int(counts.sum())
        if not total:
            return None
        pair = torch.repeat_interleave(torch.arange(e.numel(), device=e.device), counts, output_size=total)
        first = counts.cumsum(0) - counts  # where each pair's entries start in the output
        pos = self.offsets[e][pair] + torch.arange(total, device=e.device) - first[pair]
        sample = pair // k
        block = sample if fold else pair
        values = self.values[pos].to(self._compute_dtype())
        if fold:
            values = values * w[pair].to(values.dtype)
        coords = torch.stack([block * self.out_features + self.rows[pos], sample * self.in_features + self.cols[pos]])
        # Each block holds one expert's entries (ascending flat indices: sorted by row, then column), blocks in
        # order: already CSR order, unless a folded soft mix puts several experts (maybe overlapping) in a block.
        return _csr(coords, values, ((rows if fold else rows * k) * self.out_features, rows * self.in_features),
                    ordered=k == 1 or not fold)

    # --------------------------------------------------------------------------------------------- update
    def update(self, x: torch.Tensor, routing) -> torch.Tensor | None:
        """The sparse experts' update for ``x`` (batch, ..., in) under ``routing``: (batch, ..., out) in the compute
        dtype (possibly a strided view), or None when no row has an entry here."""
        if routing.uniform is not None:
            e = routing.uniform
            if e < 0 or not self.counts[e]:
                return None
            x2d = x.reshape(-1, self.in_features).to(self._compute_dtype())
            y = torch.sparse.mm(self._one(e), x2d.t())  # (out, N)
            return y.t().reshape(*x.shape[:-1], self.out_features)
        rows = x.shape[0]
        experts, weights = routing.expand(rows)
        fold = not weights.requires_grad
        key = (routing.version, rows, fold, self.values.data_ptr())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._blocks(experts, weights, fold))
        matrix = self._cache[1]
        if matrix is None:
            return None
        xs = x.reshape(rows, -1, self.in_features).to(self._compute_dtype())
        steps = xs.shape[1]
        y = torch.sparse.mm(matrix, xs.transpose(1, 2).reshape(rows * self.in_features, steps))
        if fold:
            y = y.view(rows, self.out_features, steps)
        else:  # a learned router's weights: applied to each (row, expert) block's output, so gradients reach them
            k = experts.shape[1]
            w = weights.to(y.device, y.dtype).view(rows, k, 1, 1)
            y = (y.view(rows, k, self.out_features, steps) * w).sum(1)
        return y.transpose(1, 2).reshape(*x.shape[:-1], self.out_features)
