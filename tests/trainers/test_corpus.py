"""Corpora: real sentences per language, synthesis that keeps splits and speakers apart and is reproducible,
atomic output, and the corpus format shared by synthesis and import."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json

import datasets
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from inference.audio import SAMPLE_RATE, is_silent, load_audio
from trainers.cli import corpus as corpus_command
from trainers.corpus import synth
from trainers.corpus.importers import corpus_from_dir, corpus_from_hf
from trainers.corpus.loading import (
    CORPUS_FEATURES, REQUIRED_COLUMNS, CorpusFormatError, OutputDirError, corpus_card, load_corpus, make_row,
    rows_to_dataset, save_corpus,
)
from trainers.corpus.languages import ESPEAK_VOICES, UnknownLanguageError, language_code
from trainers.corpus.sources import clean_sentence, fortune_texts, sentences, source_counts
from trainers.corpus.synth import EspeakError, NotEnoughSentencesError, SynthConfig, plan_language, synthesize_corpus

REQUIRED_LANGUAGES = ["en", "es", "de", "it", "ru", "uk", "bg", "cs", "pt", "nl", "fa", "tr", "pl", "fr", "id", "ko",
                      "ja", "zh", "sk", "el", "sv", "fi", "hu", "ro", "ca", "vi", "ar", "hi", "eo", "ga"]


# ------------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("language,expected_source", [
    ("en", "fortunes"), ("de", "fortunes-de"), ("ru", "fortunes-ru"), ("uk", "chatterbot-corpus"),
    ("nl", "chatterbot-corpus"),
])
def test_sentences_are_real_clean_and_deterministic(language, expected_source):
    pairs = sentences(language)
    assert len(pairs) >= 300
    assert pairs == sentences(language)
    texts = [t for t, _ in pairs]
    assert len(set(texts)) == len(texts)
    assert expected_source in {s for _, s in pairs}
    for text in texts:
        assert 3 <= len(text.split()) <= 25 and len(text) <= 200, text
        assert not any(ch.isdigit() for ch in text) and "http" not in text and "--" not in text
    # Ukrainian keeps Russian-only letters out; Russian is written in Cyrillic.
    if language == "uk":
        assert not any(ch in text for text in texts for ch in "ыэъё")
    if language == "ru":
        assert all(any("а" <= ch.lower() <= "я" for ch in text) for text in texts[:200])


def test_every_required_language_has_a_voice_and_unknown_ones_are_refused():
    assert set(REQUIRED_LANGUAGES) <= set(ESPEAK_VOICES)
    assert language_code("German") == "de" and language_code("pt-BR") == "pt" and language_code("zh_CN") == "zh"
    # Recordings may be in any Whisper language; synthesis needs an espeak-ng voice.
    assert language_code("Yoruba", synthesizable=False) == "yo"
    with pytest.raises(UnknownLanguageError, match="no espeak-ng voice"):
        language_code("yo")
    with pytest.raises(UnknownLanguageError) as err:
        sentences("xx")
    assert "'xx'" in str(err.value) and "de, el, en" in str(err.value)
    with pytest.raises(UnknownLanguageError):
        SynthConfig(languages=("de", "klingon"))


def test_user_text_file_comes_first_and_is_cleaned(tmp_path):
    path = tmp_path / "tr.txt"
    path.write_text("Bu benim kendi cümlem.\nSaat 12 de buluşalım.\n\nhttp://example.com adresine bak.\n"
                    "Bu benim kendi cümlem!\nKısa.\n", encoding="utf-8")
    pairs = sentences("tr", {"tr": [path]})
    assert pairs[0] == ("Bu benim kendi cümlem.", f"user:{path}")
    assert sum(s.startswith("user:") for _, s in pairs) == 1  # digits, URL, duplicate and too short dropped
    assert len(pairs) == len(sentences("tr")) + 1
    counts = source_counts(["tr"], {"tr": [path]})
    assert counts["tr"][f"user:{path}"] == 1 and counts["tr"]["chatterbot-corpus"] > 100


def test_fortune_parsing_drops_attributions_signatures_and_fragments(tmp_path):
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "zitate").write_text(
        "Wer nichts weiß, muss alles glauben.\n\t\t-- Marie von Ebner-Eschenbach\n%\n"
        "Ein Mann geht in eine Bar.\nEr bestellt ein Bier.\n\nDer Wirt sagt nichts dazu.\n%\n"
        "Kapitel Eins Zwei Drei\n\nDas ist ein Satz mit Ende.\n%\n"
        "Besuchen Sie www.example.de für mehr Witze.\n%\nfor (i = 0; i < n; i++) { x += 1; }\n%\n",
        encoding="utf-8")
    (tmp_path / "de" / "zitate.dat").write_bytes(b"\0" * 8)
    texts = [t for t, _ in fortune_texts("de", root=tmp_path)]
    cleaned = [c for c in (clean_sentence(t, "de") for t in texts) if c]
    assert cleaned == ["Wer nichts weiß, muss alles glauben.", "Ein Mann geht in eine Bar.",
                       "Er bestellt ein Bier.", "Der Wirt sagt nichts dazu.", "Das ist ein Satz mit Ende."]


@pytest.mark.parametrize("text,language,expected", [
    ("  Hallo   Welt, wie geht's?  ", "de", "Hallo Welt, wie geht's?"),
    ("Non esistono verita' assolute.", "it", "Non esistono verità assolute."),
    ("Er sagte: \u201eKomm her!\u201c", "de", "Er sagte: Komm her!"),
    ("Це речення українською мовою.", "uk", "Це речення українською мовою."),
    ("Это предложение по-русски, ыы.", "uk", None),  # Russian letters in a Ukrainian corpus
    ("I have 3 cats at home.", "en", None),
    ("Call me at foo@example.com today.", "en", None),
    ("and then it went away.", "en", None),  # a fragment
    ("Hi there.", "en", None),  # too short
])
def test_clean_sentence(text, language, expected):
    assert clean_sentence(text, language) == expected


# --------------------------------------------------------------------------------------------------- plans


def test_plan_is_deterministic_with_disjoint_splits_and_speakers():
    config = SynthConfig(languages=("de",), per_language=40, seed=3)
    first, reserve = plan_language(config, "de")
    assert [dataclasses.astuple(u) for u in first] == [dataclasses.astuple(u) for u in plan_language(config, "de")[0]]
    other, _ = plan_language(dataclasses.replace(config, seed=4), "de")
    assert [u.text for u in other] != [u.text for u in first]
    by_split = {s: [u for u in first if u.split == s] for s in ("train", "validation", "test")}
    assert [len(v) for v in by_split.values()] == [28, 4, 8]
    assert len({u.text for u in first}) == 40 and not {u.text for u in first} & {t for t, _ in reserve}
    variant = lambda u: u.voice.split("+")[1]  # noqa: E731
    assert {variant(u) for u in by_split["test"]} <= set(config.test_variants)
    assert {variant(u) for u in by_split["train"] + by_split["validation"]} <= set(config.train_variants)
    assert all(130 <= u.speed <= 190 and 30 <= u.pitch <= 70 for u in first)
    assert len({u.speed for u in first}) > 10


def test_user_sentences_are_used_before_built_in_ones(tmp_path):
    path = tmp_path / "de.txt"
    mine = [f"Das ist mein eigener Satz Nummer {word}." for word in ("eins", "zwei", "drei", "vier", "fünf")]
    path.write_text("\n".join(mine), encoding="utf-8")
    planned, _ = plan_language(SynthConfig(languages=("de",), per_language=4, text_files={"de": [path]}), "de")
    assert {u.source for u in planned} == {f"user:{path}"} and {u.text for u in planned} < set(mine)
    planned, _ = plan_language(SynthConfig(languages=("de",), per_language=8, text_files={"de": [path]}), "de")
    assert sum(u.source.startswith("user:") for u in planned) == 5


def test_tiny_corpus_still_gets_every_split():
    assert SynthConfig(languages=("de",), per_language=3).split_sizes() == {"train": 1, "validation": 1, "test": 1}
    with pytest.raises(ValueError, match="at least 3"):
        SynthConfig(languages=("de",), per_language=2)
    with pytest.raises(ValueError, match="sum to 1"):
        SynthConfig(languages=("de",), train_fraction=0.9)
    with pytest.raises(ValueError, match="test voices must differ"):
        SynthConfig(languages=("de",), train_variants=("m1", "f1"), test_variants=("f1",))


def test_too_few_sentences_is_refused_with_counts_and_a_fix(tmp_path):
    # Irish has the smallest pool (UDHR, plus fortunes-ga where installed); ask for one more than it has.
    # (gflanguages releases differ in how many sentences they carry: ask for at least 3, the minimum corpus)
    found = len(sentences("ga"))
    assert found < len(sentences("de"))
    need = max(found + 1, 3)
    out = tmp_path / "out"
    with pytest.raises(NotEnoughSentencesError) as err:
        synthesize_corpus(SynthConfig(languages=("de", "ga"), per_language=need), out, progress=False)
    message = str(err.value)
    assert f"found {found} usable sentences, need {need}" in message and "--text-file ga=PATH" in message
    assert "--per-language" in message
    assert list(tmp_path.iterdir()) == []  # nothing left behind


# ----------------------------------------------------------------------------------------------- synthesis


@pytest.fixture(scope="module")
def tiny_config():
    return SynthConfig(languages=("de", "uk"), per_language=6, seed=7)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    return out, synthesize_corpus(tiny_config, out, progress=False)


def test_synthesized_corpus_schema(tiny_corpus, tiny_config):
    out, corpus = tiny_corpus
    assert list(corpus) == ["train", "validation", "test"]
    for split, ds in corpus.items():
        assert ds.features == CORPUS_FEATURES
        assert ds.features["audio"].decode is False and ds.features["audio"].sampling_rate == SAMPLE_RATE
        assert len(ds) == {"train": 8, "validation": 2, "test": 2}[split]
    rows = [row for ds in corpus.values() for row in ds]
    assert len({r["id"] for r in rows}) == 12
    for r in rows:
        assert r["language"] in ("de", "uk") and r["id"].startswith(r["language"] + "-")
        assert r["audio"]["path"].endswith(".flac") and r["audio"]["bytes"]
        assert r["voice"].split("+")[0] in ESPEAK_VOICES[r["language"]]
        assert 130 <= r["speed"] <= 190 and 30 <= r["pitch"] <= 70
        assert r["source"] in {"fortunes-de", "chatterbot-corpus", "udhr"}
    card = corpus_card(out)
    assert card["kind"] == "synthetic" and card["config"]["seed"] == 7
    assert card["languages"]["uk"]["utterances"] == {"train": 4, "validation": 1, "test": 1}


def test_synthesized_splits_share_no_sentence_and_test_speakers_are_unseen(tiny_corpus):
    _, corpus = tiny_corpus
    texts = {split: set(ds["text"]) for split, ds in corpus.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert not set(corpus["train"]["voice"]) & set(corpus["test"]["voice"])


def test_synthesized_audio_is_16k_mono_flac_speech(tiny_corpus, tiny_config):
    _, corpus = tiny_corpus
    for row in corpus["test"]:
        info = sf.info(io.BytesIO(row["audio"]["bytes"]))
        assert (info.format, info.samplerate, info.channels) == ("FLAC", SAMPLE_RATE, 1)
        audio = load_audio(row["audio"])
        assert 0.5 < len(audio) / SAMPLE_RATE < tiny_config.max_seconds
        assert not is_silent(audio, -40)
        # Trimmed: speech starts within the 0.1 s margin left before it.
        assert np.max(np.abs(audio[: int(0.2 * SAMPLE_RATE)])) > 0.01


def test_synthesis_is_reproducible_for_a_seed(tiny_corpus, tiny_config, tmp_path):
    _, corpus = tiny_corpus
    again = synthesize_corpus(tiny_config, tmp_path / "again", progress=False)
    for split in corpus:
        for column in ("id", "text", "voice", "speed", "pitch", "source"):
            assert corpus[split][column] == again[split][column]
        # espeak-ng is deterministic, so even the audio bytes repeat.
        assert [a["bytes"] for a in corpus[split]["audio"]] == [a["bytes"] for a in again[split]["audio"]]


def test_load_corpus_round_trip_and_overwrite(tiny_corpus, tmp_path):
    out, corpus = tiny_corpus
    loaded = load_corpus(out)
    for split in corpus:
        assert loaded[split]["text"] == corpus[split]["text"]
    copy = tmp_path / "copy"
    save_corpus(loaded, copy, progress=False)
    with pytest.raises(OutputDirError, match="--overwrite"):
        save_corpus(loaded, copy, progress=False)
    save_corpus(datasets.DatasetDict({s: ds.select(range(1)) for s, ds in loaded.items()}), copy, overwrite=True,
                progress=False)
    assert len(load_corpus(copy)["train"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary siblings left


def test_unwritable_output_fails_before_any_synthesis(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synth, "plan_language", lambda *a: calls.append(a))
    monkeypatch.setattr(synth, "speak", lambda *a: calls.append(a))
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file")
    config = SynthConfig(languages=("de",), per_language=3)
    with pytest.raises(OutputDirError, match="is a file"):
        synthesize_corpus(config, blocker / "out", progress=False)
    with pytest.raises(OutputDirError, match="not a directory"):
        synthesize_corpus(config, blocker, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        synthesize_corpus(config, tmp_path / "notes", progress=False)
    with pytest.raises(OutputDirError, match="not a corpus"):  # even --overwrite never deletes unrelated files
        synthesize_corpus(config, tmp_path / "notes", progress=False, overwrite=True)
    assert calls == [] and (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]


def _fake_speak(long_texts=()):
    """Stand-in for espeak-ng: a tone whose length follows the text; 20 s for texts in ``long_texts``."""
    def speak(espeak, text, voice, speed, pitch, workdir):
        seconds = 20.0 if text in long_texts else 0.5 + 0.01 * len(text)
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return speak


def test_failure_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    def broken(*args):
        raise EspeakError("espeak-ng crashed")
    monkeypatch.setattr(synth, "speak", broken)
    with pytest.raises(EspeakError):
        synthesize_corpus(SynthConfig(languages=("de",), per_language=3), tmp_path / "a" / "b" / "out",
                          progress=False)
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too


def test_too_long_utterances_take_the_next_sentence(tmp_path, monkeypatch):
    config = SynthConfig(languages=("de",), per_language=5, seed=1)
    planned, reserve = plan_language(config, "de")
    monkeypatch.setattr(synth, "speak", _fake_speak(long_texts={planned[2].text}))
    corpus = synthesize_corpus(config, tmp_path / "out", progress=False)
    texts = corpus["train"]["text"]
    assert planned[2].text not in texts and reserve[0][0] == texts[2]
    assert corpus_card(tmp_path / "out")["languages"]["de"]["replaced_sentences"] == 1


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(EspeakError, match="apt-get install espeak-ng"):
        synthesize_corpus(SynthConfig(languages=("de",), per_language=3), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- loading


def _tiny_dict(drop: str | None = None) -> datasets.DatasetDict:
    tone = np.sin(np.arange(8000) * 0.1).astype(np.float32) * 0.3
    row = make_row(id="de-00000", audio=tone, text="Guten Tag allerseits.", language="de", source="test")
    ds = rows_to_dataset([row])
    if drop:
        ds = ds.remove_columns(drop)
    return datasets.DatasetDict(train=ds, validation=ds, test=ds)


def test_load_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(CorpusFormatError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CorpusFormatError, match="no dataset_dict.json"):
        load_corpus(tmp_path / "plain")
    _tiny_dict(drop="voice").save_to_disk(str(tmp_path / "novoice"))
    with pytest.raises(CorpusFormatError, match="no 'voice' column") as err:
        load_corpus(tmp_path / "novoice")
    assert "columns found: id, audio, text" in str(err.value)
    datasets.DatasetDict(train=_tiny_dict()["train"]).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(CorpusFormatError, match="no 'validation' split"):
        load_corpus(tmp_path / "nosplit")
    assert set(REQUIRED_COLUMNS) == set(CORPUS_FEATURES)


def _write(path, seconds=0.5, sr=22050, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    sf.write(path, np.stack([tone] * channels, axis=1) if channels > 1 else tone, sr)


def test_corpus_from_dir_pairs_layout(tmp_path):
    (tmp_path / "rec" / "sub").mkdir(parents=True)
    _write(tmp_path / "rec" / "a.wav", sr=44100, channels=2)
    _write(tmp_path / "rec" / "sub" / "b.flac", sr=16000)
    (tmp_path / "rec" / "a.txt").write_text("Привіт, як справи?\n", encoding="utf-8")
    (tmp_path / "rec" / "sub" / "b.txt").write_text("Добрий вечір.", encoding="utf-8")
    corpus = corpus_from_dir(tmp_path / "rec", language="uk")
    assert [len(corpus[s]) for s in ("train", "validation", "test")] == [0, 0, 2]
    rows = list(corpus["test"])
    assert [r["id"] for r in rows] == ["a", "sub-b"] and rows[0]["text"] == "Привіт, як справи?"
    assert all(r["voice"] == "" and r["speed"] == -1 and r["pitch"] == -1 for r in rows)
    assert rows[0]["source"] == str((tmp_path / "rec").resolve())
    assert len(load_audio(rows[0]["audio"])) == 8000
    save_corpus(corpus, tmp_path / "out", progress=False)
    assert load_corpus(tmp_path / "out")["test"]["text"] == ["Привіт, як справи?", "Добрий вечір."]
    (tmp_path / "rec" / "c.wav").write_bytes((tmp_path / "rec" / "a.wav").read_bytes())
    with pytest.raises(CorpusFormatError, match="no transcript"):
        corpus_from_dir(tmp_path / "rec", language="uk")


def test_corpus_from_dir_audiofolder_with_language_and_split_columns(tmp_path):
    for name in ("x.wav", "y.wav", "z.wav"):
        _write(tmp_path / name)
    (tmp_path / "metadata.csv").write_text(
        "file_name,transcription,language,split\nx.wav,Goedemorgen allemaal.,nl,train\n"
        "y.wav,Guten Morgen zusammen.,German,test\nz.wav,Hoe gaat het met je?,nl,dev\n", encoding="utf-8")
    corpus = corpus_from_dir(tmp_path)
    assert corpus["train"]["language"] == ["nl"] and corpus["test"]["language"] == ["de"]
    assert corpus["validation"]["text"] == ["Hoe gaat het met je?"]
    # The same folder through the Hugging Face entry point (read without datasets' torchcodec decoder).
    via_hf = corpus_from_hf("audiofolder", data_dir=str(tmp_path))
    assert via_hf["test"]["text"] == corpus["test"]["text"]
    (tmp_path / "metadata.csv").write_text("file_name,words\nx.wav,Hallo.\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match="no transcript column.*columns found: file_name, words"):
        corpus_from_dir(tmp_path, language="de")


def test_corpus_from_dir_needs_a_language(tmp_path):
    _write(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("Hallo Welt hier.")
    with pytest.raises(CorpusFormatError, match="--language"):
        corpus_from_dir(tmp_path)


def test_corpus_from_hf_parquet_dataset(tmp_path):
    # A hub-style dataset: Parquet with a 48 kHz Audio column, Common Voice's column names.
    features = datasets.Features({"audio": datasets.Audio(sampling_rate=48000), "sentence": datasets.Value("string"),
                                  "locale": datasets.Value("string"), "path": datasets.Value("string")})
    tone = (0.3 * np.sin(np.arange(48000) * 0.05)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, tone, 48000, format="FLAC")
    table = {"audio": [{"bytes": buffer.getvalue(), "path": "cv_1.mp3"}], "sentence": ["Добрий день усім."],
             "locale": ["uk"], "path": ["clips/cv_1.mp3"]}
    ds = datasets.Dataset(pa.Table.from_pydict(table, schema=features.arrow_schema),
                          info=datasets.DatasetInfo(features=features))
    for split in ("train", "test"):
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "test")}
    corpus = corpus_from_hf("parquet", data_files=files)
    row = corpus["test"][0]
    assert (row["id"], row["text"], row["language"]) == ("cv_1", "Добрий день усім.", "uk")
    assert len(load_audio(row["audio"])) == 16000 and len(corpus["validation"]) == 0
    with pytest.raises(CorpusFormatError, match="no transcript column 'words'.*columns found: audio, sentence"):
        corpus_from_hf("parquet", data_files=files, text_column="words")


# ----------------------------------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="whisper-experts")
    corpus_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_sources_and_from_dir_and_info(tmp_path, capsys):
    assert _cli(["corpus", "sources", "--languages", "uk,nl"]) == 0
    out = capsys.readouterr().out
    assert "CHATTERBOT-CORPUS" in out and out.splitlines()[1].startswith("uk")
    _write(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("Hallo Welt, guten Tag.")
    assert _cli(["corpus", "from-dir", str(tmp_path), "--language", "de", "--out", str(tmp_path / "c")]) == 0
    assert _cli(["corpus", "info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "de" in out and "TEST" in out
    with pytest.raises(UnknownLanguageError):
        _cli(["corpus", "synth", "--languages", "de,xx", "--per-language", "5", "--out", str(tmp_path / "s")])
    with pytest.raises(ValueError, match="LANG=PATH"):
        _cli(["corpus", "sources", "--text-file", "nonsense"])


def test_cli_synth_prints_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "speak", _fake_speak())
    out = tmp_path / "s"
    assert _cli(["corpus", "synth", "--languages", "de,uk", "--per-language", "5", "--out", str(out), "--quiet",
                 "--split", "0.6,0.2,0.2", "--speed", "140-150"]) == 0
    table = capsys.readouterr().out
    assert "HOURS" in table and "uk" in table
    assert json.loads((out / "corpus.json").read_text())["config"]["speed_range"] == [140, 150]
    assert set(load_corpus(out)["train"]["speed"]) <= {*range(140, 151)}
