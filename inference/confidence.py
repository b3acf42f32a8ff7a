"""How sure a WER is: bootstrap confidence intervals over utterances, and paired comparisons of two systems.

Corpus-level WER is total word errors over total reference words. Resampling utterances with replacement
(1,000 times by default) and recomputing that ratio gives its sampling spread; the 2.5th and 97.5th
percentiles are the 95% interval. Two systems decoded on the same utterances are compared on the same
resamples (the paired bootstrap of Bisani & Ney, 2004), which is far tighter than comparing two intervals:
the difference is significant at 5% when its interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
import numpy as np

N_RESAMPLES = 1000


@dataclass(frozen=True)
class Counts:
    """Per-utterance error and reference-length counts (normalized text), shape ``(n,)`` each."""

    word_errors: np.ndarray
    words: np.ndarray
    char_errors: np.ndarray
    chars: np.ndarray


def utterance_counts(references: Sequence[str], hypotheses: Sequence[str]) -> Counts:
    """Edit counts per utterance. Texts are taken as already normalized; empty references count 0 words."""
    we, w, ce, c = [], [], [], []
    for ref, hyp in zip(references, hypotheses):
        if not ref.strip():
            we.append(0), w.append(0), ce.append(0), c.append(0)
            continue
        words = jiwer.process_words(ref, hyp or "")
        chars = jiwer.process_characters(ref, hyp or "")
        we.append(words.substitutions + words.deletions + words.insertions)
        w.append(len(ref.split()))
        ce.append(chars.substitutions + chars.deletions + chars.insertions)
        c.append(len(ref))
    return Counts(*(np.asarray(x, dtype=np.int64) for x in (we, w, ce, c)))


def _resamples(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(errors: np.ndarray, totals: np.ndarray, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``sum(errors) / sum(totals)`` over utterance resamples.

    Args:
        errors, totals: per-utterance counts, shape ``(n,)``.
        level: coverage of the interval.

    Returns:
        ``(low, high)`` as fractions; ``(nan, nan)`` for no utterances.
    """
    errors, totals = np.asarray(errors), np.asarray(totals)
    if errors.size == 0 or totals.sum() == 0:
        return float("nan"), float("nan")
    idx = _resamples(errors.size, n_resamples, seed)
    rates = errors[idx].sum(1) / np.maximum(totals[idx].sum(1), 1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(rates, tail)), float(np.percentile(rates, 100 - tail))


@dataclass(frozen=True)
class PairedDifference:
    """System B's rate minus system A's on the same utterances, with its bootstrap interval and p-value."""

    a: float
    b: float
    difference: float
    low: float
    high: float
    p_value: float  # two-sided: how often the resampled difference falls on the other side of 0

    @property
    def relative(self) -> float:
        """(b - a) / a: -0.4 is a 40% relative cut."""
        return self.difference / self.a if self.a else float("nan")

    @property
    def significant(self) -> bool:
        return not (self.low <= 0.0 <= self.high)

    def as_dict(self, n: int | None = None) -> dict:
        """``{"a", "b", "difference", "relative", "ci95", "p_value", "significant"}`` (and ``n`` when given), as
        reports store it and :func:`format_change` reads it."""
        out = {"a": self.a, "b": self.b, "difference": self.difference, "relative": self.relative,
               "ci95": [self.low, self.high], "p_value": self.p_value, "significant": self.significant}
        return out if n is None else {**out, "n": n}


def paired_bootstrap(errors_a: np.ndarray, errors_b: np.ndarray, totals: np.ndarray, *,
                     n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """Compare two systems' corpus-level error rates on the same utterances (same ``totals``).

    Args:
        errors_a, errors_b: per-utterance errors of system A (e.g. the base) and B (e.g. with an expert).
        totals: per-utterance reference words (or characters).
    """
    errors_a, errors_b, totals = (np.asarray(x) for x in (errors_a, errors_b, totals))
    if not (errors_a.shape == errors_b.shape == totals.shape):
        raise ValueError(f"paired comparison needs the same utterances: shapes {errors_a.shape}, "
                         f"{errors_b.shape}, {totals.shape}")
    total = max(int(totals.sum()), 1)
    a, b = errors_a.sum() / total, errors_b.sum() / total
    idx = _resamples(errors_a.size, n_resamples, seed)
    denominators = np.maximum(totals[idx].sum(1), 1)
    diffs = (errors_b[idx].sum(1) - errors_a[idx].sum(1)) / denominators
    tail = 100 * (1 - level) / 2
    p = 2 * min(float((diffs >= 0).mean()), float((diffs <= 0).mean()))
    return PairedDifference(float(a), float(b), float(b - a), float(np.percentile(diffs, tail)),
                            float(np.percentile(diffs, 100 - tail)), min(p, 1.0))


def format_change(paired: dict | None) -> str:
    """``"-31% (-21.1 [-23.8, -18.6])"``: relative change and the paired difference in points with its 95%
    interval, from :func:`inference.evaluation.paired_comparison`'s entry; blank without one."""
    if not paired:
        return ""
    low, high = paired["ci95"]
    return (f"{100 * paired['relative']:+.0f}% ({100 * paired['difference']:+.1f} "
            f"[{100 * low:+.1f}, {100 * high:+.1f}])")


def format_ci(rate: float, ci: tuple[float, float] | None) -> str:
    """``"41.2 [37.9, 44.8]"`` in percent."""
    if ci is None or np.isnan(ci[0]):
        return f"{100 * rate:.1f}"
    return f"{100 * rate:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
