"""The CLSR feed-forward layer: a frozen shared FFN, one path per language, and a per-token gate per language.

Whisper's encoder and decoder layers compute ``fc2(dropout(act(fc1(x))))`` inside their own ``forward``. A
CLSR Whisper keeps that code and replaces the two linear layers by a pair that routes together:

* :class:`ClsrFc1` computes the language's gate ``G(x)`` on the FFN input, decides every token's route and
  returns the hidden activations of the path(s) taken. In training (soft gates) it returns the shared and the
  language path side by side, ``[fc1_shared(x), fc1_lang(x)]`` (2 * ffn_dim wide; Whisper's activation and
  activation dropout act elementwise, so each half gets what it would get alone). At inference (hard gates)
  it returns one row per token, from the path that token was routed to: the unused path is not computed.
* :class:`ClsrFc2` finishes each path with its own fc2 and mixes ``h = g * lang + (1 - g) * shared``.

The output of a block is ``h = g * FFN_lang(x) + (1 - g) * FFN_shared(x)`` with ``g = sigmoid(G + a * noise)``
in training and ``g = 1[G >= 0]`` at inference. The shared path is the pretrained ``fc1``/``fc2`` (frozen).

A layout with ``attention`` also replaces the attention projections of its layers by :class:`ClsrProj`: one
linear layer with its own gate per language, mixing ``g * path(x) + (1 - g) * shared(x)`` in one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.clsr.routing import ClsrRouting, Handoff, Plan


class ClsrGate(nn.Module):
    """A language's gate ``G(x) = w2 . ReLU(W1 dropout(x) + b1)``, one scalar per token.

    ``w2`` starts at zero, so ``G = 0`` exactly until training moves it.

    Args:
        d_model: input width.
        hidden: width of the ReLU layer (64 in DistilWhisper).
        dropout: dropout on ``x`` in training.
    """

    def __init__(self, d_model: int, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = dropout
        self.w1 = nn.Linear(d_model, hidden)
        self.w2 = nn.Linear(hidden, 1, bias=False)
        nn.init.zeros_(self.w2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., d_model) -> ``G`` (..., 1)."""
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.w2(F.relu(self.w1(x)))


