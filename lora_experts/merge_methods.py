"""Merge methods: pure functions that fuse one parameter's deltas from several experts.

Every method has the signature ``method(deltas, weights, generator, **options) -> Merged`` and is listed in
``MERGE_METHODS`` by ``@merge_method(name)`` when this module is imported:

- ``deltas``: one entry per expert, all of one shape, float32 on one device; a dense tensor or a
  :class:`~lora_experts.task_vectors.LowRank`. An expert that does not touch the parameter arrives as a zero
  delta (a rank-0 ``LowRank`` for a matrix, zeros otherwise).
- ``weights``: one float per expert (negative ones subtract), or None for the method's default (1.0 each).
- ``generator``: a ``torch.Generator`` seeded for this parameter; only the stochastic methods (DARE) draw from it.

Methods never modify their inputs. ``lora_experts.merge.merge`` applies a method to every parameter of a set
of task vectors. Adding a method: write a function with that signature and decorate it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lora_experts.task_vectors import Delta, LowRank, dense, truncate


class Merged(NamedTuple):
    """A method's result for one parameter."""

    delta: Delta
    error: float | None = None  # relative Frobenius error against the exact weighted sum, for methods that truncate
    norm: float | None = None  # ||exact weighted sum||_F, to combine errors over parameters


MERGE_METHODS: dict[str, Callable[..., Merged]] = {}


def merge_method(name: str, *, stochastic: bool = False):
    """Register a merge method under ``name`` (``stochastic``: it draws from the generator, so a seed matters)."""
    def register(fn):
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        fn.stochastic = stochastic
        MERGE_METHODS[name] = fn
        return fn
    return register


# ------------------------------------------------------------------------------------------- shared steps
def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    return [1.0] * n if weights is None else [float(w) for w in weights]


def _zero_like(delta: Delta) -> Delta:
    if isinstance(delta, LowRank):
        out, inp = delta.shape
        return LowRank(delta.A.new_zeros(0, inp), delta.B.new_zeros(out, 0))
    return torch.zeros_like(delta)


def weighted_stack(deltas: Sequence[Delta], weights: Sequence[float] | None) -> torch.Tensor:
    """The experts' deltas times their weights, stacked densely: (experts, *shape), float32."""
    w = _weights(weights, len(deltas))
    if all(isinstance(d, LowRank) for d in deltas):
        # One batched matmul; ranks are zero-padded to the largest (zero columns add exact zeros), and each
        # expert's weight and LoRA scale ride on its B, an (out, r) multiply.
        r = max(d.rank for d in deltas)
        a = deltas[0].A.new_zeros(len(deltas), r, deltas[0].shape[1])
        b = deltas[0].B.new_zeros(len(deltas), deltas[0].shape[0], r)
        for i, (d, wi) in enumerate(zip(deltas, w)):
            if wi != 0 and d.rank:
                a[i, : d.rank] = d.A
                torch.mul(d.B, wi * d.scale, out=b[i, :, : d.rank])
        return torch.bmm(b, a)
    out = torch.empty((len(deltas), *deltas[0].shape), device=deltas[0].device, dtype=torch.float32)
    for i, (d, wi) in enumerate(zip(deltas, w)):
        if wi == 0:
            out[i].zero_()
        elif isinstance(d, LowRank):
            torch.matmul(d.B * (wi * d.scale), d.A, out=out[i])
        else:
            torch.mul(d, wi, out=out[i])
    return out


SAMPLE = 1 << 16  # above this many entries per expert, trimming thresholds come from a sample of at most this size


