"""Decoding: language ID and batched transcription with a guard against runaway repetition.

Whisper sometimes falls into a loop on audio it does not understand ("yeme, yeme, yeme, ...") and keeps
going until the token limit; one such hypothesis adds dozens of insertions and can dominate a language's
WER. Two guards are applied, and reported:

- a length bound (``max_new_tokens``), derived by the caller from reference lengths or audio duration;
- :class:`RepetitionGuard`, a logits processor that ends a hypothesis as soon as its tail is one unit of
  1-16 tokens repeated ``repeats`` times in a row (single tokens: ``2 * repeats``), after which
  :func:`cut_loop` keeps one copy of the unit. Ordinary text does not repeat a phrase four times in a row, so
  the guard changes nothing on hypotheses without a loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from inference.audio import SAMPLE_RATE


class _DropLengthClash(logging.Filter):
    """Drops transformers' "Both `max_new_tokens` and `max_length` seem to have been set" warning: Whisper's
    generation config carries ``max_length`` 448 and every decode here passes ``max_new_tokens`` on purpose (the
    duration bound), so it fired once per batch and buried progress bars."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_new_tokens` will take precedence" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_DropLengthClash())


def _loop_unit(tokens: Sequence[int], repeats: int, max_unit: int) -> int:
    """Length of the unit the tail of ``tokens`` repeats (>= ``repeats`` times; 1-token units twice as
    often), or 0 if the tail is not a loop."""
    n = len(tokens)
    for unit in range(1, max_unit + 1):
        need = unit * (2 * repeats if unit == 1 else repeats)
        if need > n:
            break
        tail = tokens[n - need:]
        if all(tail[i] == tail[i - unit] for i in range(unit, need)):
            return unit
    return 0


def cut_loop(tokens: Sequence[int], max_unit: int = 16) -> list[int]:
    """Drop trailing copies of a repeated unit, keeping the first: ``a b c c c c`` -> ``a b c``."""
    out = list(tokens)
    for unit in range(1, max_unit + 1):
        while len(out) >= 2 * unit and out[-unit:] == out[-2 * unit:-unit]:
            del out[-unit:]
    return out


class RepetitionGuard(LogitsProcessor):
    """Force end-of-text on rows whose generated tail is a loop (see the module docstring).

    Args:
        eos_token_id: the token to force.
        repeats: copies of a multi-token unit that make a loop (single tokens need twice as many).
        max_unit: longest unit checked, in tokens.
        num_beams: beams per sample (rows of ``input_ids`` are samples x beams).

    After ``generate``, ``fired`` holds the sample indices whose hypothesis was stopped by the guard.
    """

    def __init__(self, eos_token_id: int, repeats: int = 4, max_unit: int = 16, num_beams: int = 1):
        self.eos, self.repeats, self.max_unit, self.num_beams = eos_token_id, repeats, max_unit, num_beams
        self.prompt_length: int | None = None
        self.fired: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids[:, self.prompt_length:].tolist()
        for row, tokens in enumerate(generated):
            if tokens and tokens[-1] != self.eos and _loop_unit(tokens, self.repeats, self.max_unit):
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, self.eos] = 0.0
                self.fired.add(row // self.num_beams)
        return scores


@dataclass
class BatchResult:
    """Transcripts of one batch, and which of them the repetition guard stopped."""

    texts: list[str]
    guarded: list[bool]


def log_mel(processor, audios: Sequence[np.ndarray], model) -> torch.Tensor:
    """Log-mel features (batch, n_mels, 3000) on the model's device and dtype."""
    param = next(model.parameters())
    feats = processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    return feats.to(param.device, param.dtype)


@torch.no_grad()
def language_posterior(model, features: torch.Tensor | None = None, candidates: Iterable[str] | None = None, *,
                       encoder_hidden_states: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
    """Whisper's language distribution at the first decoder step (after the start-of-transcript token).

    Args:
        model: a multilingual ``WhisperForConditionalGeneration`` (its generation config has ``lang_to_id``).
        features: log-mel features (batch, n_mels, frames) on the model's device.
        candidates: restrict (and renormalise) the distribution to these codes (None: every language).
        encoder_hidden_states: (batch, frames, d_model) encoder outputs already computed, instead of
            ``features``: only the decoder's first step runs (the caller can then reuse them for ``generate``).

    Returns:
        (codes, probabilities (batch, len(codes)), float32, rows summing to 1).
    """
    gc = model.generation_config
    lang_to_id = dict(getattr(gc, "lang_to_id", None) or {})
    if not lang_to_id:
        raise ValueError("this Whisper has no language tokens (an English-only model); route with a fixed language")
    if candidates is not None:
        wanted = set(candidates)
        unknown = wanted - {t[2:-2] for t in lang_to_id}
        if unknown:
            raise ValueError(f"unknown language(s) {', '.join(sorted(unknown))} for language ID")
        lang_to_id = {t: i for t, i in lang_to_id.items() if t[2:-2] in wanted}
    if encoder_hidden_states is not None:
        from transformers.modeling_outputs import BaseModelOutput

        inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=encoder_hidden_states)}
        batch, device = encoder_hidden_states.shape[0], encoder_hidden_states.device
    elif features is not None:
        inputs = {"input_features": features}
        batch, device = features.shape[0], features.device
    else:
        raise ValueError("language ID needs log-mel features or encoder hidden states")
    start = torch.full((batch, 1), gc.decoder_start_token_id, device=device)
    logits = model(decoder_input_ids=start, **inputs).logits[:, -1].float()
    ids = torch.tensor(list(lang_to_id.values()), device=logits.device)
    return [t[2:-2] for t in lang_to_id], logits[:, ids].softmax(-1)


