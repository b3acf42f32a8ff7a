"""The evaluation harness: batched greedy decoding and WER/CER per language.

Per language it reports WER and CER both raw (case and punctuation kept) and normalized with Whisper's
``BasicTextNormalizer`` (the headline figures; CER is the one to read for languages written without spaces),
the utterance count and the real-time factor (decoding seconds / audio seconds). Error rates are corpus
level: total edits over total reference words (characters), as jiwer computes them over a list.

Runaway repetition (a known Whisper failure on odd audio) is bounded twice, and the report says how: by
``max_new_tokens``, derived by default from the audio duration of each batch (``guard="duration"``: 8 tokens
per second of its longest utterance plus 16, knowledge any real transcription has), or, only on request,
from the reference lengths (``guard="reference"``: twice the longest reference of the language in tokens,
plus 8; it peeks at the answers, so figures made with it are not comparable to real use); and by the
repetition guard of :mod:`inference.decoding` (a loop ends the hypothesis and is cut to one
copy), whose firings are counted per language (``guarded``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import jiwer
import numpy as np
from tqdm.auto import tqdm
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from inference.audio import SAMPLE_RATE, load_audio
from inference.confidence import bootstrap_ci, format_ci, paired_bootstrap, utterance_counts
from inference.decoding import detect_languages, duration_bound, log_mel, transcribe_batch

_normalizer = BasicTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's basic (language-independent) normalization: lowercase, no punctuation or symbols."""
    return " ".join(_normalizer(text).split())


@dataclass(frozen=True)
class DecodeOptions:
    """How utterances are decoded. Frozen: derive variants with ``dataclasses.replace``."""

    batch_size: int = 16  # utterances per generate() call
    language: str | None = None  # force this language token; None: each utterance's own (``auto``: detect)
    task: str = "transcribe"  # or "translate"
    num_beams: int = 1  # 1 = greedy
    guard: str = "duration"  # max_new_tokens bound: audio "duration" (honest) or "reference" lengths (peeks)
    max_new_tokens: int | None = None  # explicit bound, overrides ``guard``
    repetition_guard: bool = True  # stop repetition loops and keep one copy of the repeated unit


@dataclass
class Utterance:
    """One item to decode: audio (16 kHz float32), reference text, language code, an id."""

    id: str
    audio: np.ndarray
    text: str
    language: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class LanguageResult:
    """Scores for one language (fractions, not percentages)."""

    language: str
    n: int
    wer: float
    cer: float
    wer_raw: float
    cer_raw: float
    rtf: float
    audio_seconds: float
    detected_accuracy: float | None = None  # share of utterances whose detected language was right (auto mode)
    guarded: int = 0  # hypotheses the repetition guard stopped
    wer_ci: tuple[float, float] | None = None  # 95% bootstrap interval of ``wer`` (utterances resampled)
    cer_ci: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, language: str, d: dict) -> "LanguageResult":
        """The result :meth:`as_dict` wrote for ``language``."""
        wer_ci, cer_ci = (tuple(d[key]) if key in d else None for key in ("wer_ci95", "cer_ci95"))
        return cls(language, d["n"], d["wer"], d["cer"], d["wer_raw"], d["cer_raw"], d["rtf"], d["audio_seconds"],
                   d.get("language_id_accuracy"), d.get("guarded", 0), wer_ci, cer_ci)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("wer", "cer", "wer_raw", "cer_raw", "n", "rtf", "audio_seconds", "guarded")}
        if self.wer_ci is not None:
            d["wer_ci95"], d["cer_ci95"] = list(self.wer_ci), list(self.cer_ci or (float("nan"),) * 2)
        if self.detected_accuracy is not None:
            d["language_id_accuracy"] = self.detected_accuracy
        return d


