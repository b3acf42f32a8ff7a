"""Masks of sparse experts: choosing them from a dense delta, and comparing them between languages.

Selection keeps the top ``density`` fraction of entries by a score, over all matrices together (``global``: a
matrix the language needs more keeps more) or in each matrix alone (``per_matrix``: every matrix keeps the same
fraction). Scores are the delta's magnitude ``|dW|`` (:func:`magnitude_scores`) or any other per-entry score,
e.g. the first-order estimate of how much the loss depends on each entry's change, ``sum_batches |grad * dW|``
(``trainers.sparse_module.SparseExpertModule.gradient_importance``, gradients at the fine-tuned weights).

Overlap between languages' masks is the Jaccard index ``|A & B| / |A | B|`` of their entry sets, per parameter,
per layer and over all entries (:func:`mask_overlap`): the share of the sub-network two languages have in
common, a measure of how related they are for the model, to be read against :meth:`MaskOverlap.chance` (the
overlap random masks of the same per-matrix sizes would have). :func:`plot_overlap` draws the language x language
matrix as a PNG heatmap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lora_experts.sparse import SparseDelta, sparse_deltas
from lora_experts.task_vectors import Delta, dense
from registry.expert_file import Expert

SCOPES = ("global", "per_matrix")


# --------------------------------------------------------------------------------------- selection
def magnitude_scores(task_vector: Mapping[str, Delta]) -> dict[str, torch.Tensor]:
    """``|dW|`` per entry (float32), from dense or low-rank deltas."""
    return {name: dense(d).detach().float().abs() for name, d in task_vector.items()}


def top_k_masks(scores: Mapping[str, torch.Tensor], density: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """The flat indices of the highest-scoring ``density`` fraction of entries.

    Args:
        scores: parameter name -> non-negative scores, one per entry.
        density: fraction kept, in (0, 1] (``1 - sparsity``); ``round(density * entries)`` are kept.
        scope: ``global`` (one ranking over every entry) or ``per_matrix`` (each parameter ranked alone).

    Returns:
        parameter name -> (n,) int64 ascending flat indices; a parameter that keeps nothing is left out.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (sparsity in [0, 1)), got {density}")
    if scope not in SCOPES:
        raise ValueError(f"unknown mask scope {scope!r}; choose one of {', '.join(SCOPES)}")
    names = sorted(scores)
    flat = {n: scores[n].detach().reshape(-1).float() for n in names}
    if scope == "per_matrix":
        kept = {n: _top(flat[n], round(density * flat[n].numel())) for n in names}
    else:
        everything = torch.cat([flat[n].cpu() for n in names])
        chosen = _top(everything, round(density * everything.numel()))
        offsets = torch.tensor(np.cumsum([0] + [flat[n].numel() for n in names]))
        cuts = torch.searchsorted(chosen, offsets).tolist()  # chosen is sorted: each parameter is one slice
        kept = {n: chosen[cuts[i]:cuts[i + 1]] - int(offsets[i]) for i, n in enumerate(names)}
    return {n: idx.cpu() for n, idx in kept.items() if idx.numel()}


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    if k >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    return torch.sort(torch.topk(values, k, sorted=False).indices).values


# --------------------------------------------------------------------------------------- overlap
def layer_of(parameter: str) -> str:
    """The layer a parameter belongs to: ``decoder.3`` for ``model.decoder.layers.3.fc1.weight``, else its module."""
    m = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.", parameter)
    return f"{m.group(1)}.{m.group(2)}" if m else parameter.rsplit(".", 1)[0]


