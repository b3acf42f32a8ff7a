"""benchmarks/distill_wer.py names each CLSR variant by the knobs it sets away from the recipe: rows at the defaults
keep the names and cache keys they had before a knob existed, and a knob set (the gate budget here) gets its own row
key, label and cache key, so two settings never share a cached student."""

from __future__ import annotations

import argparse

from benchmarks.distill_wer import variant


def _args(**changes) -> argparse.Namespace:
    defaults = dict(gate_lr=None, path_dropout=0.3, decoder_lr=None, gate_warmup=0.0, path_dropout_ramp=0.0,
                    gate_budget=0.5, attention=False, path_dropout_on="output", validate_gates="hard")
    return argparse.Namespace(**{**defaults, **changes})


def test_defaults_keep_their_old_names_and_each_knob_names_its_row():
    assert variant(_args()) == ("", "", {})
    suffix, label, knobs = variant(_args(gate_lr=0.01, gate_budget=1.0, path_dropout_on="delta"))
    assert suffix == "-glr0.01-gb1-pdd"
    assert label == ", gate lr 0.01, gate budget 1, path dropout on the delta"
    assert knobs == {"glr": 0.01, "gb": 1.0, "pdd": 1}
    assert variant(_args(gate_lr=0.01, path_dropout_on="delta"))[2] != knobs  # another cached student


def test_kd_only_and_no_lora_train_just_the_kd_row(uk_pt_corpus, tiny_whisper_dir, tmp_path):
    """--kd-only --no-lora: the table gets base, teacher and the CLSR + KD row, trained for real on the tiny
    Whisper; no LoRA row, no CLSR row without KD; with --no-kd too nothing would be trained, which is refused."""
    import json

    import pytest

    from benchmarks.distill_wer import main
    from registry.bases import load_base
    from registry.expert_file import save_expert
    from tests.tiny import random_lora_expert

    base = load_base(str(tiny_whisper_dir), device="cpu")
    save_expert(random_lora_expert(base.model, base, "uk", 1), tmp_path / "uk-teacher.safetensors")
    argv = ["--base", str(tiny_whisper_dir), "--data", str(uk_pt_corpus), "--languages", "uk", "--untouched", "",
            "--teachers", str(tmp_path / "{lang}-teacher.safetensors"), "--max-train", "2", "--epochs", "1",
            "--test-limit", "1", "--batch-size", "4", "--path", "lowrank", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--name", "t"]
    assert main(argv + ["--kd-only", "--no-lora"]) == 0
    rows = json.loads((tmp_path / "out" / "t.json").read_text())["rows"]
    assert sorted(rows) == ["base", "clsr-lowrank-decoder-0-kd", "teacher"]
    assert rows["clsr-lowrank-decoder-0-kd"]["test"]["uk"]["n"] == 1
    # the row says the precision its student trained at (the decoder recipe's float32), and so does the table
    assert rows["clsr-lowrank-decoder-0-kd"]["precision"] == "32-true"
    assert "Students trained at 32-true precision (Lightning)." in (tmp_path / "out" / "t.md").read_text()
    with pytest.raises(SystemExit):
        main(argv + ["--kd-only", "--no-kd"])


def test_a_cut_student_is_taught_by_experts_of_its_larger_base(uk_pt_corpus, tiny_whisper_dir, tmp_path):
    """--teacher-base: the students' base is a student cut from the teachers' base (benchmarks/cut_student.py's
    setup); the teacher row is decoded on the teachers' base, the CLSR + KD student trains on the cut base against
    it, and the table says where the teachers ran. A teacher missing there is not trained on the student's base:
    the run stops naming the file."""
    import json

    import pytest

    from benchmarks.distill_wer import main
    from registry.bases import load_base
    from registry.expert_file import save_expert
    from registry.shrink import shrink_base
    from tests.tiny import random_lora_expert

    big = load_base(str(tiny_whisper_dir), device="cpu")
    save_expert(random_lora_expert(big.model, big, "uk", 1), tmp_path / "uk-teacher.safetensors")
    shrink_base(str(tiny_whisper_dir), "tiny-cut1", 1, overwrite=True, progress=None)
    small = load_base("tiny-cut1", device="cpu")
    argv = ["--base", "tiny-cut1", "--teacher-base", str(tiny_whisper_dir), "--data", str(uk_pt_corpus),
            "--languages", "uk", "--untouched", "", "--max-train", "2", "--epochs", "1", "--test-limit", "1",
            "--batch-size", "4", "--path", "lowrank", "--kd-only", "--no-lora", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--name", "t"]
    assert main(argv + ["--teachers", str(tmp_path / "{lang}-teacher.safetensors")]) == 0
    results = json.loads((tmp_path / "out" / "t.json").read_text())
    rows = results["rows"]
    assert sorted(rows) == ["base", "clsr-lowrank-decoder-0-kd", "teacher"]
    big_params, small_params = (sum(p.numel() for p in b.model.parameters()) for b in (big, small))
    assert small_params < big_params and results["base_parameters"] == small_params
    assert rows["teacher"]["active"] > big_params and tiny_whisper_dir.name in rows["teacher"]["label"]
    assert rows["clsr-lowrank-decoder-0-kd"]["test"]["uk"]["n"] == 1
    assert f"teachers on {tiny_whisper_dir}" in (tmp_path / "out" / "t.md").read_text()
    with pytest.raises(SystemExit, match="--teacher-base"):
        main(argv + ["--teachers", str(tmp_path / "{lang}-missing.safetensors"), "--name", "u"])


def test_a_second_table_on_the_same_clips_reuses_the_base_and_teacher_scores(uk_pt_corpus, tiny_whisper_dir,
                                                                            tmp_path, monkeypatch):
    """The base's and the teacher's test scores are kept under <work>/decoded/ keyed by the model and the clips:
    a second table with the same --work (another --max-train here) takes them from there and decodes only its
    student; a teacher file retrained in place is another key, so it is decoded again."""
    import json

    import inference.evaluation as evaluation
    from benchmarks.distill_wer import main
    from registry.bases import load_base
    from registry.expert_file import save_expert
    from tests.tiny import random_lora_expert

    base = load_base(str(tiny_whisper_dir), device="cpu")
    teacher = tmp_path / "uk-teacher.safetensors"
    save_expert(random_lora_expert(base.model, base, "uk", 1), teacher)
    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))

    def table(name: str, max_train: str) -> dict:
        calls.clear()
        assert main(["--base", str(tiny_whisper_dir), "--data", str(uk_pt_corpus), "--languages", "uk",
                     "--untouched", "", "--teachers", str(tmp_path / "{lang}-teacher.safetensors"),
                     "--max-train", max_train, "--epochs", "1", "--test-limit", "1", "--batch-size", "4",
                     "--path", "lowrank", "--kd-only", "--no-lora", "--work", str(tmp_path / "work"),
                     "--out", str(tmp_path / "out"), "--name", name]) == 0
        return json.loads((tmp_path / "out" / f"{name}.json").read_text())["rows"]

    first = table("a", "2")
    assert len(calls) == 3  # base, teacher, student
    assert len(list((tmp_path / "work" / "decoded").glob("uk-*.json"))) == 2
    second = table("b", "3")
    assert len(calls) == 1  # the student only
    assert second["base"]["test"] == first["base"]["test"] and second["teacher"]["test"] == first["teacher"]["test"]
    save_expert(random_lora_expert(base.model, base, "uk", 2), teacher)  # retrained in place
    table("c", "3")
    assert len(calls) == 2  # the new teacher, and the student (cached as trained on the new teacher's cache key)


