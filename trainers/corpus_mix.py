"""Several corpora in one training run: ``--data A --data B:0.5``.

Each corpus is given as ``DIR`` or ``DIR:WEIGHT`` (:class:`CorpusSpec`). The weight is a repeat factor per epoch:
an epoch draws ``round(weight * n)`` of a corpus's ``n`` training rows (speed/noise copies included), so each row
comes ``floor(weight)`` or ``ceil(weight)`` times: weight 1 takes every row once, 0.5 a random half (a different
half each epoch), 2 every row twice, 1.5 every row once and a random half again (:class:`CorpusMix`). The first
corpus is the target: validation, test and the manifest's ``corpus`` are its alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPEC_HELP = ("give a corpus directory as DIR or DIR:WEIGHT (a positive number, default 1), e.g. --data data/uk "
             "--data data/uk-synth:0.5")


@dataclass(frozen=True)
class CorpusSpec:
    """A training corpus and its mixing weight (see the module docstring).

    Args:
        path: the corpus directory.
        weight: repeat factor per epoch (> 0).
        spec: the text it was parsed from (error messages name it).
    """

    path: str
    weight: float = 1.0
    spec: str = ""

    @classmethod
    def parse(cls, spec: str | CorpusSpec) -> CorpusSpec:
        """``DIR`` or ``DIR:WEIGHT``; a directory whose own name holds a colon is taken whole. Checks the weight,
        not the directory (:meth:`check` does)."""
        if isinstance(spec, CorpusSpec):
            return spec
        spec = str(spec)
        if not spec.strip():
            raise ValueError(f"--data {spec!r}: empty; {SPEC_HELP}")
        head, sep, tail = spec.rpartition(":")
        if not sep or Path(spec).is_dir() or "/" in tail or "\\" in tail:
            return cls(spec, 1.0, spec)
        try:
            weight = float(tail)
        except ValueError:
            raise ValueError(f"--data {spec}: weight {tail!r} is not a number (and {spec} is no directory); "
                             f"{SPEC_HELP}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"--data {spec}: weight {tail} must be a positive number (1 takes every utterance "
                             f"once per epoch, 0.5 half of them, 2 each twice); {SPEC_HELP}")
        return cls(head, weight, spec)

    def check(self) -> CorpusSpec:
        """Raise a clear error when the directory is missing; returns self."""
        if not Path(self.path).expanduser().is_dir():
            raise ValueError(f"--data {self.spec or self.path}: no corpus directory {self.path}; {SPEC_HELP} "
                             "(`whisper-experts corpus synth` / `corpus from-dir` make one)")
        return self


def parse_corpora(data: str | CorpusSpec, extra: Sequence[str | CorpusSpec] = (), weight: float = 1.0
                  ) -> list[CorpusSpec]:
    """The run's corpora, target first: ``data`` (a directory, weighted by ``weight``) then ``extra`` specs."""
    first = CorpusSpec.parse(data) if isinstance(data, CorpusSpec) else CorpusSpec(str(data), 1.0, str(data))
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"data_weight {weight} must be a positive number; {SPEC_HELP}")
    first = CorpusSpec(first.path, first.weight * weight, first.spec)
    return [first, *(CorpusSpec.parse(s) for s in extra)]


def split_data_args(specs: str | Sequence[str]) -> tuple[str, float, tuple[str, ...]]:
    """``--data`` values (or a YAML ``data:`` string or list) -> (target directory, its weight, further specs)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError(f"no --data corpus given; {SPEC_HELP}")
    parsed = [CorpusSpec.parse(s) for s in specs]  # every weight checked now, before any work
    return parsed[0].path, parsed[0].weight, tuple(str(s) for s in specs[1:])


class CorpusMix:
    """The training rows each epoch draws from corpora laid end to end in one dataset.

    Args:
        spans: per corpus, (first row, end row, weight) in the concatenated training set.
        seed: with the epoch, seeds which rows a fractional weight draws.
    """

    def __init__(self, spans: Sequence[tuple[int, int, float]], seed: int = 0):
        self.spans, self.seed = [(int(a), int(b), float(w)) for a, b, w in spans], seed

    @staticmethod
    def draws(n: int, weight: float) -> int:
        """Rows an epoch takes from a corpus of ``n`` rows: ``round(weight * n)`` (halves round up)."""
        return math.floor(weight * n + 0.5)

    def __len__(self) -> int:
        return sum(self.draws(b - a, w) for a, b, w in self.spans)

    def rows(self, epoch: int) -> list[int]:
        """Row indices of ``epoch``: each corpus's rows ``floor(weight)`` times, then a random ``weight % 1``
        share of them, drawn without replacement (the same on every rank)."""
        out: list[int] = []
        for n, (start, end, weight) in enumerate(self.spans):
            size, k = end - start, self.draws(end - start, weight)
            if size == 0 or k == 0:
                continue
            full, rest = divmod(k, size)
            out += list(range(start, end)) * full
            if rest:
                rng = np.random.default_rng([abs(self.seed), epoch, n])
                out += (start + rng.choice(size, rest, replace=False)).tolist()
        return out
