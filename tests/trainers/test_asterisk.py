"""The Asterisk prompt reader on a few-prompt package tree made here (real G.722 files encoded by FFmpeg, not
the real packages): the transcript listing's quirks, prompts without recordings, undecodable clips skipped and
counted, the split by prompt, the CLI."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import soundfile as sf

from trainers.cli import main
from trainers.corpus.asterisk import AsteriskError, parse_transcripts, read_prompts
from trainers.corpus.loading import load_corpus

LISTING = """; Core Asterisk Sounds in Russian

activated: Активировано
beep: [this is a simple beep tone]
confbridge-join: <beep ascending>
conf-adminmenu: conf-adminmenu: Нажмите 1, чтобы выключить микрофон.
is:
letters/dot: Точка [.]
silence/1: (1 second of silence)
digits/7: семь
"""


def test_parse_transcripts_drops_tones_silences_notes_and_repeated_names():
    assert parse_transcripts(LISTING) == [("activated", "Активировано"),
                                          ("conf-adminmenu", "Нажмите 1, чтобы выключить микрофон."),
                                          ("letters/dot", "Точка"), ("digits/7", "семь")]


def _g722(path, freq: float, seconds: float = 0.5) -> None:
    import av

    samples = (0.3 * np.sin(np.arange(int(16000 * seconds)) * freq * 2 * np.pi / 16000) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="g722") as out:
        stream = out.add_stream("g722", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


def _packages(root, n: int, *, corrupt: str | None = None, unrecorded: int = 0):
    """Unpacked ru packages: ``n`` recorded prompts (G.722 tones; one 8 kHz WAV), ``unrecorded`` more lines."""
    voice = root / "usr/share/asterisk/sounds/ru_RU_f_Test"
    (voice / "digits").mkdir(parents=True)
    docs = root / "usr/share/doc/asterisk-core-sounds-ru"
    docs.mkdir(parents=True)
    lines = ["; test listing", ""]
    for i in range(n):
        name = f"digits/{i}" if i % 3 == 0 else f"prompt-{i}"
        lines.append(f"{name}: Подсказка номер {i}.")
        if name == corrupt:
            (voice / f"{name}.g722").write_bytes(b"")
        elif i == 1:
            sf.write(voice / f"{name}.wav", np.zeros(4000, np.float32) + 0.1, 8000)
        else:
            _g722(voice / f"{name}.g722", 300 + 10 * i)
    lines += [f"unrecorded-{i}: Нет записи." for i in range(unrecorded)]
    (docs / "core-sounds-ru.txt.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    return root


def test_read_prompts_pairs_recordings_and_counts_unrecorded_lines(tmp_path):
    _packages(tmp_path, 4, unrecorded=2)
    prompts, missing = read_prompts(tmp_path, ["ru"])
    assert [p.name for p in prompts] == ["digits/0", "digits/3", "prompt-1", "prompt-2"]
    assert missing == {"ru": 2} and prompts[0].voice == "ru_RU_f_Test" and prompts[0].text == "Подсказка номер 0."
    assert prompts[2].audio.suffix == ".wav"  # no G.722 file: the WAV one is read
    with pytest.raises(AsteriskError, match="no Asterisk en prompts.*asterisk-core-sounds-en-g722"):
        read_prompts(tmp_path, ["en"])


def test_fetch_from_an_unpacked_copy_writes_a_corpus_split_by_prompt(tmp_path, capsys):
    _packages(tmp_path / "debs", 30, corrupt="prompt-4", unrecorded=1)
    out = tmp_path / "corpus"
    assert main(["corpus", "fetch", "asterisk", "--from", str(tmp_path / "debs"), "--languages", "ru",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "30 clips with transcripts; 1 lines without a recording left out" in printed
    assert "skipped 1 unusable file(s)" in printed and "prompt-4.g722" in printed
    corpus = load_corpus(out)
    ids = {s: set(corpus[s]["id"]) for s in corpus}
    assert sum(map(len, ids.values())) == 29 and all(ids.values())
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    assert "sounds-ru_RU_f_Test-digits-0" in set().union(*ids.values())
    assert set(corpus["train"]["voice"]) == {"ru_RU_f_Test"} and set(corpus["test"]["language"]) == {"ru"}
    assert all(text.startswith("Подсказка номер") for text in corpus["train"]["text"])
    again = tmp_path / "again"  # the same split on every machine: by a hash of each prompt's name
    main(["corpus", "fetch", "asterisk", "--from", str(tmp_path / "debs"), "--languages", "ru", "--out", str(again)])
    assert {s: set(load_corpus(again)[s]["id"]) for s in corpus} == ids


def test_fetch_and_read_refuse_a_language_without_a_package(tmp_path):
    from trainers.corpus.asterisk import fetch_packages

    for call in (fetch_packages, read_prompts):
        with pytest.raises(AsteriskError, match="no Asterisk sound package for cs; Debian has en, es, fr, it, ru"):
            call(tmp_path, ["cs"])


def test_a_cache_that_cannot_be_written_is_named_with_the_fix(tmp_path, monkeypatch):
    import shutil

    from trainers.corpus.asterisk import fetch_packages

    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")  # not reached: the cache fails first
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(AsteriskError, match=r"cannot download asterisk-core-sounds-ru, .* into .*a-file/cache: "
                                            r".*; pass --cache DIR on a writable disk"):
        fetch_packages(blocker / "cache", ["ru"])
