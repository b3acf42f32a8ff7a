"""Routing policies: which expert(s) of a bank serve each sample of a batch.

A policy is a small object with one method, ``route(features=None, languages=None)``, that returns a
:class:`RoutingDecision`: per sample, expert ids and mixing weights (what :meth:`ExpertBank.route` takes) plus
the language each sample is decoded in and, for language ID, its probability. Policies read the bank when
they route, so experts added to or removed from a live model are taken into account.

==========================  ===========================================================================
:class:`FixedLanguage`      every sample in one language, served by that language's expert
:class:`CallerLanguages`    the caller gives each sample's language
:class:`LanguageIDRouting`  Whisper's own language ID (first decoder step, base model) picks the expert;
                            below ``threshold``, or for a language with no expert, the base model serves it
:class:`SoftLanguageRouting` the top-k languages' experts, mixed by the language posterior
``LearnedRouting``          a small trained gate over the bank's experts (:mod:`inference.router`)
==========================  ===========================================================================

Usage::

    policy = LanguageIDRouting(bank, threshold=0.5)
    decision = policy.route(features)
    with bank.route(decision):
        model.generate(features, language=decision.languages, num_beams=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from inference.bank import ExpertBank
from inference.batched_layer import BASE_ONLY
from inference.decoding import language_posterior
from inference.router import LearnedRouter


@dataclass
class RoutingDecision:
    """A policy's answer for one batch.

    Attributes:
        experts: (batch, k) long expert ids in the bank (:data:`BASE_ONLY` = -1: the base model).
        weights: (batch, k) float mixing weights (1 for hard routing).
        languages: per sample, the language to decode in (given or detected; None if unknown).
        probabilities: per sample, the language ID probability of that language (None when not detected).
        names: per sample, the name of the expert with the largest weight (None: the base model).
    """

    experts: torch.Tensor
    weights: torch.Tensor
    languages: list[str | None]
    probabilities: list[float | None]
    names: list[str | None]

    def __len__(self) -> int:
        return self.experts.shape[0]


def _decision(bank: ExpertBank, table: list[list[int]], weights: list[list[float]], languages, probabilities):
    names = []
    for ids, ws in zip(table, weights):
        best = max(range(len(ids)), key=lambda j: (ids[j] != BASE_ONLY and ws[j] > 0, ws[j]))
        names.append(bank.experts[ids[best]].name if ids[best] != BASE_ONLY and ws[best] > 0 else None)
    return RoutingDecision(torch.tensor(table, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
                           list(languages), list(probabilities), names)


def _batch_size(features, languages) -> int:
    if features is not None:
        return features.shape[0]
    if languages is not None:
        return len(languages)
    raise ValueError("routing needs the batch: pass features (batch, n_mels, frames) or one language per sample")


class RoutingPolicy:
    """Interface: ``route(features=None, languages=None) -> RoutingDecision`` for one batch."""

    def __init__(self, bank: ExpertBank):
        self.bank = bank

    def route(self, features: torch.Tensor | None = None,
              languages: Sequence[str | None] | None = None) -> RoutingDecision:
        """Decide the experts of one batch.

        Args:
            features: log-mel features (batch, n_mels, frames), for policies that listen.
            languages: a Whisper code (or None) per sample, for policies told the language.
        """
        raise NotImplementedError

    def _hard(self, languages: Sequence[str | None], probabilities=None) -> RoutingDecision:
        by_language = self.bank.expert_for_language()
        table = [[by_language.get(lang, BASE_ONLY) if lang else BASE_ONLY] for lang in languages]
        probabilities = probabilities if probabilities is not None else [None] * len(languages)
        return _decision(self.bank, table, [[1.0]] * len(table), languages, probabilities)


class FixedLanguage(RoutingPolicy):
    """Every sample is in ``language`` and uses its expert (the base model if the bank has none for it)."""

    def __init__(self, bank: ExpertBank, language: str):
        super().__init__(bank)
        self.language = language

    def route(self, features=None, languages=None) -> RoutingDecision:
        return self._hard([self.language] * _batch_size(features, languages))


class CallerLanguages(RoutingPolicy):
    """The caller knows each sample's language; a language without an expert (or None) gets the base model."""

    def route(self, features=None, languages=None) -> RoutingDecision:
        if languages is None:
            raise ValueError("CallerLanguages routing needs languages: one Whisper code (or None) per sample")
        if features is not None and len(languages) != features.shape[0]:
            raise ValueError(f"{len(languages)} languages for a batch of {features.shape[0]} samples")
        return self._hard(list(languages))


