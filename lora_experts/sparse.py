"""Sparse language experts: a mask over chosen Whisper weight matrices and the delta values on that mask.

A ``sparse`` expert changes few entries of a few weight matrices (a language-specific sub-network, as in
lottery-ticket sparse fine-tuning). In memory one parameter's part is a :class:`SparseDelta`: the ascending flat
indices of the masked entries and the values added there. Applying it adds the values in place
(:func:`apply_sparse`); removing it writes the saved original entries back, so the base is restored bit-exactly
(:func:`remove_sparse`). Its task vector (:func:`sparse_task_vector`) is dense, so sparse experts fuse with every
method in ``lora_experts.merge_methods``; :func:`add_sparse` adds several with weights and stays sparse.

File layout (safetensors, no pickles), per parameter ``P`` (e.g. ``model.decoder.layers.0.fc1.weight``):

- ``P.values``: (n,) float16 / float32 (the model's dtype), the deltas in ascending flat-index order;
- the mask, in whichever of two encodings is smaller for that parameter (:func:`pack_indices`):

  - ``P.indices``: uint8, LEB128 varints of the gaps between consecutive flat indices (the first gap is the
    first index, then ``idx[i] - idx[i-1] - 1``; 7 bits per byte, high bit set on all but a number's last
    byte). A gap below 128 costs one byte: about 1.0-1.3 bytes per entry at 99% sparsity;
  - ``P.bitmap``: uint8, one bit per entry of the matrix (``numel`` bits, little-endian bit order within a
    byte), ``numel / 8`` bytes whatever the count: smaller once more than about one entry in eight is kept.

The manifest's ``hyperparameters["shapes"]`` maps each ``P`` to its shape (needed to decode a bitmap and to
check the expert against a model); ``hyperparameters["density"]`` is the kept fraction of those matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from registry.expert_file import Expert, expert_bytes, new_manifest

ENCODINGS = ("indices", "bitmap")


@dataclass(frozen=True)
class SparseDelta:
    """One parameter's sparse delta.

    Attributes:
        indices: (n,) int64, ascending unique flat indices into the parameter (row-major).
        values: (n,) the deltas at those entries.
        shape: the parameter's shape.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        return self.indices.numel() / self.numel

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The delta as a dense tensor of ``shape`` (zeros off the mask), in ``dtype`` (default the values')."""
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        out[self.indices.to(out.device)] = self.values.to(out.dtype)
        return out.view(self.shape)


# --------------------------------------------------------------------------------------- index packing
def _varint_gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.diff(indices, prepend=-1) - 1  # >= 0 for ascending unique indices; consecutive entries give 0
    # Bytes per gap: 7 bits each (exact integer comparisons, no floating-point log).
    nbytes = 1 + sum((gaps >= (1 << (7 * k))).astype(np.int64) for k in range(1, 9))
    starts = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for k in range(int(nbytes.max(initial=0))):
        has = nbytes > k
        byte = (gaps[has] >> (7 * k)) & 0x7F
        out[starts[has] + k] = byte | np.where(nbytes[has] > k + 1, 0x80, 0)
    return out


def _gaps_from_varints(packed: np.ndarray) -> np.ndarray:
    if packed.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = (packed & 0x80) == 0
    if not ends[-1]:
        raise ValueError("packed indices end inside a number; the expert's index data is truncated or corrupt")
    number = np.concatenate([[0], np.cumsum(ends)[:-1]])  # which number each byte belongs to
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    position = np.arange(packed.size) - starts[number]  # the byte's place inside its number
    gaps = np.zeros(int(ends.sum()), dtype=np.int64)
    for k in range(int(position.max()) + 1):
        at = position == k
        gaps[number[at]] |= (packed[at].astype(np.int64) & 0x7F) << (7 * k)
    return gaps


def pack_indices(indices: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """The smaller encoding of a mask (see the module docstring).

    Args:
        indices: (n,) ascending unique flat indices in ``[0, numel)``.
        numel: entries of the parameter.

    Returns:
        (``"indices"`` or ``"bitmap"``, a uint8 tensor).
    """
    idx = indices.detach().cpu().numpy().astype(np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"mask indices must be ascending, unique and in [0, {numel}); sort and deduplicate them")
    varints = _varint_gaps(idx)
    if (numel + 7) // 8 < varints.size:
        bits = np.zeros(numel, dtype=np.uint8)
        bits[idx] = 1
        return "bitmap", torch.from_numpy(np.packbits(bits, bitorder="little"))
    return "indices", torch.from_numpy(varints)


def unpack_indices(encoding: str, packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The (n,) int64 ascending flat indices that :func:`pack_indices` packed."""
    data = packed.detach().cpu().numpy().astype(np.uint8, copy=False)
    if encoding == "bitmap":
        if data.size != (numel + 7) // 8:
            raise ValueError(f"a bitmap over {numel} entries has {(numel + 7) // 8} bytes, found {data.size}; corrupt")
        return torch.from_numpy(np.flatnonzero(np.unpackbits(data, count=numel, bitorder="little")).astype(np.int64))
    if encoding != "indices":
        raise ValueError(f"unknown mask encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    idx = np.cumsum(_gaps_from_varints(data) + 1) - 1
    if idx.size and idx[-1] >= numel:
        raise ValueError(f"packed indices reach {idx[-1]} but the parameter has {numel} entries; corrupt")
    return torch.from_numpy(idx)


# --------------------------------------------------------------------------------------- experts
def sparse_expert(deltas: Mapping[str, SparseDelta], *, languages, base, hyperparameters: dict | None = None,
                  **extra) -> Expert:
    """A storable ``sparse`` expert.

    Args:
        deltas: parameter name -> :class:`SparseDelta` (values keep their dtype: store the model's).
        languages, base: as ``registry.expert_file.new_manifest``.
        hyperparameters: merged over the derived ``shapes``, ``density``, ``entries`` and ``side``.
        extra: further manifest fields (``data``, ``metrics``, ``lineage``).
    """
    if not deltas:
        raise ValueError("no sparse deltas: the mask is empty, there is no expert to store")
    tensors, shapes, kept, total = {}, {}, 0, 0
    for name, d in sorted(deltas.items()):
        if d.indices.numel() != d.values.numel():
            raise ValueError(f"{name}: {d.indices.numel()} mask entries but {d.values.numel()} values")
        encoding, packed = pack_indices(d.indices, d.numel)
        tensors[f"{name}.{encoding}"] = packed
        tensors[f"{name}.values"] = d.values.detach().cpu().contiguous()
        shapes[name] = list(d.shape)
        kept, total = kept + d.indices.numel(), total + d.numel
    encoder = any(n.startswith("model.encoder.") for n in deltas)
    decoder = any(n.startswith("model.decoder.") for n in deltas)
    hyper = {"shapes": shapes, "entries": kept, "density": kept / total,
             "side": "both" if encoder and decoder else "encoder" if encoder else "decoder"}
    hyper.update(hyperparameters or {})
    return Expert(tensors, new_manifest("sparse", languages, base, hyper, **extra))


def sparse_deltas(expert: Expert) -> dict[str, SparseDelta]:
    """Parameter name -> :class:`SparseDelta` of a stored ``sparse`` expert (decodes the packed masks)."""
    if expert.kind != "sparse":
        raise ValueError(f"a {expert.kind} expert (languages {expert.languages}) is not a sparse expert")
    shapes = expert.manifest.get("hyperparameters", {}).get("shapes")
    if not isinstance(shapes, dict):
        raise ValueError(f"sparse expert ({expert.languages}) has no hyperparameters.shapes in its manifest; corrupt")
    out = {}
    for name, shape in shapes.items():
        found = [e for e in ENCODINGS if f"{name}.{e}" in expert.tensors]
        if len(found) != 1 or f"{name}.values" not in expert.tensors:
            raise ValueError(f"sparse expert: parameter {name} needs {name}.values and one of {name}.indices / "
                             f"{name}.bitmap, found {sorted(k for k in expert.tensors if k.startswith(name + '.'))}")
        shape = torch.Size(shape)
        indices = unpack_indices(found[0], expert.tensors[f"{name}.{found[0]}"], math.prod(shape))
        values = expert.tensors[f"{name}.values"]
        if indices.numel() != values.numel():
            raise ValueError(f"sparse expert: {name} has {indices.numel()} mask entries but {values.numel()} values")
        out[name] = SparseDelta(indices, values, shape)
    stray = set(expert.tensors) - {f"{n}.{s}" for n in shapes for s in (*ENCODINGS, "values")}
    if stray:
        raise ValueError(f"sparse expert has tensors its manifest does not describe: {sorted(stray)[:3]}")
    return out


def sparse_from_dense(task_vector: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                      dtype: torch.dtype | None = None) -> dict[str, SparseDelta]:
    """The entries of dense deltas on masks (e.g. ``lora_experts.sparse_masks.top_k_masks`` of them).

    Args:
        task_vector: parameter name -> dense delta (a :class:`~lora_experts.task_vectors.LowRank` is densified).
        masks: parameter name -> ascending flat indices; a parameter without a mask is left out.
        dtype: the values' dtype (default the delta's).
    """
    out = {}
    for name, idx in masks.items():
        d = task_vector[name]
        d = d.dense() if hasattr(d, "dense") else d  # a LowRank delta
        out[name] = SparseDelta(idx, d.reshape(-1)[idx.to(d.device)].to(dtype or d.dtype).cpu(), d.shape)
    return out


def _as_deltas(expert) -> dict[str, SparseDelta]:
    return sparse_deltas(expert) if isinstance(expert, Expert) else dict(expert)


def sparse_task_vector(expert: Expert | Mapping[str, SparseDelta]) -> dict[str, torch.Tensor]:
    """The dense task vector (parameter name -> delta, zeros off the mask) of a sparse expert, for merging."""
    return {name: d.dense() for name, d in _as_deltas(expert).items()}


def add_sparse(experts: Sequence[Expert | Mapping[str, SparseDelta]],
               weights: Sequence[float] | None = None) -> dict[str, SparseDelta]:
    """``sum_i w_i * delta_i`` of sparse experts, on the union of their masks (float32 values).

    Equals the weighted sum of their dense task vectors exactly at every entry (off the union both are 0).
    """
    weights = [1.0] * len(experts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} weights for {len(experts)} sparse experts; give one weight per expert")
    parts = [_as_deltas(e) for e in experts]
    out = {}
    for name in sorted(set().union(*parts)):
        present = [(p[name], w) for p, w in zip(parts, weights) if name in p and w != 0]
        if not present:
            continue
        shapes = {tuple(d.shape) for d, _ in present}
        if len(shapes) > 1:
            raise ValueError(f"{name}: the sparse experts disagree on its shape ({sorted(shapes)}); they were made "
                             "for different Whisper sizes")
        union = torch.unique(torch.cat([d.indices for d, _ in present]))  # sorted
        values = torch.zeros(union.numel(), dtype=torch.float32)
        for d, w in present:
            values.index_add_(0, torch.searchsorted(union, d.indices), d.values.float() * w)
        out[name] = SparseDelta(union, values, present[0][0].shape)
    return out


# --------------------------------------------------------------------------------------- applying
Restore = dict[str, tuple[torch.Tensor, torch.Tensor]]


def apply_sparse(model: torch.nn.Module, expert: Expert | Mapping[str, SparseDelta], scale: float = 1.0) -> Restore:
    """Add ``scale * delta`` to ``model``'s weights in place (computed in float32, rounded to the weight's dtype).

    Args:
        expert: a ``sparse`` expert or parameter name -> :class:`SparseDelta`.

    Returns:
        What :func:`remove_sparse` needs to restore the base bit-exactly: parameter name -> (flat indices, the
        original entries there). Several experts may be applied; remove them in reverse order.
    """
    deltas = _as_deltas(expert)
    params = dict(model.named_parameters())
    for name, d in deltas.items():  # check everything before changing anything
        if name not in params or tuple(params[name].shape) != tuple(d.shape):
            found = tuple(params[name].shape) if name in params else "no such parameter"
            raise ValueError(f"sparse expert entry {name} of shape {tuple(d.shape)} does not fit this model "
                             f"({found}); it was made for another Whisper size")
        if not params[name].is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; cannot add a sparse delta in place")
    restore = {}
    with torch.no_grad():
        for name, d in deltas.items():
            flat = params[name].view(-1)
            idx = d.indices.to(flat.device)
            original = flat[idx].clone()
            flat[idx] = (original.float() + scale * d.values.to(flat.device, torch.float32)).to(flat.dtype)
            restore[name] = (idx, original)
    return restore


def remove_sparse(model: torch.nn.Module, restore: Restore) -> None:
    """Write back the entries :func:`apply_sparse` changed: the base, bit-exactly (not a subtraction)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (idx, original) in restore.items():
            params[name].view(-1)[idx.to(params[name].device)] = original.to(params[name].device)


@contextmanager
def sparse_applied(model: torch.nn.Module, expert: Expert | Mapping[str, SparseDelta], scale: float = 1.0):
    """Apply a sparse expert inside the ``with`` block; the base is bit-exactly back afterwards (also on errors)."""
    restore = apply_sparse(model, expert, scale)
    try:
        yield
    finally:
        remove_sparse(model, restore)


# --------------------------------------------------------------------------------------- size
def sparse_size(expert: Expert) -> dict:
    """What a sparse expert stores: per parameter and in total, entries, density, index and value bytes.

    Returns:
        ``{"parameters": {name: {"entries", "numel", "density", "encoding", "index_bytes", "value_bytes"}},
        "entries", "numel", "density", "index_bytes", "value_bytes", "file_bytes"}`` (``file_bytes``: the
        whole ``.safetensors`` file, header and manifest included).
    """
    per = {}
    for name, d in sparse_deltas(expert).items():
        encoding = next(e for e in ENCODINGS if f"{name}.{e}" in expert.tensors)
        per[name] = {"entries": d.indices.numel(), "numel": d.numel, "density": d.density, "encoding": encoding,
                     "index_bytes": expert.tensors[f"{name}.{encoding}"].numel(),
                     "value_bytes": d.values.numel() * d.values.element_size()}
    total = {k: sum(p[k] for p in per.values()) for k in ("entries", "numel", "index_bytes", "value_bytes")}
    return {"parameters": per, **total, "density": total["entries"] / max(1, total["numel"]),
            "file_bytes": len(expert_bytes(expert))}