@dataclass
class EvalReport:
    """Per-language results, the decoded hypotheses, and how decoding was bounded."""

    languages: dict[str, LanguageResult]
    hypotheses: list[dict] = field(default_factory=list)
    guard: str = ""
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        """The report :meth:`as_dict` wrote (a benchmark's stored row read back)."""
        meta = dict(d.get("meta", {}))
        guard = meta.pop("guard", "")
        return cls({lang: LanguageResult.from_dict(lang, r) for lang, r in d["languages"].items()},
                   list(d.get("utterances", [])), guard, meta)

    def as_dict(self) -> dict:
        return {
            "meta": {**self.meta, "guard": self.guard},
            "languages": {k: v.as_dict() for k, v in self.languages.items()},
            "utterances": self.hypotheses,
        }

    def markdown(self) -> str:
        """A Markdown table: one row per language, percentages with one decimal."""
        head = "| language | n | WER % [95% CI] | CER % [95% CI] | WER raw % | CER raw % | RTF | loops cut |"
        if any(r.detected_accuracy is not None for r in self.languages.values()):
            head += " LID acc % |"
        rows = [head, "|" + "---|" * (head.count("|") - 1)]
        for lang, r in sorted(self.languages.items()):
            row = (f"| {lang} | {r.n} | {format_ci(r.wer, r.wer_ci)} | {format_ci(r.cer, r.cer_ci)} | "
                   f"{100 * r.wer_raw:.1f} | {100 * r.cer_raw:.1f} | {r.rtf:.3f} | {r.guarded} |")
            if r.detected_accuracy is not None:
                row += f" {100 * r.detected_accuracy:.1f} |"
            rows.append(row)
        return "\n".join(rows)


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus-level WER/CER, raw and normalized. Pairs whose reference is empty after normalization are
    skipped for the normalized figures (they have no words to get wrong)."""
    out = {}
    for suffix, fn in (("_raw", lambda s: " ".join(s.split())), ("", normalize)):
        pairs = [(fn(r), fn(h)) for r, h in zip(references, hypotheses)]
        pairs = [(r, h) for r, h in pairs if r]
        if not pairs:
            out["wer" + suffix] = out["cer" + suffix] = float("nan")
            continue
        refs, hyps = zip(*pairs)
        out["wer" + suffix] = float(jiwer.wer(list(refs), list(hyps)))
        out["cer" + suffix] = float(jiwer.cer(list(refs), list(hyps)))
    return out


def _bound(opts: DecodeOptions, tokenizer, utterances: Sequence[Utterance], limit: int) -> tuple[int, str]:
    if opts.max_new_tokens:
        return min(opts.max_new_tokens, limit), f"max_new_tokens={min(opts.max_new_tokens, limit)} (explicit)"
    if opts.guard == "reference" and all(u.text for u in utterances):
        longest = max(len(tokenizer(u.text, add_special_tokens=False).input_ids) for u in utterances)
        n = min(2 * longest + 8, limit)
        return n, f"max_new_tokens={n} (2 x longest reference of {longest} tokens + 8)"
    seconds = max(u.seconds for u in utterances)
    n = duration_bound(seconds, limit)
    return n, f"max_new_tokens <= {n} (8 tokens/s x the batch's longest audio + 16; {seconds:.1f}s at most)"


def evaluate(model, processor, utterances: Sequence[Utterance], opts: DecodeOptions = DecodeOptions(),
             progress: bool = True, on_batch: Callable[[int], None] | None = None) -> EvalReport:
    """Decode ``utterances`` in length-sorted batches and score them per language.

    Args:
        model: a ``WhisperForConditionalGeneration`` (with or without experts attached).
        processor: its ``WhisperProcessor``.
        utterances: what to decode; each language is bounded and scored separately.
        opts: decoding options; ``opts.language="auto"`` detects each utterance's language first.

    Returns:
        An :class:`EvalReport`.
    """
    model.eval()
    limit = model.config.max_target_positions - 4  # room for the <|sot|><|lang|><|task|><|notimestamps|> prompt
    by_lang: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_lang.setdefault(u.language, []).append(u)
    results: dict[str, LanguageResult] = {}
    hyps: list[dict] = []
    guards = []
    bar = tqdm(total=len(utterances), desc="decoding", unit="utt", disable=not progress)
    for lang, items in by_lang.items():
        max_new, guard = _bound(opts, processor.tokenizer, items, limit)
        if opts.repetition_guard:
            guard += " + repetition guard"
        guards.append(f"{lang}: {guard}")
        order = sorted(range(len(items)), key=lambda i: items[i].seconds)
        texts: dict[int, str] = {}
        detected: dict[int, tuple[str, float]] = {}
        guarded: set[int] = set()
        decode_seconds = 0.0
        for start in range(0, len(order), opts.batch_size):
            idx = order[start:start + opts.batch_size]
            audios = [items[i].audio for i in idx]
            if opts.guard == "duration" and not opts.max_new_tokens:  # each length-sorted batch its own bound
                max_new = duration_bound(max(items[i].seconds for i in idx), limit)
            t0 = time.perf_counter()
            feats = log_mel(processor, audios, model)
            if opts.language == "auto" and getattr(model.generation_config, "is_multilingual", False):
                found = detect_languages(model, feats)
                langs = [c for c, _ in found]
                detected.update(zip(idx, found))
            else:
                langs = [opts.language or items[i].language for i in idx]
            out = transcribe_batch(model, processor, feats, langs, max_new_tokens=max_new, task=opts.task,
                                   num_beams=opts.num_beams, repetition_guard=opts.repetition_guard)
            decode_seconds += time.perf_counter() - t0
            texts.update(zip(idx, out.texts))
            guarded.update(i for i, g in zip(idx, out.guarded) if g)
            bar.update(len(idx))
            if on_batch:
                on_batch(len(idx))
        refs = [items[i].text for i in range(len(items))]
        hyp = [texts[i] for i in range(len(items))]
        rates = error_rates(refs, hyp)
        counts = utterance_counts([normalize(t) for t in refs], [normalize(t) for t in hyp])
        audio_s = sum(u.seconds for u in items)
        acc = None
        if detected:
            acc = sum(detected[i][0] == lang for i in range(len(items))) / len(items)
        results[lang] = LanguageResult(lang, len(items), rates["wer"], rates["cer"], rates["wer_raw"],
                                       rates["cer_raw"], decode_seconds / max(audio_s, 1e-9), audio_s, acc,
                                       len(guarded), bootstrap_ci(counts.word_errors, counts.words),
                                       bootstrap_ci(counts.char_errors, counts.chars))
        for i, u in enumerate(items):
            # per-utterance counts (normalized text) let two saved reports be compared pairwise later
            rec = {"id": u.id, "language": lang, "reference": u.text, "hypothesis": texts[i], "loop_cut": i in guarded,
                   "word_errors": int(counts.word_errors[i]), "words": int(counts.words[i]),
                   "char_errors": int(counts.char_errors[i]), "chars": int(counts.chars[i])}
            if i in detected:
                rec["detected_language"], rec["language_probability"] = detected[i]
            hyps.append(rec)
    bar.close()
    return EvalReport(results, hyps, "; ".join(guards))


def paired_comparison(a: EvalReport | dict, b: EvalReport | dict) -> dict[str, dict]:
    """Per language, system B's WER minus system A's on the same utterances (matched by id), with the
    paired-bootstrap 95% interval and p-value (:func:`inference.confidence.paired_bootstrap`).

    Args:
        a, b: two reports (or their ``as_dict()`` / saved JSON) of the same utterances.

    Returns:
        ``{lang: {"a", "b", "difference", "relative", "ci95", "p_value", "significant", "n"}}`` (fractions).
    """
    rows_a = (a.as_dict() if isinstance(a, EvalReport) else a)["utterances"]
    rows_b = {(r["language"], r["id"]): r for r in (b.as_dict() if isinstance(b, EvalReport) else b)["utterances"]}
    out = {}
    for lang in dict.fromkeys(r["language"] for r in rows_a):
        pairs = [(r, rows_b[(lang, r["id"])]) for r in rows_a if r["language"] == lang and (lang, r["id"]) in rows_b]
        if not pairs:
            continue
        d = paired_bootstrap(np.array([x["word_errors"] for x, _ in pairs]),
                             np.array([y["word_errors"] for _, y in pairs]), np.array([x["words"] for x, _ in pairs]))
        out[lang] = d.as_dict(n=len(pairs))
    return out


def paired_counts(report: EvalReport | dict) -> list[dict]:
    """The per-utterance fields :func:`paired_comparison` reads (id, language, word errors, words): what a
    benchmark keeps of a report to compare it with another later, without the texts."""
    rows = (report.as_dict() if isinstance(report, EvalReport) else report)["utterances"]
    return [{k: u[k] for k in ("id", "language", "word_errors", "words")} for u in rows]


def utterances_from_dataset(dataset, languages: Iterable[str] | None = None,
                            limit: int | None = None) -> list[Utterance]:
    """Turn a corpus split (columns ``audio``, ``text``, ``language``, ``id``) into :class:`Utterance` s.

    Args:
        languages: keep only these codes (None: all).
        limit: at most this many utterances per language (first ones in dataset order).
    """
    from inference.audio import AudioError

    wanted = set(languages) if languages else None
    counts: dict[str, int] = {}
    out = []
    for row in dataset:
        lang = row["language"]
        if wanted is not None and lang not in wanted:
            continue
        if limit is not None and counts.get(lang, 0) >= limit:
            continue
        uid = str(row.get("id", len(out)))
        try:
            audio = load_audio(row["audio"])
        except AudioError as e:
            raise AudioError(f"utterance {uid} ({lang}): {e}") from e
        out.append(Utterance(uid, audio, row["text"], lang))
        counts[lang] = counts.get(lang, 0) + 1
    if wanted:
        missing = sorted(wanted - set(counts))
        if missing:
            have = sorted(set(dataset["language"]))
            raise ValueError(f"no utterances for language(s) {', '.join(missing)} in this split; "
                             f"it has {', '.join(have)}")
    return out
