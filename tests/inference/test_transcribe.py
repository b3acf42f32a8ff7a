"""Transcription with a pack: JSON records in input order, 30 s windows, subtitles, empty and silent inputs,
wav/flac/ogg/mp3 inputs, and a mixed batch equal to transcribing each file alone with its expert."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import soundfile as sf

from inference.audio import AudioError
from inference.decoding import log_mel
from inference.routing import language_posterior
from inference.transcribe import ExpertWhisper, Segment, Transcript, _segments, window_starts
from inference.transcript_formats import render, to_srt, to_vtt
from registry.bases import load_base
from registry.packs import create_pack
from tests.lora_experts.random_experts import linear_shapes, lora_expert
from trainers.cli import main

SR = 16000
FAST = dict(max_new_tokens=4, progress=False)


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def detected(tiny_base):
    """The language the tiny random Whisper hears in noise (the same for every clip)."""
    feats = log_mel(tiny_base.processor, [_noise(2, 0)], tiny_base.model)
    codes, probs = language_posterior(tiny_base.model, feats)
    return codes[int(probs.argmax())]


@pytest.fixture(scope="module")
def pack(tiny_base, detected, tmp_path_factory):
    """uk, pt: decoder-only experts; nl: adapts the encoder too; det: serves the language language ID finds."""
    identity = {"name": tiny_base.name, "fingerprint": tiny_base.fingerprint,
                "tokenizer_fingerprint": tiny_base.tokenizer_fingerprint}
    shapes = linear_shapes(tiny_base.model, ("q_proj", "v_proj", "fc1", "fc2"))
    decoder = {m: s for m, s in shapes.items() if ".decoder." in m}
    experts = {"uk-x": lora_expert(decoder, 4, 16.0, 1, ["uk"], identity),
               "pt-x": lora_expert(decoder, 2, 8.0, 2, ["pt"], identity),
               "nl-x": lora_expert(shapes, 8, 16.0, 3, ["nl"], identity),
               "det-x": lora_expert(decoder, 4, 16.0, 4, [detected], identity)}
    path = tmp_path_factory.mktemp("pack") / "mix.safetensors"
    create_pack(path, experts)
    return path


@pytest.fixture(scope="module")
def whisper(tiny_base, pack):
    return ExpertWhisper.from_pack(dataclasses.replace(tiny_base, model=copy.deepcopy(tiny_base.model)), pack)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    out = {}
    for i, (name, fmt, sub) in enumerate([("a.wav", "WAV", "PCM_16"), ("b.flac", "FLAC", "PCM_16"),
                                          ("c.ogg", "OGG", "VORBIS"), ("d.mp3", "MP3", None)]):
        if fmt not in sf.available_formats():  # mp3 needs libsndfile >= 1.1 (inference.audio names the fix)
            continue
        kwargs = {"format": fmt} if sub is None else {"format": fmt, "subtype": sub}
        sf.write(d / name, _noise(2 + i, seed=i), SR, **kwargs)
        out[name] = d / name
    return out


def test_json_records_in_input_order_with_required_fields(whisper, files, tiny_whisper_dir, pack, tmp_path):
    order = [files[n] for n in ("d.mp3", "a.wav", "c.ogg", "b.flac") if n in files]
    seconds = {"a.wav": 2, "b.flac": 3, "c.ogg": 4, "d.mp3": 5}
    out = tmp_path / "out.json"
    assert main(["transcribe", *map(str, order), "--pack", str(pack), "--base", str(tiny_whisper_dir),
                 "--format", "json", "--out", str(out), "--max-new-tokens", "4", "--no-progress",
                 "--threshold", "0"]) == 0
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == [str(p) for p in order]
    for r, path in zip(records, order):  # every format was read, at its length
        assert {"file", "text", "language", "language_probability", "expert"} <= set(r)
        assert r["duration"] == pytest.approx(seconds[path.name], abs=0.06) and r["text"]
        assert 0 < r["language_probability"] <= 1 and r["expert"] == "det-x"  # threshold 0: its expert
    # The Python API gives the same records.
    api = [t.as_dict() for t in whisper.transcribe(order, threshold=0.0, **FAST)]
    assert [(r["text"], r["language"], r["expert"]) for r in api] == \
        [(r["text"], r["language"], r["expert"]) for r in records]


def _with_gaps(seconds: float, gaps: list[tuple[float, float]], seed: int) -> np.ndarray:
    audio = _noise(seconds, seed)
    for a, b in gaps:
        audio[int(a * SR):int(b * SR)] = 0.0
    return audio


def test_windows_end_in_the_quietest_frame_of_their_last_5_seconds():
    audio = _with_gaps(65, [(27.0, 27.3), (54.0, 54.4)], seed=7)
    # 100 ms frames from 25 s: the latest silent one is 27.2-27.3 s; from the next window's 25 s (52.25 s) on,
    # the latest frame wholly inside the 54.0-54.4 s gap is 54.25-54.35 s. Cuts fall in those frames' middles.
    assert window_starts(audio) == [0, int(27.25 * SR), int(54.3 * SR)]
    assert window_starts(audio, "fixed") == [0, 30 * SR, 60 * SR]
    # Frames equally loud (a 1 kHz tone, whole periods per frame): the latest, so windows stay long.
    tone = np.sin(2 * np.pi * 1000 * np.arange(40 * SR) / SR).astype(np.float32)
    assert window_starts(tone) == [0, 30 * SR - SR // 20]
    for audio in (_noise(100, 8), tone, _noise(30, 9), _noise(0.5, 9)):  # at most 30 s each, nothing lost
        starts = window_starts(audio)
        assert starts[0] == 0 and all(b - a <= 30 * SR for a, b in zip(starts, starts[1:] + [len(audio)]))
    assert window_starts(np.zeros(0, np.float32)) == []
    with pytest.raises(ValueError, match="quiet, fixed"):
        window_starts(tone, "smart")


def test_long_audio_is_decoded_in_windows_of_at_most_30_seconds(whisper, tiny_whisper_dir, pack, tmp_path):
    audio = _with_gaps(65, [(27.0, 27.3), (54.0, 54.4)], seed=5)
    (t,) = whisper.transcribe([audio], language="uk", **FAST)
    assert [(s.start, s.end, s.seek) for s in t.segments] == [(0.0, 27.25, 0.0), (27.25, 54.3, 27.25),
                                                              (54.3, 65.0, 54.3)]
    (fixed,) = whisper.transcribe([audio], language="uk", cut="fixed", **FAST)
    assert [(s.start, s.end) for s in fixed.segments] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    with pytest.raises(ValueError, match="cut must be one of"):
        whisper.transcribe([audio], language="uk", cut="smart", **FAST)
    path, out = tmp_path / "long.wav", tmp_path / "long.json"
    sf.write(path, audio, SR)
    assert main(["transcribe", str(path), "--pack", str(pack), "--base", str(tiny_whisper_dir), "--language", "uk",
                 "--format", "json", "--out", str(out), "--max-new-tokens", "4", "--no-progress", "--cut",
                 "fixed"]) == 0
    assert [s["start"] for s in json.loads(out.read_text())[0]["segments"]] == [0.0, 30.0, 60.0]
    assert t.language == "uk" and t.language_probability is None and t.expert == "uk-x"
    assert t.text == " ".join(s.text for s in t.segments)


def test_a_mixed_batch_equals_each_file_alone_with_its_expert(whisper):
    audios = [_noise(3, 10), _noise(35, 11), _noise(4, 12), _noise(2, 13)]
    languages = ["uk", "pt", "nl", "de"]  # nl adapts the encoder; de has no expert: the base model
    mixed = whisper.transcribe(audios, language=languages, batch_size=8, **FAST)
    alone = [whisper.transcribe([a], language=lang, **FAST)[0] for a, lang in zip(audios, languages)]
    assert [t.expert for t in mixed] == ["uk-x", "pt-x", "nl-x", None]
    assert [t.text for t in mixed] == [t.text for t in alone]
    assert [[s.text for s in t.segments] for t in mixed] == [[s.text for s in t.segments] for t in alone]
    base = ExpertWhisper(dataclasses.replace(whisper.base, model=copy.deepcopy(whisper.base.model)))
    base.bank.clear()
    plain = [t.text for t in base.transcribe(audios, language=languages, **FAST)]
    assert plain[3] == mixed[3].text and plain[:3] != [t.text for t in mixed[:3]]  # the experts did something


def test_language_id_routing_threshold_and_encoder_reuse(whisper, detected):
    calls = []
    hook = whisper.base.model.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        routed = whisper.transcribe([_noise(2, 20), _noise(3, 21)], threshold=0.0, **FAST)
        assert len(calls) == 1  # one batch: language ID ran the encoder, generate reused its output
        fallback = whisper.transcribe([_noise(2, 20)], threshold=1.01, **FAST)
    finally:
        hook.remove()
    assert [t.expert for t in routed] == ["det-x", "det-x"] and {t.language for t in routed} == {detected}
    assert fallback[0].expert is None and fallback[0].language == detected  # unsure: the base model


def test_silent_and_empty_inputs_are_reported_not_decoded(whisper, tmp_path, tiny_whisper_dir, pack, capsys):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    silent, empty_t, zero_t = whisper.transcribe([np.zeros(SR, np.float32), empty, zero_bytes], **FAST)
    assert silent.text == "" and "silent audio" in silent.note and silent.duration == 1.0
    assert "empty audio" in empty_t.note and "empty audio" in zero_t.note and empty_t.segments == []
    assert main(["transcribe", str(empty), "--pack", str(pack), "--base", str(tiny_whisper_dir), "--no-progress"]) == 0
    assert "empty audio, nothing to transcribe" in capsys.readouterr().err


def test_an_unreadable_file_is_reported_and_the_others_transcribed(whisper, tmp_path, tiny_whisper_dir, pack,
                                                                   files, capsys):
    broken = tmp_path / "broken.m4a"
    broken.write_bytes(b"\x00not audio" * 40)
    with pytest.raises(AudioError, match="broken.m4a"):
        whisper.transcribe([broken, files["a.wav"]], **FAST)
    bad, good = whisper.transcribe([broken, files["a.wav"]], on_error="record", **FAST)
    assert "broken.m4a" in bad.error and bad.text == "" and good.error is None and good.segments
    out = tmp_path / "out.json"
    code = main(["transcribe", str(broken), str(files["a.wav"]), "--pack", str(pack), "--base", str(tiny_whisper_dir),
                 "--no-progress", "--format", "json", "--out", str(out)])
    records = json.loads(out.read_text())
    assert code == 1 and "broken.m4a" in records[0]["error"] and "error" not in records[1]
    assert records[1]["file"].endswith("a.wav") and "1 of 2 input(s) could not be read" in capsys.readouterr().err


def test_unknown_language_is_refused_with_the_list(whisper, tiny_whisper_dir, pack, files, capsys):
    with pytest.raises(ValueError, match=r"unknown language 'xx'.*Whisper language codes are: .*\buk\b"):
        whisper.transcribe([_noise(1, 0)], language="xx", **FAST)
    assert main(["transcribe", str(files["a.wav"]), "--pack", str(pack), "--base", str(tiny_whisper_dir),
                 "--language", "xx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown language 'xx'") and ", uk," in err


def _cue_times(text: str, sep: str) -> list[tuple[str, str]]:
    return re.findall(rf"^(\d\d:\d\d:\d\d{sep}\d\d\d) --> (\d\d:\d\d:\d\d{sep}\d\d\d)$", text, re.M)


def test_srt_and_vtt_syntax():
    t = Transcript("x.wav", "hello there", "uk", 0.9, "uk-x", 3725.6,
                   [Segment(0.0, 2.5, "hello"), Segment(3723.25, 3725.6, "there")])
    srt = to_srt(t)
    assert srt == "1\n00:00:00,000 --> 00:00:02,500\nhello\n\n2\n01:02:03,250 --> 01:02:05,600\nthere\n"
    vtt = to_vtt(t)
    assert vtt.startswith("WEBVTT\n\n") and _cue_times(vtt, r"\.") == [("00:00:00.000", "00:00:02.500"),
                                                                        ("01:02:03.250", "01:02:05.600")]
    with pytest.raises(ValueError, match="one input"):
        render([t, t], "srt")


def test_timestamp_tokens_become_segments(tiny_base):
    tok, eos, ts = tiny_base.processor.tokenizer, 50257, 50364
    words = tok("hello world", add_special_tokens=False).input_ids
    seq = [50258, 50280, 50359, ts + 10, *words, ts + 50, ts + 60, *words, ts + 2000]  # last time past the window
    segs = _segments(seq, tok, eos, ts, start=30.0, length=12.0)
    assert [(s.start, s.end) for s in segs] == [(30.2, 31.0), (31.2, 42.0)]
    assert all(s.text == "hello world" for s in segs)
    assert [(s.start, s.end) for s in _segments(seq, tok, eos, None, 30.0, 12.0)] == [(30.0, 42.0)]


def test_cli_writes_one_subtitle_file_per_input(files, tiny_whisper_dir, pack, tmp_path):
    out = tmp_path / "subs"
    assert main(["transcribe", str(files["a.wav"]), str(files["b.flac"]), "--pack", str(pack), "--base",
                 str(tiny_whisper_dir), "--language", "pt", "--format", "srt", "--out", str(out),
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    for stem in ("a", "b"):
        text = (out / f"{stem}.srt").read_text()
        assert text.startswith("1\n") and _cue_times(text, ",")
    assert main(["transcribe", str(files["a.wav"]), str(files["b.flac"]), "--base", str(tiny_whisper_dir),
                 "--format", "vtt", "--out", str(tmp_path / "one.vtt")]) == 2


def test_from_pack_without_a_pack_is_the_base_model(tiny_base):
    w = ExpertWhisper.from_pack(dataclasses.replace(tiny_base, model=copy.deepcopy(tiny_base.model)))
    assert w.bank.names == []
    (t,) = w.transcribe(_noise(2, 30), language="en", **FAST)
    assert t.expert is None and t.text


def test_quickstart_last_step_packs_and_transcribes_with_language_id(tiny_base, uk_corpus, tmp_path, capsys,
                                                                     monkeypatch):
    import argparse

    from registry.store import Registry
    from trainers.cli.quickstart import _pack_step

    identity = {"name": tiny_base.name, "fingerprint": tiny_base.fingerprint,
                "tokenizer_fingerprint": tiny_base.tokenizer_fingerprint}
    shapes = {m: s for m, s in linear_shapes(tiny_base.model, ("q_proj", "fc1")).items() if ".decoder." in m}
    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(tmp_path / "home"))  # a registry of its own
    ref = Registry().add(lora_expert(shapes, 2, 4.0, 7, ["uk"], identity), "uk-quick").ref
    (tmp_path / "corpus-uk").symlink_to(uk_corpus, target_is_directory=True)
    args = argparse.Namespace(base=str(tiny_base.path or tiny_base.name), languages="uk", batch_size=4)
    _pack_step(args, tmp_path, {"uk": ref}, 6)
    out = capsys.readouterr().out
    assert "[6/6] pack uk-quick@1" in out and (tmp_path / "pack.safetensors").is_file()
    rows = [line for line in out.splitlines() if line.startswith("| 0")]
    assert len(rows) == 2 and all("| uk |" in r for r in rows)  # file, spoken, detected, expert, transcript
    assert "--language auto --candidates uk" in out and sorted(p.name for p in (tmp_path / "mixed").iterdir()) == \
        ["01.wav", "02.wav"]
