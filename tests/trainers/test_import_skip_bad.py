"""`corpus from-dir` stops at the first unusable file with a hint, or with --skip-bad leaves it out and
lists it."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from inference.audio import AudioError
from trainers.cli import main
from trainers.corpus.loading import load_corpus


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    for i in range(3):
        sf.write(d / f"clip{i}.wav", 0.2 * np.sin(np.arange(8000) * (i + 1) / 10).astype(np.float32), 16000)
        (d / f"clip{i}.txt").write_text(f"sentence number {i}")
    (d / "clip1.wav").write_bytes(b"")  # an empty recording among good ones
    (d / "clip3.wav").write_bytes(b"RIFF....WAVEjunk")  # and a corrupt one
    (d / "clip3.txt").write_text("broken")
    return d


def test_without_skip_bad_the_first_bad_file_stops_the_import_with_a_hint(folder, tmp_path):
    with pytest.raises(AudioError, match=r"clip1\.wav.*--skip-bad"):
        main(["--debug", "corpus", "from-dir", str(folder), "--language", "cs", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_skip_bad_leaves_them_out_and_lists_them(folder, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["corpus", "from-dir", str(folder), "--language", "cs", "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 unusable file(s)" in printed and "clip1.wav" in printed and "clip3.wav" in printed
    assert sorted(load_corpus(out)["test"]["id"]) == ["clip0", "clip2"]