def test_a_pseudo_labelled_corpus_is_named_under_the_table(tmp_path):
    """Students trained on a held_out_teacher.py --pseudo-label corpus: the results record its card's counts once,
    and the table says how many clips had human transcripts and how many the teacher's."""
    import json

    from benchmarks.distill_table import table
    from benchmarks.distill_wer import record_pseudo_labels

    card = {"language": "nl", "teacher": "runs/real/nl-teacher.safetensors", "labeled": 100, "pseudo_labelled": 200,
            "left_out_loops": 0, "training_clips": 300, "pseudo_label_wer": 0.376}
    (tmp_path / "corpus.json").write_text(json.dumps({"pseudo_labels": card}))
    results = {"setup": {"languages": "nl", "untouched": "", "base": "whisper-base", "data": str(tmp_path),
                         "max_train": 300, "epochs": 5, "commands": ["python benchmarks/distill_wer.py"]}, "rows": {}}
    assert record_pseudo_labels(results) and results["pseudo_labels"] == card
    assert not record_pseudo_labels(results)  # already recorded
    assert ("Of the students' 300 nl training clips, 100 carry human transcripts and 200 the transcripts of "
            "`nl-teacher.safetensors` (greedy, from the audio alone; 37.6% WER against the human ones)."
            in table(results))
    plain = {"setup": {**results["setup"], "data": str(tmp_path / "none")}, "rows": {}}
    assert not record_pseudo_labels(plain) and "human transcripts" not in table(plain)