def detect_languages(model, features: torch.Tensor, allowed: Iterable[str] | None = None) -> list[tuple[str, float]]:
    """Whisper's language ID from the first decoder step: the most likely (code, probability) per sample.

    Args:
        features: log-mel features, shape (batch, n_mels, 3000).
        allowed: restrict the choice to these codes (None: every language the model knows).
    """
    codes, probs = language_posterior(model, features, allowed)
    best = probs.argmax(-1)
    return [(codes[b], float(probs[i, b])) for i, b in enumerate(best.tolist())]


TOKENS_PER_SECOND = 8  # bound on decoded tokens per second of audio (fast speech in most scripts is ~4)
TOKENS_SLACK = 16


def duration_bound(seconds: float, limit: int = 444) -> int:
    """``max_new_tokens`` for audio of this length: 8 tokens per second plus 16, at most ``limit``.

    It uses only the audio, never a reference transcript, so it is the bound every honest measurement and
    every real transcription uses.
    """
    return min(int(math.ceil(TOKENS_PER_SECOND * seconds)) + TOKENS_SLACK, limit)


@torch.inference_mode()
def transcribe_batch(model, processor, features: torch.Tensor | None = None, languages: Sequence[str | None] = (),
                     *, max_new_tokens: int, task: str = "transcribe", num_beams: int = 1,
                     repetition_guard: bool = True, encoder_hidden_states: torch.Tensor | None = None) -> BatchResult:
    """Decode one batch of log-mel features, each sample with its own language token.

    Args:
        features: (batch, n_mels, 3000), from :func:`log_mel`; or None with ``encoder_hidden_states``.
        encoder_hidden_states: (batch, frames, d_model) encoder outputs computed earlier (encoder cache).
        languages: a Whisper code per sample (ignored by English-only models).
        max_new_tokens: length bound for every sample.
        repetition_guard: stop and cut repetition loops (see :class:`RepetitionGuard`).
    """
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    guard = RepetitionGuard(eos, num_beams=num_beams) if repetition_guard else None
    kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    if guard is not None:
        kwargs["logits_processor"] = LogitsProcessorList([guard])
    if getattr(model.generation_config, "is_multilingual", False):
        kwargs.update(language=list(languages), task=task)
    if encoder_hidden_states is not None:
        from transformers.modeling_outputs import BaseModelOutput

        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states), **kwargs)
    else:
        out = model.generate(features, **kwargs)
    texts, guarded = [], []
    for i, seq in enumerate(out.tolist()):
        # Every Whisper special, language, task and timestamp token has an id >= end-of-text.
        tokens = [t for t in seq if t < eos]
        fired = guard is not None and i in guard.fired
        if fired:
            tokens = cut_loop(tokens)
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
        guarded.append(fired)
    return BatchResult(texts, guarded)