class LanguageIDRouting(RoutingPolicy):
    """Route each sample to the expert of the language Whisper detects in it.

    Language ID runs on the base model (every expert off), so it is Whisper's own judgement.

    Args:
        threshold: below this probability of the detected language, the base model serves the sample.
        candidates: languages language ID may choose from (None: every Whisper language). Restricting it to
            the bank's languages raises their probabilities; keep "other" languages in if base-model fallback
            for them matters.
    """

    def __init__(self, bank: ExpertBank, threshold: float = 0.5, candidates: Iterable[str] | None = None):
        super().__init__(bank)
        self.threshold = threshold
        self.candidates = None if candidates is None else list(candidates)

    def posterior(self, features: torch.Tensor | None = None, *,
                  encoder_hidden_states: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
        """(codes, probabilities (batch, languages)) from the base model, given log-mel features or the base
        model's encoder outputs (see :func:`language_posterior`)."""
        with self.bank.route(None):
            return language_posterior(self.bank.model, features, self.candidates,
                                      encoder_hidden_states=encoder_hidden_states)

    def route(self, features=None, languages=None) -> RoutingDecision:
        if features is None:
            raise ValueError("language-ID routing listens to the audio: pass features")
        return self.decide(*self.posterior(features))

    def decide(self, codes: list[str], probs: torch.Tensor) -> RoutingDecision:
        """The decision for a language posterior already computed (codes, probabilities (batch, languages))."""
        best_p, best = probs.max(-1)
        detected = [codes[i] for i in best.tolist()]
        confidence = best_p.tolist()
        decision = self._hard(detected, confidence)
        for n, p in enumerate(confidence):
            if p < self.threshold:  # unsure: the base model, though the decoder still gets the detected language
                decision.experts[n] = BASE_ONLY
                decision.names[n] = None
        return decision


class SoftLanguageRouting(LanguageIDRouting):
    """Mix the experts of the ``top_k`` most probable languages, weighted by the language posterior.

    Args:
        top_k: languages mixed per sample. A language among them with no expert contributes the base model
            (a zero update), so its share of the weight is the base model's.
        normalize: rescale the top-k probabilities to sum to 1 (else the mass outside the top k goes to the
            base model).
        threshold: if the top language's probability is below it, the sample gets the base model only.
    """

    def __init__(self, bank: ExpertBank, top_k: int = 2, normalize: bool = True, threshold: float = 0.0,
                 candidates: Iterable[str] | None = None):
        super().__init__(bank, threshold, candidates)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k, self.normalize = top_k, normalize

    def route(self, features=None, languages=None) -> RoutingDecision:
        if features is None:
            raise ValueError("soft language routing listens to the audio: pass features")
        return self.decide(*self.posterior(features))

    def decide(self, codes: list[str], probs: torch.Tensor) -> RoutingDecision:
        k = min(self.top_k, len(codes))
        top_p, top = probs.topk(k, dim=-1)
        if self.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        by_language = self.bank.expert_for_language()
        table, weights, detected, confidence = [], [], [], []
        for row_ids, row_p, full_p in zip(top.tolist(), top_p.tolist(), probs.max(-1).values.tolist()):
            detected.append(codes[row_ids[0]])
            confidence.append(full_p)
            if full_p < self.threshold:
                table.append([BASE_ONLY] * k)
                weights.append([0.0] * k)
                continue
            table.append([by_language.get(codes[i], BASE_ONLY) for i in row_ids])
            weights.append(row_p)
        return _decision(self.bank, table, weights, detected, confidence)


class LearnedRouting(RoutingPolicy):
    """Route each sample by a :class:`LearnedRouter`: hard to its top slot, or mixing the top ``top_k``.

    The sample is decoded in the top slot's language; its ``probabilities`` entry is the router's probability
    of that language (summed over the slots that decode in it).

    Args:
        router: trained for this bank's experts (checked on every route: the bank may change while live).
        top_k: slots mixed per sample (1: hard routing, the default). A base-model slot among them contributes
            no update, so its share of the weight is the base model's.
        normalize: rescale the top-k probabilities to sum to 1 (else the rest goes to the base model).
    """

    def __init__(self, bank: ExpertBank, router: LearnedRouter, top_k: int = 1, normalize: bool = True):
        super().__init__(bank)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.router, self.top_k, self.normalize = router, top_k, normalize
        router.slot_ids(bank)  # refuse a foreign bank now, not at the first batch

    def probabilities(self, features: torch.Tensor | None = None, *, encoder_hidden_states: torch.Tensor | None = None,
                      frames=None) -> torch.Tensor:
        """The router's slot probabilities (batch, slots), from log-mel ``features`` (batch, n_mels, 3000)
        through the base model's encoder, or from its output already computed (batch, frames, d_model).
        ``frames``: per sample, the encoder frames that carry audio (None: all)."""
        if encoder_hidden_states is None:
            if features is None:
                raise ValueError("learned routing listens to the audio: pass features or encoder hidden states")
            with self.bank.route(None), torch.no_grad():  # the router was trained on the base model's encoder
                encoder_hidden_states = self.bank.model.get_encoder()(features).last_hidden_state
        self.router.to(encoder_hidden_states.device).eval()
        return self.router.probabilities(encoder_hidden_states, frames)

    def route(self, features=None, languages=None, *, encoder_hidden_states=None, frames=None) -> RoutingDecision:
        return self.decide(self.probabilities(features, encoder_hidden_states=encoder_hidden_states, frames=frames))

    def decide(self, probs: torch.Tensor) -> RoutingDecision:
        """The decision for slot probabilities already computed (batch, slots)."""
        ids = self.router.slot_ids(self.bank)
        probs = probs.detach().float().cpu()
        k = min(self.top_k, probs.shape[1])
        top_p, top = probs.topk(k, dim=-1)
        if self.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        codes, by_language = self.language_posterior(probs)
        languages = [self.router.slots[i][1] for i in top[:, 0].tolist()]
        confidence = [float(by_language[n, codes.index(lang)]) for n, lang in enumerate(languages)]
        return _decision(self.bank, ids[top].tolist(), top_p.tolist(), languages, confidence)

    def language_posterior(self, probs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """(codes, probabilities (batch, len(codes))): the slot probabilities summed per language."""
        codes = list(dict.fromkeys(self.router.languages))
        index = torch.tensor([codes.index(lang) for lang in self.router.languages])
        out = torch.zeros(probs.shape[0], len(codes), dtype=probs.dtype, device=probs.device)
        return codes, out.index_add_(1, index.to(probs.device), probs)


POLICIES = {
    "fixed": FixedLanguage,
    "caller": CallerLanguages,
    "language-id": LanguageIDRouting,
    "soft": SoftLanguageRouting,
    "learned": LearnedRouting,
}
