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


def test_score_measures_each_teacher_on_the_students_clips_and_on_validation(uk_pt_corpus, tiny_whisper_dir,
                                                                            tmp_path):
    """--score: per teacher, the same statistics on the students' clips and on validation, computed from the
    teacher's real logits (a teacher whose expert changes the output scores differently from the bare base)."""
    import math

    from benchmarks.held_out_teacher import score, score_table
    from registry.bases import load_base
    from registry.expert_file import save_expert
    from tests.tiny import random_lora_expert

    base = load_base(str(tiny_whisper_dir), device="cpu")
    expert = save_expert(random_lora_expert(base.model, base, "uk", 1), tmp_path / "uk-teacher.safetensors")
    rows = score(str(uk_pt_corpus), "uk", 2, [str(expert), f"{tiny_whisper_dir}+{expert}"], base=str(tiny_whisper_dir),
                 batch_size=4)
    assert [(r["split"], r["clips"]) for r in rows] == [("students' training clips", 2), ("validation", 1)] * 2
    same = [{k: v for k, v in r.items() if k != "teacher"} for r in rows]
    assert same[0] == same[2] and same[1] == same[3]  # an expert file alone is on --base
    for r in rows:
        assert r["tokens"] > 0 and 0 < r["top1_probability"] <= 1 and 0 <= r["top1_is_transcript"] <= 1
        assert 0 <= r["entropy"] <= math.log(51865) and r["cross_entropy"] >= 0
    bare = score(str(uk_pt_corpus), "uk", 2, [str(tiny_whisper_dir)], base=str(tiny_whisper_dir), batch_size=4)
    assert bare[0]["cross_entropy"] != rows[0]["cross_entropy"]  # the expert is applied
    table = score_table(rows, "python benchmarks/held_out_teacher.py --score x")
    assert table.count("| `uk-teacher.safetensors` on ") == 4 and "Command: `python" in table
