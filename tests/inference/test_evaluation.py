"""The evaluation harness: error rates, normalization, batched decoding and the report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.evaluation import DecodeOptions, Utterance, error_rates, evaluate, normalize


def test_error_rates_are_corpus_level_and_normalized():
    refs = ["Hello, World!", "the cat sat"]
    hyps = ["hello world", "the cat sat on"]
    r = error_rates(refs, hyps)
    # Normalized: "hello world" is right; one insertion over 5 reference words.
    assert r["wer"] == pytest.approx(1 / 5)
    # Raw: "Hello," and "World!" are both wrong (2 subs) + 1 insertion over 5 words.
    assert r["wer_raw"] == pytest.approx(3 / 5)
    assert r["cer"] == pytest.approx(3 / (len("hello world") + len("the cat sat")))
    # Whisper's BasicTextNormalizer drops bracketed/parenthesized asides (annotations like "[noise]").
    assert normalize("  Ça   va? [noise] (oui) bien ") == "ça va bien"


def test_empty_normalized_references_are_skipped():
    r = error_rates(["...", "one two"], ["x", "one two"])
    assert r["wer"] == 0.0 and r["wer_raw"] == pytest.approx(1 / 3)
    assert math.isnan(error_rates(["!!"], ["x"])["wer"])


def _utterances(n=3):
    rng = np.random.default_rng(0)
    return [Utterance(f"u{i}", (0.1 * rng.standard_normal(16000 * (1 + i))).astype(np.float32), "guten tag", "de")
            for i in range(n)] + [Utterance("v0", (0.1 * rng.standard_normal(8000)).astype(np.float32),
                                            "добрий день", "uk")]


def test_evaluate_reports_every_language(tiny_whisper):
    model, processor = tiny_whisper
    report = evaluate(model, processor, _utterances(), DecodeOptions(batch_size=2), progress=False)
    assert set(report.languages) == {"de", "uk"}
    de = report.languages["de"]
    assert de.n == 3 and de.rtf > 0 and de.audio_seconds == pytest.approx(6.0)
    assert 0 <= de.cer and de.wer >= 0
    d = report.as_dict()
    assert set(d["languages"]["de"]) >= {"wer", "cer", "wer_raw", "cer_raw", "n", "rtf"}
    assert len(d["utterances"]) == 4 and {u["id"] for u in d["utterances"]} == {"u0", "u1", "u2", "v0"}
    # the default bound uses only the audio (each length-sorted batch its own), never the references
    assert "max_new_tokens <= " in report.guard and "tokens/s" in report.guard and "reference" not in report.guard
    low, high = d["languages"]["de"]["wer_ci95"]
    assert low <= de.wer <= high and {"word_errors", "words"} <= set(d["utterances"][0])
    table = report.markdown()
    assert table.splitlines()[0].startswith("| language | n | WER %") and "| de | 3 |" in table
    peeking = evaluate(model, processor, _utterances(), DecodeOptions(batch_size=2, guard="reference"), progress=False)
    assert "max_new_tokens=" in peeking.guard and "longest reference" in peeking.guard


def test_guard_bounds_generation_length(tiny_whisper):
    """A random model babbles; the bound keeps every hypothesis within max_new_tokens."""
    model, processor = tiny_whisper
    report = evaluate(model, processor, _utterances(2), DecodeOptions(max_new_tokens=5), progress=False)
    assert "max_new_tokens=5 (explicit)" in report.guard
    for u in report.hypotheses:
        assert len(processor.tokenizer(u["hypothesis"], add_special_tokens=False).input_ids) <= 6
    report = evaluate(model, processor, _utterances(2), DecodeOptions(guard="duration"), progress=False)
    assert "tokens/s" in report.guard


def test_auto_language_mode_reports_language_id(tiny_whisper):
    model, processor = tiny_whisper
    report = evaluate(model, processor, _utterances(2), DecodeOptions(language="auto"), progress=False)
    assert report.languages["de"].detected_accuracy is not None
    assert all("detected_language" in u and 0 < u["language_probability"] <= 1 for u in report.hypotheses)
    assert "LID acc" in report.markdown()
