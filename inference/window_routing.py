"""Per-window routing for a batch whose windows were routed by different callers.

:meth:`inference.transcribe.ExpertWhisper.transcribe` routes every window of a call the same way (one language
per input, or language ID for all). A server batches windows of many requests, each with its own choice: one
asks for the ``uk`` expert, one for a language, one for ``auto``. A :class:`Route` carries that choice per
window, and :func:`route_windows` turns a batch of them into one :class:`~inference.routing.RoutingDecision`
for one ``generate`` call:

- windows with a given language are routed by :class:`~inference.routing.CallerLanguages`;
- windows with language ``"auto"`` are grouped by how they are detected (the learned router, or language ID
  among a set of candidates) and each group is decided on its own rows of the base model's encoder output, so
  a window's language never depends on the other windows of the batch;
- a window whose route names an expert (or the base model) is served by it, in the language decided above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from inference.bank import ExpertBank
from inference.batched_layer import BASE_ONLY
from inference.routing import CallerLanguages, FixedLanguage, LanguageIDRouting, LearnedRouting, RoutingDecision

# Route.expert: the expert of the window's language (the base model when the bank has none). Expert names are
# lowercase letters, digits, '.', '_' and '-' (registry.records.validate_name), so this never names an expert.
FROM_LANGUAGE = "<language>"


@dataclass(frozen=True)
class Route:
    """How one window is routed, when the caller decides (a server request's ``model`` and ``language``).

    Attributes:
        language: a Whisper code, or ``"auto"``: detected per window (the learned router of the options when
            the expert is also chosen by language, else language ID).
        expert: an expert name that serves the window whatever its language; None: the base model;
            :data:`FROM_LANGUAGE` (default): the expert of the window's language.
        candidates: with ``"auto"``, language ID chooses among these codes (None: the options' candidates).
    """

    language: str = "auto"
    expert: str | None = FROM_LANGUAGE
    candidates: tuple[str, ...] | None = None


def _group_key(route: Route, multilingual: bool, router, candidates) -> tuple:
    """Windows with the same key are decided together by one policy."""
    if route.language != "auto":
        return ("caller",)
    if not multilingual:
        return ("english",)
    if router is not None and route.expert == FROM_LANGUAGE and route.candidates is None:
        return ("router",)
    return ("language-id", route.candidates if route.candidates is not None else candidates)


def route_windows(bank: ExpertBank, routes: Sequence[Route], encoder_states: torch.Tensor | None, *,
                  multilingual: bool, threshold: float = 0.5, candidates: tuple[str, ...] | None = None,
                  router=None, frames: Sequence[int] | None = None
                  ) -> tuple[RoutingDecision, list[tuple[list[str], np.ndarray] | None]]:
    """One routing decision for a batch of windows, each routed by its own :class:`Route`.

    Args:
        bank: the experts the decision indexes.
        routes: one per window (row of the batch).
        encoder_states: the base model's encoder output (batch, frames, d_model); needed when a route's
            language is ``"auto"`` on a multilingual base.
        multilingual: False for an English-only base (``"auto"`` is then English).
        threshold, candidates: language ID's (see :class:`~inference.routing.LanguageIDRouting`).
        router: a :class:`~inference.router.LearnedRouter` for ``"auto"`` windows routed by language.
        frames: encoder frames with audio per window (the learned router pools over them).

    Returns:
        The decision (per row: expert ids and weights, language, its probability, expert name) and, per row,
        the detected language posterior ``(codes, probabilities)`` (None where the language was given).
    """
    n = len(routes)
    table: list[list[int]] = [[BASE_ONLY]] * n
    weights: list[list[float]] = [[1.0]] * n
    languages: list[str | None] = [None] * n
    probabilities: list[float | None] = [None] * n
    names: list[str | None] = [None] * n
    posteriors: list[tuple[list[str], np.ndarray] | None] = [None] * n
    groups: dict[tuple, list[int]] = {}
    for row, route in enumerate(routes):
        groups.setdefault(_group_key(route, multilingual, router, candidates), []).append(row)
    for key, rows in groups.items():
        # The whole batch is one group in transcribe(): use the tensor as is, as before this module existed.
        states = None if encoder_states is None else (
            encoder_states if len(rows) == n else encoder_states[rows])
        posterior = None
        if key[0] == "caller":
            decision = CallerLanguages(bank).route(languages=[routes[r].language for r in rows])
        elif key[0] == "english":
            decision = FixedLanguage(bank, "en").route(languages=["en"] * len(rows))
        elif key[0] == "router":  # the router's slot probabilities, summed per language, are the posterior
            policy = LearnedRouting(bank, router)
            probs = policy.probabilities(encoder_hidden_states=states,
                                         frames=None if frames is None else [frames[r] for r in rows])
            codes, by_language = policy.language_posterior(probs)
            decision, posterior = policy.decide(probs), (codes, by_language.cpu().numpy())
        else:
            policy = LanguageIDRouting(bank, threshold, key[1])
            codes, probs = policy.posterior(encoder_hidden_states=states)
            decision, posterior = policy.decide(codes, probs), (codes, probs.cpu().numpy())
        for j, row in enumerate(rows):
            table[row] = decision.experts[j].tolist()
            weights[row] = decision.weights[j].tolist()
            languages[row], probabilities[row], names[row] = (decision.languages[j], decision.probabilities[j],
                                                              decision.names[j])
            if posterior is not None:
                posteriors[row] = (posterior[0], posterior[1][j])
    for row, route in enumerate(routes):
        if route.expert != FROM_LANGUAGE:  # the caller's expert serves it, in the language decided above
            table[row] = [BASE_ONLY if route.expert is None else bank.index(route.expert)]
            weights[row] = [1.0]
            names[row] = route.expert
    k = max(len(ids) for ids in table)  # soft routing may mix k experts; pad the others with the base at weight 0
    table = [ids + [BASE_ONLY] * (k - len(ids)) for ids in table]
    weights = [ws + [0.0] * (k - len(ws)) for ws in weights]
    decision = RoutingDecision(torch.tensor(table, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
                               languages, probabilities, names)
    return decision, posteriors
