"""How alike experts are: cosine similarity and norms of their task vectors, encoder and decoder apart.

Task arithmetic adds experts' deltas; whether a support can help a target is bounded by how their deltas relate.
Two deltas with cosine near 0 change the weights in unrelated directions (fusing mostly adds the support's own
change: interference at the target's scale), a positive cosine means they push the same way, a negative one
against each other. The norms say how large each change is, so a support whose delta is several times the
target's dominates a fusion at weight 1 (the TIES and DARE papers' "interference" reading of task vectors).

Inner products of :class:`~lora_experts.deltas.LowRank` deltas are computed in factored form
(``<s1 B1 A1, s2 B2 A2> = s1 s2 sum((B1^T B2) * (A1 A2^T))``), so a pair of rank-16 experts costs a few small
matrix products per module, never a dense (out, in) delta. A module only one expert changes counts in its norm
and adds nothing to the inner product (the other's delta there is zero).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lora_experts.deltas import Delta, LowRank

__all__ = ["GROUPS", "Similarity", "delta_inner", "expert_similarity", "group_of", "similarity", "step_along"]

GROUPS = ("encoder", "decoder", "all")


def group_of(name: str) -> str:
    """``encoder`` or ``decoder`` for a Whisper parameter name (``model.decoder.layers.0.fc1.weight``), else
    ``other`` (e.g. ``proj_out``), which counts only in ``all``."""
    for group in ("encoder", "decoder"):
        if f"{group}." in name.split("layers.", 1)[0]:
            return group
    return "other"


def delta_inner(a: Delta, b: Delta) -> float:
    """The Frobenius inner product ``<a, b>`` of two deltas of one parameter (float64; factored where low-rank).

    Args:
        a, b: a dense tensor of shape (out, in) (or any shape, matching) or a :class:`LowRank` of that shape.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"deltas of shapes {tuple(a.shape)} and {tuple(b.shape)} belong to different parameters; "
                         "compare experts made for the same base")
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        left = a.B.double().T @ b.B.double()  # (r1, r2)
        right = a.A.double() @ b.A.double().T  # (r1, r2)
        return float(a.scale * b.scale * (left * right).sum())
    if isinstance(a, LowRank) or isinstance(b, LowRank):
        low, full = (a, b) if isinstance(a, LowRank) else (b, a)
        # <s B A, D> = s * sum(B * (D A^T)): one (out, in) x (in, r) product.
        return float(low.scale * (low.B.double() * (full.double() @ low.A.double().T)).sum())
    return float((a.double() * b.double()).sum())


@dataclass(frozen=True)
class Similarity:
    """Cosine similarities and norms of named task vectors, per parameter group.

    Attributes:
        names: the experts, in the order given.
        cosine: group (``encoder``, ``decoder``, ``all``) -> (n, n) list of cosines; ``nan`` where an expert
            changes nothing in that group.
        norms: group -> each expert's Frobenius norm there (0.0 where it changes nothing).
    """

    names: list[str]
    cosine: dict[str, list[list[float]]] = field(default_factory=dict)
    norms: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"names": self.names, "cosine": self.cosine, "norms": self.norms}

    def markdown(self, group: str = "all") -> str:
        """A markdown matrix of one group's cosines, with each expert's norm in the last column."""
        head = "| " + " | ".join([f"cosine ({group})", *self.names, "norm"]) + " |"
        rows = [head, "|" + "---|" * (len(self.names) + 2)]
        for i, name in enumerate(self.names):
            cells = [_fmt(c) for c in self.cosine[group][i]]
            rows.append("| " + " | ".join([name, *cells, f"{self.norms[group][i]:.3g}"]) + " |")
        return "\n".join(rows)


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:+.3f}"


def similarity(task_vectors: Sequence[Mapping[str, Delta]], names: Sequence[str]) -> Similarity:
    """Pairwise cosine similarity of task vectors, for the encoder's deltas, the decoder's and all of them.

    Args:
        task_vectors: one ``{parameter name: delta}`` per expert (:func:`lora_experts.task_vectors.task_vector`).
        names: a label per task vector.

    Returns:
        A :class:`Similarity`; its diagonal is 1 wherever an expert changes something in the group.
    """
    if len(task_vectors) != len(names):
        raise ValueError(f"{len(task_vectors)} task vectors for {len(names)} names")
    n = len(names)
    gram = {g: torch.zeros(n, n, dtype=torch.float64) for g in GROUPS}
    for i in range(n):
        for j in range(i, n):
            for key in sorted(task_vectors[i].keys() & task_vectors[j].keys()):  # a fixed order: the same sums
                value = delta_inner(task_vectors[i][key], task_vectors[j][key])
                for g in {group_of(key), "all"} & set(GROUPS):
                    gram[g][i, j] += value
                    if i != j:
                        gram[g][j, i] += value
    cosine, norms = {}, {}
    for g, m in gram.items():
        norm = m.diagonal().clamp(min=0).sqrt()
        denom = torch.outer(norm, norm)
        cos = torch.where(denom > 0, m / denom.clamp(min=1e-300), torch.full_like(m, float("nan")))
        cosine[g] = [[float(c) for c in row] for row in cos]
        norms[g] = [float(x) for x in norm]
    return Similarity(list(names), cosine, norms)


def step_along(delta: Mapping[str, Delta], direction: Mapping[str, Delta]) -> tuple[float, float]:
    """How far ``delta`` goes along ``direction`` (task vectors of one base), and what is left orthogonal to it.

    For a fusion and its target: ``delta = coef * direction + rest``, ``rest`` orthogonal to ``direction``; a fusion
    is the target scaled by ``coef`` plus the supports' own part. Returns ``(coef, |rest| / |direction|)``; a
    module only one of them changes counts in the norms (zero in the other).

    Raises:
        ValueError: ``direction`` is zero (nothing to project on).
    """
    sim = similarity([delta, direction], ["delta", "direction"])  # one Gram matrix, the shared inner products
    (norm, tt), cos = sim.norms["all"], sim.cosine["all"][0][1]
    if tt <= 0:
        raise ValueError("the direction to project on is a zero task vector (an expert that changes nothing)")
    cos = 0.0 if norm <= 0 else cos
    return cos * norm / tt, norm * max(1.0 - cos * cos, 0.0) ** 0.5 / tt


def expert_similarity(experts: Sequence, names: Sequence[str]) -> Similarity:
    """:func:`similarity` of stored experts (lora, task_vector, sparse: any kind with a task vector).

    Raises:
        ValueError: experts of different base models (their deltas live in different weight spaces), or a kind
            without a task vector (``clsr``), named with the reason.
    """
    from lora_experts.merge import common_base
    from lora_experts.task_vectors import task_vector

    common_base(experts, names, verb="compared")
    return similarity([task_vector(e) for e in experts], names)