def _next_prime(n: int) -> int:
    while n < 2 or any(n % p == 0 for p in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def trim_(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each expert's ``density`` fraction of largest-magnitude entries, zero the rest (in place).

    Args:
        x: (experts, *shape); each expert is trimmed on its own (per parameter, as TIES and peft do).
        density: fraction kept, in [0, 1]; entries tied with the threshold magnitude are all kept.

    Up to ``SAMPLE`` entries per expert the threshold is the exact k-th largest magnitude, so exactly
    ``round(density * n)`` entries stay (barring ties). Above, it is that quantile of an even sample of at most
    ``SAMPLE`` magnitudes: an exact selection over millions of entries per expert costs more than the rest of a
    merge, and the kept fraction stays within about +-0.5% of ``density`` (3 standard errors at density 0.2).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries kept), got {density}")
    flat = x.view(x.shape[0], -1)
    n = flat.shape[1]
    if round(density * n) >= n:
        return x
    if round(density * n) == 0:
        return x.zero_()
    # Step 1: the magnitudes the threshold is chosen from: all of them, or a sample every `stride` entries. A
    # prime stride that does not divide the matrix width is coprime with it: the sample visits every row and
    # column evenly.
    if n <= SAMPLE:
        pool = flat.abs()
    else:
        stride = _next_prime(n // SAMPLE + 1)
        while x.shape[-1] % stride == 0:
            stride = _next_prime(stride + 1)
        pool = flat[:, ::stride].abs()
    # Step 2: the k-th largest magnitude of each expert is its threshold (an O(n) selection, no sort).
    m = pool.shape[1]
    k = max(1, round(density * m))
    threshold = torch.kthvalue(pool, m - k + 1, dim=1).values
    # Step 3: zero what lies below it. hardshrink keeps |x| > lambda; lambda one float step below the threshold
    # keeps the threshold entry itself. In place, row by row: no (experts, n) temporaries on this hot path.
    lambdas = torch.nextafter(threshold, torch.zeros_like(threshold)).tolist()
    for row, lam in zip(flat, lambdas):
        torch.hardshrink(row, lam, out=row)
    return x


def dare_(x: torch.Tensor, drop_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each entry with probability ``drop_rate`` and rescale the rest by 1 / (1 - drop_rate), in place."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if drop_rate == 0.0:
        return x
    # Independent Bernoulli drops from the seeded generator (same seed, same drops), drawn one expert at a time
    # into one buffer.
    flat = x.view(x.shape[0], -1)
    draw = torch.empty(flat.shape[1], device=x.device)
    for row in flat:
        torch.rand(draw.shape, generator=generator, device=x.device, out=draw)
        row.mul_(draw.ge_(drop_rate))
    # Rescale the survivors by 1 / (1 - p): every entry keeps its expected value, the expert's delta stays unbiased.
    return x.mul_(1.0 / (1.0 - drop_rate))


def disjoint_mean_(x: torch.Tensor, sign: str = "mass") -> torch.Tensor:
    """TIES's sign election and disjoint mean over experts: (experts, *shape) -> shape (``x`` is overwritten).

    Args:
        sign: ``mass`` elects, per entry, the sign of the summed values (TIES); ``count`` the sign most
            nonzero experts have.
    """
    if sign == "mass":
        elected = torch.sign(x.sum(0))
    elif sign == "count":
        votes = torch.zeros_like(x[0])
        for row in x:
            votes.add_(torch.sign(row))
        elected = torch.sign(votes)
    else:
        raise ValueError(f"sign election must be 'mass' or 'count', got {sign!r}")
    # Times the elected sign, an entry is positive exactly where its expert agrees; clamping drops the rest.
    # Trimmed (zero) entries cast no vote and are not counted. All in place: x is large.
    agreeing = x.mul_(elected).clamp_(min=0)
    total = agreeing.sum(0)
    count = agreeing.sign_().sum(0).clamp_(min=1)
    # Disjoint mean: divide by the number of agreeing experts only, so disagreeing or trimmed ones do not dilute it.
    return total.mul_(elected).div_(count)


# ------------------------------------------------------------------------------------------- methods
@merge_method("linear")
def linear(deltas, weights=None, generator=None, *, dense_output: bool = False) -> Merged:
    """Exact task arithmetic: ``sum_i w_i dW_i``.

    When every delta is low-rank the sum is represented exactly by concatenating ranks,
    ``A = cat_i A_i`` and ``B = cat_i (w_i s_i / s) B_i`` (rank ``sum_i r_i``), never by peft's "linear"
    mixing of ``sqrt(w) A`` and ``sqrt(w) B``, whose product adds cross terms ``B_i A_j``.

    Options:
        dense_output: return a dense matrix even when the inputs are low-rank.
    """
    w = _weights(weights, len(deltas))
    # Step 1: drop experts with weight 0 and empty deltas: they add exactly nothing and would only add rank.
    terms = [(d, wi) for d, wi in zip(deltas, w) if wi != 0 and not (isinstance(d, LowRank) and d.rank == 0)]
    if not terms:
        return Merged(_zero_like(deltas[0]))
    # Step 2: a single expert at weight 1 is its own sum; return it untouched, bit for bit.
    if len(terms) == 1 and terms[0][1] == 1.0 and not (dense_output and isinstance(terms[0][0], LowRank)):
        return Merged(terms[0][0])
    low = [(d, wi) for d, wi in terms if isinstance(d, LowRank)]
    if len(low) == len(terms) and not dense_output:
        # Step 3: concatenate ranks. A LoRA scale shared by all experts stays outside, so B_i is only scaled by w_i.
        scales = {d.scale for d, _ in low}
        common = scales.pop() if len(scales) == 1 else 1.0
        factors = [wi if d.scale == common else wi * d.scale / common for d, wi in low]
        b = torch.cat([d.B if f == 1.0 else d.B * f for (d, _), f in zip(low, factors)], dim=1)
        return Merged(LowRank(torch.cat([d.A for d, _ in low]), b, common))
    # Step 3': a dense sum; the low-rank terms in one matmul of their concatenated factors.
    if low:
        out = torch.cat([d.B * (wi * d.scale) for d, wi in low], dim=1) @ torch.cat([d.A for d, _ in low])
    else:
        out = torch.zeros_like(terms[0][0])
    for d, wi in terms:
        if not isinstance(d, LowRank):
            out.add_(d, alpha=wi)
    return Merged(out)


@merge_method("svd")
def svd(deltas, weights=None, generator=None, *, rank: int | None = None) -> Merged:
    """The exact weighted sum truncated to ``rank`` by SVD, with the relative Frobenius error of truncating.

    Options:
        rank: target rank; default the largest input rank (peft's default). Dense inputs need it given.
    """
    # Step 1: the exact weighted sum, kept low-rank when every input is so that the SVD stays (R, R) small.
    exact = linear(deltas, weights).delta
    if exact.dim() != 2:  # a bias or norm delta of a full fine-tune has no rank to truncate
        return Merged(exact, 0.0, float(exact.norm()))
    # Step 2: the target rank.
    if rank is None:
        if any(not isinstance(d, LowRank) for d in deltas):
            raise ValueError("svd merge of dense task vectors needs rank= (the rank to truncate to)")
        rank = max(d.rank for d in deltas)
    # Step 3: truncated SVD; the error is the Frobenius norm of the dropped singular values over the total.
    low, error, norm = truncate(exact, rank)
    return Merged(low, error, norm)


@merge_method("magnitude_prune")
def magnitude_prune(deltas, weights=None, generator=None, *, density: float = 0.2) -> Merged:
    """Keep each expert's top-``density`` entries by magnitude, then sum them with their weights.

    Options:
        density: fraction of each expert's entries kept per parameter.
    """
    # Step 1: weighted deltas (a weight scales every entry alike, so the magnitude ranking is unchanged).
    x = weighted_stack(deltas, weights)
    # Step 2: trim each expert to its largest entries.
    trim_(x, density)
    # Step 3: sum.
    return Merged(x.sum(0))


@merge_method("ties")
def ties(deltas, weights=None, generator=None, *, density: float = 0.2, lam: float = 1.0,
         sign: str = "mass") -> Merged:
    """TIES-Merging: trim, elect sign, disjoint mean, scale.

    Options:
        density: fraction of each expert's entries kept (TIES's k; 1.0 keeps all).
        lam: scale of the merged delta (TIES's lambda).
        sign: ``mass`` (sign of the summed values) or ``count`` (majority of experts).
    """
    # Step 1: weighted deltas; a negative weight flips an expert's signs before the vote.
    x = weighted_stack(deltas, weights)
    # Step 2 (trim): keep each expert's top-density entries by magnitude.
    trim_(x, density)
    # Step 3 (elect) and step 4 (disjoint mean of the agreeing entries).
    merged = disjoint_mean_(x, sign)
    # Step 5: scale.
    return Merged(merged if lam == 1.0 else merged * lam)


@merge_method("dare", stochastic=True)
@merge_method("dare_linear", stochastic=True)
def dare_linear(deltas, weights=None, generator=None, *, drop_rate: float = 0.5) -> Merged:
    """DARE then task arithmetic: random drop with rescale per expert, then the weighted sum (also ``dare``).

    Options:
        drop_rate: probability p of dropping an entry; survivors are scaled by 1 / (1 - p).
    """
    # Step 1: weighted deltas.
    x = weighted_stack(deltas, weights)
    # Step 2: drop and rescale, from the generator seeded for this parameter.
    dare_(x, drop_rate, generator)
    # Step 3: sum.
    return Merged(x.sum(0))


@merge_method("dare_ties", stochastic=True)
def dare_ties(deltas, weights=None, generator=None, *, drop_rate: float = 0.5, lam: float = 1.0,
              sign: str = "mass") -> Merged:
    """DARE then TIES's sign election and disjoint mean (DARE's random drop replaces TIES's magnitude trim).

    Options:
        drop_rate: probability p of dropping an entry; survivors are scaled by 1 / (1 - p).
        lam, sign: as for ``ties``.
    """
    # Step 1: weighted deltas.
    x = weighted_stack(deltas, weights)
    # Step 2: drop and rescale.
    dare_(x, drop_rate, generator)
    # Step 3: elect signs and take the disjoint mean.
    merged = disjoint_mean_(x, sign)
    # Step 4: scale.
    return Merged(merged if lam == 1.0 else merged * lam)


def low_rank_sparse(delta: Delta, rank: int, density: float,
                    variant: str = "prune") -> tuple[LowRank | None, torch.Tensor | None]:
    """LoRS-Merging's pruning of one expert's delta into a low-rank part and a sparse part (either may be None).

    Args:
        delta: the expert's (out, in) delta (a 1-D bias/norm delta is only magnitude-pruned).
        rank: rank kept by the truncated SVD.
        density: fraction of entries the magnitude pruning keeps.
        variant: ``prune``: truncate to ``rank``, then magnitude-prune that low-rank matrix (returned as the
            sparse part; the low-rank part is returned only when ``density`` is 1). ``residual``: the rank-``rank``
            part plus the magnitude-pruned residual ``delta - low_rank`` as the sparse part.

    Returns:
        (low-rank part, sparse part); the pruned delta is their sum.
    """
    if variant not in ("prune", "residual"):
        raise ValueError(f"LoRS variant must be 'prune' or 'residual', got {variant!r}")
    if delta.dim() != 2:
        return None, trim_(dense(delta).unsqueeze(0).clone(), density)[0]
    # Step 1: the coarse structure, a truncated SVD of the expert's delta.
    low, _, _ = truncate(delta, rank)
    if variant == "prune":
        # Step 2a: fine-grained pruning of the low-rank matrix itself (a pruned low-rank matrix is no longer low-rank).
        if density >= 1.0:
            return low, None
        return None, trim_(low.dense().unsqueeze(0), density)[0]
    # Step 2b: keep what the low-rank part misses as a sparse residual of the largest entries.
    if density <= 0.0:
        return low, None
    residual = dense(delta) - low.dense()
    return low, trim_(residual.unsqueeze(0), density)[0]


@merge_method("lors")
def lors(deltas, weights=None, generator=None, *, rank_ratio: float = 0.5, rank: int | None = None,
         density: float = 0.5, variant: str = "prune") -> Merged:
    """LoRS-Merging: each expert's delta pruned to low-rank + sparse (:func:`low_rank_sparse`), then summed.

    Options:
        rank_ratio: fraction of each delta's rank kept (its LoRA rank, or min(out, in) for a dense delta),
            at least 1.
        rank: an absolute rank instead of ``rank_ratio``.
        density: fraction of entries the magnitude pruning keeps.
        variant: ``prune`` (prune after truncation) or ``residual`` (low-rank + sparse residual).
    The error reported is the result's relative Frobenius distance from the exact weighted sum.
    """
    w = _weights(weights, len(deltas))
    lows, sparse = [], []
    for d, wi in zip(deltas, w):
        if wi == 0 or (isinstance(d, LowRank) and d.rank == 0):
            continue  # contributes nothing
        # Step 1: the rank this expert keeps: a fraction of its own rank (a LoRA's r), or the absolute rank.
        full = d.rank if isinstance(d, LowRank) else min(d.shape) if d.dim() == 2 else 1
        r = rank if rank is not None else max(1, math.ceil(rank_ratio * full))
        # Step 2: its low-rank (coarse structure) and sparse (largest remaining entries) parts.
        low, sp = low_rank_sparse(d, r, density, variant)
        if low is not None:
            lows.append((low, wi))
        if sp is not None:
            sparse.append((sp, wi))
    # Step 3: task arithmetic over the pruned experts; exactly low-rank when no sparse part is left.
    merged = linear([lo for lo, _ in lows], [wi for _, wi in lows]).delta if lows else None
    if sparse or merged is None:
        merged = torch.zeros(deltas[0].shape, device=deltas[0].device) if merged is None else dense(merged).clone()
        for sp, wi in sparse:
            merged.add_(sp, alpha=wi)
    # Step 4: how far the pruning moved the result from the exact weighted sum.
    exact = dense(linear(deltas, w).delta)
    norm = float(exact.norm())
    error = float((dense(merged) - exact).norm()) / norm if norm > 0 else 0.0
    return Merged(merged, error, norm)


@merge_method("task_arithmetic")
def task_arithmetic(deltas, weights=None, generator=None, *, lam: float = 1.0) -> Merged:
    """Support-language task arithmetic: ``tau_T + lam * tau_S``, ``tau_S = sum_j p_j tau_j``.

    ``deltas[0]`` is the target language's expert (``theta_T = base + tau_T``), ``deltas[1:]`` the support
    languages' (one of them may itself be a pooled-support expert). ``weights`` is ``[w_T, p_1, ..., p_n]``;
    default ``[1, 1/n, ..., 1/n]``, i.e. tau_S is the mean of the supports. Exact (low-rank for LoRA inputs).

    Options:
        lam: the paper's lambda, the scale of the pooled support vector.
    """
    n = len(deltas) - 1
    w = [1.0] + [1.0 / max(n, 1)] * n if weights is None else [float(x) for x in weights]
    # Step 1: fold lambda into the pooling weights: w_T tau_T + sum_j (lam p_j) tau_j.
    effective = [w[0]] + [lam * p for p in w[1:]]
    # Step 2: the exact weighted sum.
    return linear(deltas, effective)
