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


def test_pseudo_labels_replace_only_the_unlabelled_clips_transcripts(uk_pt_corpus, tiny_whisper_dir, tmp_path, capsys):
    """--pseudo-label: the --max-train selection, the --labeled clips with their human transcripts, every other clip
    with the teacher's own greedy transcript (what decoding it with the expert applied gives, recomputed here) or
    left out when that is a cut loop or empty; validation and test unchanged; bad pairs of sizes refused."""
    from benchmarks.held_out_teacher import main as run_main
    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset
    from inference.language_matrix import expert_applied
    from registry.bases import load_base
    from registry.expert_file import load_expert, save_expert
    from tests.tiny import random_lora_expert
    from trainers.data import evenly_spaced

    base = load_base(str(tiny_whisper_dir), device="cpu")
    teacher = save_expert(random_lora_expert(base.model, base, "uk", 1), tmp_path / "uk-teacher.safetensors")
    out = tmp_path / "pseudo"
    common = ["--data", str(uk_pt_corpus), "--language", "uk", "--base", str(tiny_whisper_dir),
              "--pseudo-label", str(teacher)]
    assert run_main(common + ["--max-train", "4", "--labeled", "2", "--out", str(out)]) == 0
    source, made = load_corpus(uk_pt_corpus), load_corpus(out)
    rows = [i for i, lang in enumerate(source["train"]["language"]) if lang == "uk"]
    human, selected = evenly_spaced(rows, 2), evenly_spaced(rows, 4)
    unlabeled = [i for i in selected if i not in human]
    with expert_applied(base.model, load_expert(teacher)):
        report = evaluate(base.model, base.processor, utterances_from_dataset(source["train"].select(unlabeled)),
                          DecodeOptions(batch_size=16), progress=False).as_dict()
    decoded = {u["id"]: u for u in report["utterances"]}
    kept = [i for i in selected if i in human or (not decoded[source["train"][i]["id"]]["loop_cut"]
                                                  and decoded[source["train"][i]["id"]]["hypothesis"].strip())]
    assert made["train"]["id"] == [source["train"][i]["id"] for i in kept]
    for row in made["train"]:
        original = source["train"][source["train"]["id"].index(row["id"])]
        if source["train"]["id"].index(row["id"]) in human:
            assert (row["text"], row["source"]) == (original["text"], original["source"])
        else:
            assert row["text"] == decoded[row["id"]]["hypothesis"].strip()
            assert row["source"] == "pseudo-label:uk-teacher.safetensors" and row["audio"] == original["audio"]
    for split in ("validation", "test"):
        assert made[split]["id"] == source[split]["id"] and made[split]["text"] == source[split]["text"]
    card = corpus_card(out)["pseudo_labels"]
    assert (card["labeled"], card["training_clips"]) == (2, len(kept))
    assert card["pseudo_labelled"] + card["left_out_loops"] == 2 and card["pseudo_label_wer"] >= 0
    assert card["pseudo_labelled"] > 0  # this seed's teacher keeps at least one: the text check above ran
    assert "2 with human transcripts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must be smaller"):
        run_main(common + ["--max-train", "2", "--labeled", "2", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="multiple of --labeled"):  # 3 of 5 clips do not hold the 2 of 5
        run_main(common + ["--max-train", "3", "--labeled", "2", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        run_main(["--data", str(uk_pt_corpus), "--language", "uk", "--max-train", "4", "--pseudo-label", str(teacher),
                  "--out", str(tmp_path / "c")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