class FullPath(nn.Linear):
    """A language's own copy of a pretrained linear layer (DistilWhisper's language-specific FFN)."""

    @classmethod
    def copy_of(cls, shared: nn.Linear) -> FullPath:
        path = cls(shared.in_features, shared.out_features, bias=shared.bias is not None,
                   device=shared.weight.device, dtype=shared.weight.dtype)
        with torch.no_grad():
            path.weight.copy_(shared.weight)
            if shared.bias is not None:
                path.bias.copy_(shared.bias)
        return path

    def language_linear(self, x: torch.Tensor, shared: nn.Linear, shared_out: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """The path's output on ``x`` (..., in_features); ``shared`` and ``shared_out`` are not needed here."""
        return F.linear(x, self.weight, self.bias)


class LowRankPath(nn.Module):
    """A language's low-rank delta on a shared linear layer: ``W x + b + (alpha / rank) * B A x``.

    ``lora_A`` (rank, in_features) starts random, ``lora_B`` (out_features, rank) at zero: the path starts equal
    to the shared layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def on(cls, shared: nn.Linear, rank: int, alpha: float) -> LowRankPath:
        return cls(shared.in_features, shared.out_features, rank, alpha,
                   device=shared.weight.device, dtype=shared.weight.dtype)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def language_linear(self, x: torch.Tensor, shared: nn.Linear, shared_out: torch.Tensor | None = None,
                        delta_dropout: float = 0.0) -> torch.Tensor:
        """The path's output on ``x`` (..., in_features); ``shared_out`` is ``shared(x)`` when the caller has it;
        ``delta_dropout``: training dropout on the delta alone (the shared part stays clean)."""
        base = shared(x) if shared_out is None else shared_out
        delta = self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return base + (F.dropout(delta, p=delta_dropout, training=True) if delta_dropout else delta)


def _take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put_rows(out: torch.Tensor | None, rows: torch.Tensor | None, value: torch.Tensor, batch: int) -> torch.Tensor:
    """``value`` placed at ``rows`` of ``out`` (out-of-place, so autograd sees it); the whole tensor if rows is None.

    ``out`` starts as zeros of ``value``'s dtype (under autocast a path's output dtype may differ from its input's).
    """
    if rows is None:
        return value
    if out is None:
        out = value.new_zeros((batch, *value.shape[1:]))
    return out.index_copy(0, rows, value)


class _ClsrLinear(nn.Module):
    """What fc1 and fc2 of a CLSR layer share: the frozen shared linear layer and the language paths."""

    def __init__(self, shared: nn.Linear, routing: ClsrRouting, handoff: Handoff | None, layer_name: str) -> None:
        super().__init__()
        self.shared = shared
        self.experts = nn.ModuleDict()
        # Plain Python state, not submodules: one routing object for the whole model, one handoff per layer.
        self.routing = routing
        self.handoff = handoff
        self.layer_name = layer_name

    @property
    def in_features(self) -> int:
        return self.shared.in_features

    @property
    def out_features(self) -> int:
        return self.shared.out_features

    def path_dropout(self) -> float:
        """The language paths' dropout for this call: the configured rate under its ramp in training, 0 otherwise."""
        return self.routing.config.path_dropout * self.routing.path_dropout_scale if self.training else 0.0

    def dropped_path(self, language: str, x: torch.Tensor, shared_out: torch.Tensor | None, p: float) -> torch.Tensor:
        """Training: ``language``'s path on ``x`` under path dropout ``p``, on its whole output or on its low-rank
        delta alone, as the config's ``path_dropout_on`` says."""
        expert = self.experts[language]
        if p and self.routing.config.path_dropout_on == "delta" and isinstance(expert, LowRankPath):
            return expert.language_linear(x, self.shared, shared_out, delta_dropout=p)
        out = expert.language_linear(x, self.shared, shared_out)
        return F.dropout(out, p=p, training=True) if p else out

    def path(self, language: str | None):
        """The function computing ``language``'s path on some rows (the shared layer for None)."""
        if language is None:
            return self.shared
        expert = self.experts[language]
        return lambda x: expert.language_linear(x, self.shared)

    def by_parts(self, x: torch.Tensor, parts: list) -> torch.Tensor:
        """Each token row of ``x`` (..., in) through the path of its part; rows of no part are not computed."""
        if len(parts) == 1 and parts[0][1] is None:
            return self.path(parts[0][0])(x)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for language, rows in parts:
            if rows.numel():
                y = self.path(language)(flat.index_select(0, rows))
                if out is None:  # allocated from the first output: autocast may change the dtype
                    out = y.new_empty(flat.shape[0], self.out_features)
                out.index_copy_(0, rows, y)
        return out.reshape(*x.shape[:-1], self.out_features)


class _GatedLinear(_ClsrLinear):
    """A CLSR linear layer that owns the gates and decides the routes (:class:`ClsrFc1`, :class:`ClsrProj`)."""

    def __init__(self, shared: nn.Linear, routing: ClsrRouting, handoff: Handoff | None, layer_name: str) -> None:
        super().__init__(shared, routing, handoff, layer_name)
        self.gates = nn.ModuleDict()

    def _soft_mode(self, groups) -> bool:
        """Whether this call mixes both paths by a gate (training, or inference where a language has soft gates)."""
        return self.training or self.routing.soft_inference(groups)

    def _use_gates(self, groups) -> bool:
        """Whether this call routes by the gates (else: the shared path only)."""
        routing = self.routing
        use_gates = not routing.translate and any(lang is not None for lang, _ in groups)
        if use_gates and self.training and routing.config.shared_only_prob > 0:
            # torch's generator (not Python's random): activation checkpointing replays the same draw.
            use_gates = bool(torch.rand(()) >= routing.config.shared_only_prob)
        return use_gates

    def _soft_gate(self, language: str, xs: torch.Tensor) -> torch.Tensor:
        """The gate of ``language`` on rows ``xs`` in a mixing call: in training a noisy sigmoid, recorded, then
        lifted by the floor; at inference the plain sigmoid for a language with soft gates, and for one with hard
        gates ``1[G >= 0]`` (beside a soft-gated language in a mixed batch: a 0/1 mix takes each token's one path
        exactly), recorded."""
        G = self.gates[language](xs)
        if not self.training and self.routing.gate_mode(language) == "hard":
            opened = (G >= 0).to(G.dtype)
            self.routing.record(self.layer_name, opened)
            return opened
        noise, floor = (self.routing.noise_scale, self.routing.gate_floor) if self.training else (0.0, 0.0)
        g = torch.sigmoid(G + noise * torch.randn_like(G) if noise else G)
        # The learned gate is what the budget loss and the logs see; under a gate warm-up the mix uses it lifted
        # towards 1 (held open at f = 1, where the CE gradient reaching the gate is scaled by 1 - f).
        self.routing.record(self.layer_name, g)
        return floor + (1.0 - floor) * g if floor else g

    def _soft_paths(self, x: torch.Tensor, groups, shared_out: torch.Tensor, dropout: float = 0.0):
        """Soft gates: ``(gate, language output)`` for the whole batch, each sample's rows from its language's gate
        and path (under path dropout ``dropout``: see :meth:`dropped_path`). Samples without a language keep
        ``g = 0`` and a zero language output, so any mix leaves them on the shared path."""
        gate = out = None
        for language, samples in groups:
            if language is None:
                continue
            xs = _take_rows(x, samples)
            g = self._soft_gate(language, xs)
            y = self.dropped_path(language, xs, _take_rows(shared_out, samples), dropout)
            gate, out = _put_rows(gate, samples, g, x.shape[0]), _put_rows(out, samples, y, x.shape[0])
        return gate, out

    def _hard_parts(self, x: torch.Tensor, groups) -> list:
        """Each token's route at inference (hard gates): ``(language or None, token rows or None for all)``."""
        tokens = x[0].numel() // x.shape[-1]  # tokens per sample
        if len(groups) == 1 and groups[0][1] is None:
            opened = self.gates[groups[0][0]](x).squeeze(-1) >= 0
            self.routing.record(self.layer_name, opened.to(x.dtype))
            n_open = int(opened.sum())  # one host sync decides between the whole-batch fast paths
            if n_open == opened.numel():
                return [(groups[0][0], None)]
            if n_open == 0:
                return [(None, None)]
            flat = opened.reshape(-1)
            return [(groups[0][0], flat.nonzero().squeeze(1)), (None, (~flat).nonzero().squeeze(1))]
        parts, shared_rows = [], []
        arange = torch.arange(tokens, device=x.device)
        for language, samples in groups:
            rows = (samples[:, None] * tokens + arange).reshape(-1)
            if language is None:
                shared_rows.append(rows)
                continue
            opened = (self.gates[language](x.index_select(0, samples)) >= 0).reshape(-1)
            self.routing.record(self.layer_name, opened.to(x.dtype))
            parts.append((language, rows[opened]))
            shared_rows.append(rows[~opened])
        parts.append((None, torch.cat(shared_rows)))
        return parts


class ClsrFc1(_GatedLinear):
    """A CLSR layer's entry (replaces ``fc1``): gates, routing decision, and the first linear layer of each path.

    Attributes:
        shared: the pretrained ``fc1`` (frozen).
        experts: language -> :class:`FullPath` or :class:`LowRankPath` on ``fc1``.
        gates: language -> :class:`ClsrGate`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, ..., d_model) -> hidden (batch, ..., ffn_dim), or (..., 2 * ffn_dim) with soft gates."""
        groups = self.routing.groups(x.shape[0], x.device)
        if not self._use_gates(groups):
            self.handoff.plan = Plan("shared")
            return self.shared(x)
        return self._soft(x, groups) if self._soft_mode(groups) else self._hard(x, groups)

    def _soft(self, x: torch.Tensor, groups) -> torch.Tensor:
        h_shared = self.shared(x)
        # The path dropout acts on fc2's output, which holds the whole path; dropping the deltas alone drops fc1's too.
        p = self.path_dropout() if self.routing.config.path_dropout_on == "delta" else 0.0
        gate, h_lang = self._soft_paths(x, groups, h_shared, dropout=p)
        self.handoff.plan = Plan("soft", groups=groups, gate=gate)
        return torch.cat([h_shared, h_lang], dim=-1)

    def _hard(self, x: torch.Tensor, groups) -> torch.Tensor:
        parts = self._hard_parts(x, groups)
        self.handoff.plan = Plan("hard", parts=parts)
        return self.by_parts(x, parts)


class ClsrFc2(_ClsrLinear):
    """A CLSR layer's exit (replaces ``fc2``): the second linear layer of each path, and the gated mix.

    Attributes:
        shared: the pretrained ``fc2`` (frozen).
        experts: language -> :class:`FullPath` or :class:`LowRankPath` on ``fc2``.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden activations from :class:`ClsrFc1` (after Whisper's activation) -> (batch, ..., d_model)."""
        plan = self.handoff.take(self.layer_name)
        if plan.mode == "shared":
            return self.shared(h)
        if plan.mode == "hard":
            return self.by_parts(h, plan.parts)
        h_shared, h_lang = h.split(self.in_features, dim=-1)
        out_shared = self.shared(h_shared)
        out_lang, p = None, self.path_dropout()
        for language, samples in plan.groups:
            if language is None:
                continue
            ol = self.dropped_path(language, _take_rows(h_lang, samples), None, p)
            out_lang = _put_rows(out_lang, samples, ol, h.shape[0])
        g = plan.gate
        return g * out_lang + (1 - g) * out_shared


class ClsrProj(_GatedLinear):
    """A gated language path on one attention projection (replaces ``q_proj``, ``k_proj``, ``v_proj`` or
    ``out_proj`` of a CLSR layer whose layout has ``attention``): its own gate on the projection's input decides,
    per token, between the shared projection and the language's path on it.

    The output is ``g * path(x) + (1 - g) * shared(x)``, the same mix as a CLSR FFN block; with a low-rank path
    that is ``shared(x) + g * delta(x)``, a LoRA delta that each token's gate switches on or off. Unlike fc1 / fc2
    no handoff is needed: the projection routes and mixes in one call.

    Attributes:
        shared: the pretrained projection (frozen).
        experts: language -> :class:`FullPath` or :class:`LowRankPath` on it.
        gates: language -> :class:`ClsrGate`.
    """

    def __init__(self, shared: nn.Linear, routing: ClsrRouting, layer_name: str) -> None:
        super().__init__(shared, routing, None, layer_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, ..., in_features) -> (batch, ..., out_features)."""
        groups = self.routing.groups(x.shape[0], x.device)
        if not self._use_gates(groups):
            return self.shared(x)
        if not self._soft_mode(groups):
            return self.by_parts(x, self._hard_parts(x, groups))
        out_shared = self.shared(x)
        gate, out_lang = self._soft_paths(x, groups, out_shared, dropout=self.path_dropout())
        return gate * out_lang + (1 - gate) * out_shared


def new_path(shared: nn.Linear, kind: str, rank: int, alpha: float):
    """A fresh language path on ``shared``, equal to it."""
    return FullPath.copy_of(shared) if kind == "full" else LowRankPath.on(shared, rank, alpha)


def new_language_paths(fc1: ClsrFc1, fc2: ClsrFc2, kind: str, rank: int, alpha: float):
    """Fresh (fc1 path, fc2 path) for a new language, equal to the shared FFN."""
    return new_path(fc1.shared, kind, rank, alpha), new_path(fc2.shared, kind, rank, alpha)
