"""benchmarks/held_out_teacher.py: the teacher's corpus holds exactly the training clips of the language that a
``--max-train N`` student does not see (checked against the data module's own selection), validation and test
unchanged; nothing left over, or an existing output, is refused."""

from __future__ import annotations

import pytest

from benchmarks.held_out_teacher import main
from trainers.corpus.loading import corpus_card, load_corpus


def test_the_teacher_gets_the_clips_the_student_does_not_see(uk_pt_corpus, tiny_whisper, tmp_path, capsys):
    from trainers.data import ExpertDataModule

    out = tmp_path / "rest"
    assert main(["--data", str(uk_pt_corpus), "--language", "uk", "--max-train", "2", "--out", str(out)]) == 0
    source, rest = load_corpus(uk_pt_corpus), load_corpus(out)
    student = ExpertDataModule(str(uk_pt_corpus), tiny_whisper[1], ["uk"], 4, max_train=2, progress=False)
    seen = set(student._select("train", 2)["id"])
    uk_train = {r["id"] for r in source["train"] if r["language"] == "uk"}
    assert len(seen) == 2 and seen < uk_train
    assert set(rest["train"]["id"]) == uk_train - seen  # the rest of uk, no pt, none of the student's
    for split in ("validation", "test"):
        assert rest[split]["id"] == source[split]["id"]
    card = corpus_card(out)["held_out_teacher"]
    assert (card["students_clips"], card["teacher_clips"]) == (2, len(uk_train) - 2)
    assert f"{len(uk_train) - 2} uk training clips" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--overwrite"):  # an existing corpus is kept unless asked
        main(["--data", str(uk_pt_corpus), "--language", "uk", "--max-train", "3", "--out", str(out)])
    assert load_corpus(out)["train"]["id"] == rest["train"]["id"]
    assert main(["--data", str(uk_pt_corpus), "--language", "uk", "--max-train", "3", "--out", str(out),
                 "--overwrite"]) == 0
    assert len(load_corpus(out)["train"]) == len(uk_train) - 3


def test_refuses_when_the_students_take_every_clip(uk_pt_corpus, tmp_path):
    n = sum(lang == "uk" for lang in load_corpus(uk_pt_corpus)["train"]["language"])
    with pytest.raises(SystemExit, match="nothing is left"):
        main(["--data", str(uk_pt_corpus), "--language", "uk", "--max-train", str(n), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no 'xx' training clips"):
        main(["--data", str(uk_pt_corpus), "--language", "xx", "--max-train", "1", "--out", str(tmp_path / "y")])
