"""Fusing experts: a merge method applied to every parameter of several task vectors, and the fused expert.

>>> result = merge([task_vector(uk), task_vector(ru)], [0.7, 0.3], "ties", density=0.2)
>>> expert = fused_expert(result, [uk, ru], names=["uk-small", "ru-espeak"])

The methods themselves (``linear``, ``svd``, ``ties``, ``dare_linear``/``dare``, ``dare_ties``,
``magnitude_prune``, ``lors``, ``task_arithmetic``) are pure functions in ``lora_experts.merge_methods``,
listed in ``MERGE_METHODS``. This module lines the experts' parameters up (an expert that does not touch a
parameter contributes a zero delta; experts of different ranks and targets fuse), seeds stochastic methods per
parameter, keeps the inputs' dtype, and records how the result was made in the fused expert's lineage.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lora_experts.merge_methods import MERGE_METHODS
from lora_experts.task_vectors import (Delta, LowRank, TaskVector, expert_from_task_vector, relative_error,
                                       task_vector)
from registry.expert_file import Expert


@dataclass
class MergeResult:
    """A fused task vector and how it was made.

    Attributes:
        task_vector: parameter name -> merged delta (``LowRank`` where the method is exactly low-rank), in the
            inputs' dtype. Entries may share storage with the inputs (e.g. an expert fused at weight 1 alone).
        method, weights, options: the recipe (``options`` includes ``seed`` for stochastic methods).
        errors: parameter name -> relative Frobenius error, for methods that truncate (``svd``, ``lors``).
        relative_error: the whole task vector's relative Frobenius error (None when nothing was truncated).
    """

    task_vector: TaskVector
    method: str
    weights: list[float] | None
    options: dict
    errors: dict[str, float] = field(default_factory=dict)
    relative_error: float | None = None

    @property
    def low_rank(self) -> bool:
        """Every entry is exactly low-rank: the result stores as a ``lora`` expert."""
        return bool(self.task_vector) and all(isinstance(v, LowRank) for v in self.task_vector.values())


def method_options(method: str) -> dict:
    """The options of a merge method and their defaults, e.g. ``{"density": 0.2, "lam": 1.0, ...}``."""
    fn = _method(method)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def _method(method: str):
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[method]


def _shape(name: str, present: Sequence[Delta | None]) -> torch.Size:
    shapes = [(i, tuple(d.shape)) for i, d in enumerate(present) if d is not None]
    for i, s in shapes[1:]:
        if s != shapes[0][1]:
            raise ValueError(f"{name}: expert {shapes[0][0]} has shape {shapes[0][1]} but expert {i} has {s}; "
                             "experts made for different Whisper sizes cannot be fused")
    return torch.Size(shapes[0][1])


def _prepare(delta: Delta | None, shape: torch.Size, device: torch.device) -> Delta:
    """A delta as float32 on ``device``; a missing one as a zero (rank-0 for a matrix, so it adds no rank)."""
    if delta is None:
        if len(shape) == 2:
            return LowRank(torch.zeros(0, shape[1], device=device), torch.zeros(shape[0], 0, device=device))
        return torch.zeros(shape, device=device)
    return delta.to(device, torch.float32)


def _common_dtype(task_vectors: Sequence[Mapping[str, Delta]]) -> torch.dtype:
    dtypes = {d.dtype for tv in task_vectors for d in tv.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def merge(task_vectors: Sequence[Mapping[str, Delta]], weights: Sequence[float] | None = None,
          method: str = "linear", *, seed: int = 0, device: str | torch.device | None = None,
          **options) -> MergeResult:
    """Fuse task vectors parameter by parameter with a registered merge method.

    Args:
        task_vectors: one per expert (:func:`lora_experts.task_vectors.task_vector`); parameter name -> delta.
            Experts may touch different parameters (a missing one is a zero delta) and have different ranks.
        weights: one per expert (negative ones subtract), or None for the method's default (1.0 each;
            ``task_arithmetic``: target 1, supports averaged). A parameter only experts of weight 0 touch is
            left out.
        method: a name in ``MERGE_METHODS``.
        seed: seeds stochastic methods (DARE), per parameter: same seed, same result.
        device: where to compute; default where the tensors are, or CUDA for CPU tensors when present.
        options: the method's options (see :func:`method_options`).

    Returns:
        A :class:`MergeResult`; merged deltas keep the inputs' dtype (float32 if the inputs' dtypes differ) and
        shapes, and stay on the compute device.
    """
    fn = _method(method)
    known = method_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"merge method {method!r} has no option {', '.join(unknown)}; its options are "
                         f"{', '.join(f'{k}={v!r}' for k, v in known.items()) or 'none'}")
    if not task_vectors:
        raise ValueError("nothing to merge: no task vectors given")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(task_vectors):
            raise ValueError(f"{len(weights)} weights for {len(task_vectors)} experts; give one weight per expert")
    names = sorted(set().union(*task_vectors))
    if not names:
        raise ValueError("the experts' task vectors are all empty")
    dtype = _common_dtype(task_vectors)
    if device is None:  # where the tensors are; CPU tensors go to the GPU when there is one
        device = next(iter(next(tv for tv in task_vectors if tv).values())).device
        if device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda")
    device = torch.device(device)

    merged, errors, norms = {}, {}, {}
    for name in names:
        present = [tv.get(name) for tv in task_vectors]
        if weights is not None and all(d is None or w == 0 for d, w in zip(present, weights)):
            continue  # only zero-weight experts touch it: its fused delta is exactly zero
        shape = _shape(name, present)
        deltas = [_prepare(d, shape, device) for d in present]
        # A generator per parameter, seeded from (seed, name): results do not depend on which other
        # parameters are merged, nor in which order.
        generator = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        out = fn(deltas, weights, generator, **options)
        if isinstance(out.delta, LowRank) and out.delta.rank == 0:
            continue  # an exactly zero low-rank delta (e.g. lam=0 over the only experts touching it)
        merged[name] = out.delta.to(dtype=dtype)
        if out.error is not None:
            errors[name], norms[name] = out.error, out.norm
    recorded = {**options, "seed": seed} if fn.stochastic else dict(options)
    return MergeResult(merged, method, weights, recorded, errors, relative_error(errors, norms) if errors else None)


def common_base(parents: Sequence[Expert], names: Sequence[str], verb: str = "fused") -> dict:
    """The base model record the experts share (their manifests' ``base``).

    Raises:
        ValueError: two experts of different bases, named with both fingerprints (their deltas cannot be
            ``verb``: they live in different weight spaces).
    """
    first = parents[0].manifest["base"]
    for expert, name in zip(parents[1:], names[1:]):
        other = expert.manifest["base"]
        if other.get("fingerprint") != first.get("fingerprint"):
            raise ValueError(f"expert {name} was trained on base {other.get('name')} ({other.get('fingerprint')}) "
                             f"but {names[0]} on {first.get('name')} ({first.get('fingerprint')}); only experts of "
                             f"one base model can be {verb}")
    return first


def fused_expert(result: MergeResult, parents: Sequence[Expert], names: Sequence[str] | None = None, *,
                 languages: Sequence[str] | None = None, hyperparameters: dict | None = None, **extra) -> Expert:
    """The storable expert of a merge: ``lora`` when exactly low-rank, else ``task_vector``.

    Args:
        result: from :func:`merge` over ``parents``' task vectors, in the same order.
        parents: the fused experts (their base must be one and the same).
        names: how the parents are known (registry references), recorded in the lineage.
        languages: the fused expert's languages; default the target's for ``task_arithmetic``, else the
            union of the parents'.
        hyperparameters, extra: further manifest content (see ``expert_from_task_vector``).
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(parents))]
    if len(names) != len(parents) or (result.weights is not None and len(result.weights) != len(parents)):
        raise ValueError(f"{len(parents)} parents, {len(names)} names and {len(result.weights or parents)} weights; "
                         "give one of each per fused expert, in the order they were merged")
    base = common_base(parents, names)
    if languages is None:
        pool = parents[:1] if result.method == "task_arithmetic" else parents
        languages = list(dict.fromkeys(lang for p in pool for lang in p.languages))
    lineage = {
        "parents": [{"expert": n, "languages": p.languages, "kind": p.kind,
                     "weight": None if result.weights is None else result.weights[i]}
                    for i, (n, p) in enumerate(zip(names, parents))],
        "method": result.method,
        "weights": result.weights,
        "options": result.options,
    }
    if result.relative_error is not None:
        lineage["relative_error"] = result.relative_error
        lineage["max_parameter_error"] = max(result.errors.values())
    return expert_from_task_vector(result.task_vector, languages=languages, base=base,
                                   hyperparameters=hyperparameters, lineage=lineage, **extra)


def fuse_experts(experts: Sequence[Expert], weights: Sequence[float] | None = None, method: str = "linear", *,
                 names: Sequence[str] | None = None, languages: Sequence[str] | None = None, seed: int = 0,
                 device: str | torch.device | None = None, **options) -> tuple[Expert, MergeResult]:
    """Fuse stored ``lora`` / ``task_vector`` experts into one expert (see :func:`merge`, :func:`fused_expert`)."""
    common_base(experts, list(names) if names is not None else [f"#{i}" for i in range(len(experts))])
    result = merge([task_vector(e) for e in experts], weights, method, seed=seed, device=device, **options)
    return fused_expert(result, experts, names, languages=languages), result
