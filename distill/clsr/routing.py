"""The routing state every CLSR layer of one model shares: active languages, gate noise, task, gate recording.

One :class:`ClsrRouting` object is referenced by all CLSR layers of a model (it is plain Python state, not a
module: it holds no weights). :mod:`distill.clsr.model` sets it (``set_language``, ``set_noise_scale``,
``set_task``, ``collect_gates``); the layers read it on every call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from distill.clsr.config import ClsrConfig

Groups = list[tuple[str | None, torch.Tensor | None]]


class GateRecorder:
    """Gate values ``g`` collected from every CLSR layer call during a forward pass.

    Each record is ``(layer, g)``: the layer's module path (``model.encoder.layers.0``) and the gate values of
    the tokens routed by a language gate in that call, shape ``(tokens,)`` (soft values in training; at inference
    0/1 for hard gates, ``sigmoid(G)`` for soft ones). Layer calls that ran the shared path only (translate mode,
    samples without a language, the training-time shared-only draw) record nothing: no gate was used. Compute the
    gate loss from the records before ``backward``: layers that activation checkpointing recomputes during
    ``backward`` record again.
    """

    def __init__(self) -> None:
        self.records: list[tuple[str, torch.Tensor]] = []

    def add(self, layer: str, gate: torch.Tensor) -> None:
        self.records.append((layer, gate.reshape(-1)))

    @property
    def values(self) -> list[torch.Tensor]:
        """The recorded gate tensors (keep their autograd graph: the gate budget loss trains the gates)."""
        return [g for _, g in self.records]

    def per_layer_mean(self) -> dict[str, float]:
        """Mean gate openness per layer (at inference with hard gates: the fraction of tokens on the language path)."""
        sums: dict[str, list[float]] = {}
        for layer, g in self.records:
            s = sums.setdefault(layer, [0.0, 0])
            s[0] += float(g.detach().float().sum())
            s[1] += g.numel()
        return {layer: total / max(count, 1) for layer, (total, count) in sums.items()}

    def clear(self) -> None:
        self.records.clear()


@dataclass
class ClsrRouting:
    """What the CLSR layers of one model do on their next calls.

    Attributes:
        config: the model's CLSR options (dropouts, shared-only probability; the default path kind for new
            languages).
        languages: ``None`` (shared path only), one language for the whole batch, or one entry per sample
            (``None`` entries run the shared path only).
        noise_scale: ``a`` in the training gate ``sigmoid(G + a * noise)``.
        gate_floor: ``f`` in the training mix's gate ``f + (1 - f) * g`` (``g`` the learned gate, which the budget
            loss and the gate records still see): 1 holds every gate open (the gate warm-up starts there), 0
            leaves gates as learned; inference gates ignore it.
        path_dropout_scale: the language paths' training dropout is ``path_dropout_scale * config.path_dropout``
            (the path-dropout ramp raises it from 0 to 1).
        translate: translate mode: every layer runs the shared path only.
        gate_modes: language -> how inference (eval mode) uses its gates: ``hard`` (DistilWhisper's: each token
            takes one path, ``1[G >= 0]``; the path not taken is not computed) or ``soft`` (both paths, mixed by
            ``sigmoid(G)`` without noise: what training's mix gives on average while ``G`` stays near 0). Set when
            a language is added (its config's, or its expert's recorded ``gate_inference``).
        recorder: where layers put their gate values, when gates are being collected.
    """

    config: ClsrConfig
    languages: str | tuple[str | None, ...] | None = None
    noise_scale: float = 0.0
    gate_floor: float = 0.0
    path_dropout_scale: float = 1.0
    translate: bool = False
    gate_modes: dict[str, str] = field(default_factory=dict)
    recorder: GateRecorder | None = None
    base_requires_grad: dict[str, bool] = field(default_factory=dict)  # restored by convert_from_clsr
    _groups: dict = field(default_factory=dict, repr=False)

    def set_languages(self, languages: str | Sequence[str | None] | None) -> None:
        if languages is not None and not isinstance(languages, str):
            languages = tuple(languages)
            if not languages:
                raise ValueError("set_language got an empty list of per-sample languages")
            if len(set(languages)) == 1:
                languages = languages[0]  # one language for the whole batch: no per-sample grouping
        self.languages = languages
        self._groups.clear()

    def groups(self, batch: int, device: torch.device) -> Groups:
        """``(language, sample indices)`` per language present in a batch of ``batch`` samples.

        Indices are ``None`` when one entry covers the whole batch. With per-sample languages for ``n``
        samples, a batch of ``k * n`` rows is the ``generate`` expansion (beams, ``num_return_sequences``):
        rows ``i * k .. i * k + k - 1`` belong to sample ``i``.
        """
        if self.languages is None or isinstance(self.languages, str):
            return [(self.languages, None)]
        key = (batch, str(device))
        if key not in self._groups:
            n = len(self.languages)
            if batch % n:
                raise ValueError(f"set_language was given {n} per-sample languages, but the batch has {batch} "
                                 "samples; pass one language per sample of the batch")
            per_row = [lang for lang in self.languages for _ in range(batch // n)]
            order = list(dict.fromkeys(per_row))
            self._groups[key] = [
                (lang, torch.tensor([i for i, x in enumerate(per_row) if x == lang], dtype=torch.long, device=device))
                for lang in order
            ]
        return self._groups[key]

    def gate_mode(self, language: str) -> str:
        """``hard`` or ``soft``: how inference uses ``language``'s gates (the config's for a language not listed)."""
        return self.gate_modes.get(language, self.config.gate_inference)

    def soft_inference(self, groups: Groups) -> bool:
        """Whether an inference call on ``groups`` mixes paths by soft gates: when any language in it has soft gates
        (the hard-gated ones then mix by their 0/1 gates, which takes each token's one path exactly)."""
        return any(lang is not None and self.gate_mode(lang) == "soft" for lang, _ in groups)

    def record(self, layer: str, gate: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.add(layer, gate)

    @contextlib.contextmanager
    def recording(self) -> Iterator[GateRecorder]:
        previous, self.recorder = self.recorder, GateRecorder()
        try:
            yield self.recorder
        finally:
            self.recorder = previous


@dataclass
class Plan:
    """What a CLSR fc1 decided for the current call, for its fc2 to finish.

    ``mode`` is ``shared`` (shared path only), ``soft`` (both paths side by side, mixed by ``gate`` of shape
    ``(*batch, 1)``, languages per ``groups``) or ``hard`` (``parts``: ``(language or None, token rows or None
    for all)``, each token on one path).
    """

    mode: str
    groups: Groups = field(default_factory=list)
    gate: torch.Tensor | None = None
    parts: list[tuple[str | None, torch.Tensor | None]] = field(default_factory=list)


class Handoff:
    """The plan passed from a layer's CLSR fc1 to its fc2 (Whisper calls fc1, the activation, then fc2)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None

    def take(self, where: str) -> Plan:
        plan, self.plan = self.plan, None
        if plan is None:
            raise RuntimeError(f"{where}: CLSR fc2 called without its fc1; the layer must compute fc2(act(fc1(x)))")
        return plan