@dataclass
class MaskOverlap:
    """Mask sizes and pairwise intersections of several sparse experts.

    Attributes:
        labels: one per expert (usually its language).
        parameters: every parameter any mask touches, sorted.
        sizes: (labels, parameters) entries each mask keeps in each parameter.
        shared: (labels, labels, parameters) entries two masks share in each parameter.
        numels: (parameters,) entries of each parameter.
    """

    labels: list[str]
    parameters: list[str]
    sizes: np.ndarray
    shared: np.ndarray
    numels: np.ndarray
    layers: list[str] = field(init=False)

    def __post_init__(self):
        self.layers = sorted(set(map(layer_of, self.parameters)), key=_layer_key)

    def _jaccard(self, columns) -> np.ndarray:
        inter = self.shared[:, :, columns].sum(-1)
        size = self.sizes[:, columns].sum(-1)
        union = size[:, None] + size[None, :] - inter
        # Where neither mask keeps an entry (e.g. a layer only one language adapts) the overlap is undefined:
        # NaN, shown as "-"; a mask always equals itself (diagonal 1).
        out = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        np.fill_diagonal(out, 1.0)
        return out

    def jaccard(self, parameter: str | None = None) -> np.ndarray:
        """(labels, labels) Jaccard index over all entries, or over one parameter's."""
        if parameter is None:
            return self._jaccard(slice(None))
        return self._jaccard([self.parameters.index(parameter)])

    def chance(self) -> np.ndarray:
        """(labels, labels) expected Jaccard of random masks keeping as many entries per parameter: the overlap
        that the masks' sizes alone explain (the diagonal is 1)."""
        inter = (self.sizes[:, None, :] * self.sizes[None, :, :] / self.numels).sum(-1)
        size = self.sizes.sum(-1)
        union = size[:, None] + size[None, :] - inter
        out = np.where(union > 0, inter / np.maximum(union, 1e-12), np.nan)
        np.fill_diagonal(out, 1.0)
        return out

    def per_layer(self) -> dict[str, np.ndarray]:
        """Layer (``decoder.3``) -> (labels, labels) Jaccard index over that layer's parameters."""
        return {layer: self._jaccard([i for i, p in enumerate(self.parameters) if layer_of(p) == layer])
                for layer in self.layers}

    def markdown(self, matrix: np.ndarray | None = None) -> str:
        """A language x language table of a Jaccard matrix (default the overall one), in percent."""
        matrix = self.jaccard() if matrix is None else matrix
        rows = ["| Jaccard % | " + " | ".join(self.labels) + " |", "|" + "---|" * (len(self.labels) + 1)]
        for label, row in zip(self.labels, matrix):
            rows.append(f"| {label} | " + " | ".join(percent(v) for v in row) + " |")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        """JSON-ready matrices (undefined overlaps as None)."""
        return {"labels": self.labels, "overall": _listed(self.jaccard()), "chance": _listed(self.chance()),
                "per_layer": {k: _listed(v) for k, v in self.per_layer().items()},
                "per_parameter": {p: _listed(self.jaccard(p)) for p in self.parameters},
                "entries": dict(zip(self.labels, self.sizes.sum(-1).tolist()))}


def percent(value: float) -> str:
    """A Jaccard index as a table cell: ``12.3``, or ``-`` where undefined."""
    return "-" if np.isnan(value) else f"{100 * value:.1f}"


def _listed(matrix: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def _layer_key(layer: str):
    side, _, index = layer.partition(".")
    return (side, int(index)) if index.isdigit() else (layer, -1)


def mask_overlap(experts: Mapping[str, Expert | Mapping[str, SparseDelta]]) -> MaskOverlap:
    """Pairwise overlap of sparse experts' masks.

    Args:
        experts: label (e.g. language) -> a ``sparse`` expert or parameter name -> :class:`SparseDelta`.
    """
    labels = list(experts)
    masks = [sparse_deltas(e) if isinstance(e, Expert) else dict(e) for e in experts.values()]
    params = sorted(set().union(*masks))
    n, m = len(labels), len(params)
    sizes, shared = np.zeros((n, m), dtype=np.int64), np.zeros((n, n, m), dtype=np.int64)
    numels = np.zeros(m, dtype=np.int64)
    for j, p in enumerate(params):
        numels[j] = next(mask[p].numel for mask in masks if p in mask)
        idx = [mask[p].indices.numpy() if p in mask else np.zeros(0, dtype=np.int64) for mask in masks]
        for a in range(n):
            sizes[a, j] = shared[a, a, j] = idx[a].size
            for b in range(a + 1, n):
                shared[a, b, j] = shared[b, a, j] = np.intersect1d(idx[a], idx[b], assume_unique=True).size
    return MaskOverlap(labels, params, sizes, shared, numels)


def plot_overlap(overlap: MaskOverlap, path: str, title: str = "", matrix: np.ndarray | None = None) -> str:
    """PNG heatmap of a language x language Jaccard matrix (default the overall one), values in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = overlap.jaccard() if matrix is None else matrix
    n = len(overlap.labels)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.0 * n + 1.5))
    # The colours span the pairs (the diagonal, 100%, saturates): overlaps between languages are often a few %.
    off = 100 * values[~np.eye(n, dtype=bool)]
    off = off[~np.isnan(off)]
    top = float(off.max()) if off.size and off.max() > 0 else 100.0
    image = ax.imshow(100 * values, cmap="magma", vmin=0, vmax=top)
    ax.set_xticks(range(n), overlap.labels)
    ax.set_yticks(range(n), overlap.labels)
    for i in range(n):
        for j in range(n):
            v = 100 * values[i, j]
            ax.text(j, i, percent(values[i, j]), ha="center", va="center",
                    color="black" if v > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, label="mask Jaccard %")
    ax.set_title(title or "overlap of sparse experts' masks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

