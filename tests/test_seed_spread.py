"""benchmarks/seed_spread.py: one fusion recipe over several target seeds, each seed's pair and the seed mean;
files of other clips, other weights or a repeated seed are refused by name."""

from __future__ import annotations

import json

import pytest

from benchmarks.seed_spread import averaged, main, target_seed


def _row(errors: list[float], label: str = "row") -> dict:
    utts = [{"id": f"u{i}", "language": "cs", "word_errors": e, "words": 10} for i, e in enumerate(errors)]
    wer = sum(errors) / (10 * len(errors))
    return {"label": label, "wer": wer, "cer": wer / 2, "n": len(errors), "wer_ci95": [wer - 0.05, wer + 0.05],
            "utterances": utts}


def _results(seed: int, target: list[float], fused: list[float], weights=(0.6, 0.4), search="fixed") -> dict:
    name = "cs-real-100" + (f"-seed{seed}" if seed else "")
    flag = f" --target-seed {seed}" if seed else ""
    return {"command": f"python benchmarks/real_fusion.py{flag} --supports cs=twin.safetensors --search {search}",
            "target": "cs", "target_expert": name,
            "rows": {name: _row(target), "fused": {**_row(fused), "weights": dict(zip([name, "cs-twin"], weights))}}}


def test_seed_of_a_recorded_command():
    assert target_seed({"command": "python benchmarks/real_fusion.py --target-seed 2 --name x"}) == 2
    assert target_seed({"command": "python benchmarks/real_fusion.py --name x"}) == 0


def test_averaged_errors_per_clip():
    mean = averaged([_row([2, 4]), _row([4, 8])])
    assert [u["word_errors"] for u in mean["utterances"]] == [3, 6]
    assert mean["wer"] == pytest.approx(9 / 20)


def test_table_per_seed_and_over_seeds(tmp_path):
    # seed 0 a weak draw (fusing helps a lot), seed 1 a strong one (fusing helps a little)
    (tmp_path / "s0.json").write_text(json.dumps(_results(0, [6] * 30, [4] * 30)))
    (tmp_path / "s1.json").write_text(json.dumps(_results(1, [4] * 30, [4, 3] * 15)))
    assert main(["--results", "s0,s1", "--out", str(tmp_path), "--name", "sp"]) == 0
    md = (tmp_path / "sp.md").read_text()
    m = json.loads((tmp_path / "sp.json").read_text())
    assert [s["seed"] for s in m["per_seed"]] == [0, 1]
    assert m["mean"]["target_wer"] == pytest.approx(0.5) and m["mean"]["fused_wer"] == pytest.approx(0.375)
    assert m["mean"]["fused_vs_target"]["relative"] == pytest.approx(-0.25)
    assert "| 1 (cs-real-100-seed1) | 40.0 [35.0, 45.0] | -33% (-20.0 [-20.0, -20.0]) |" in md
    assert "| **mean of 2 seeds** | 50.0 | – | 37.5 | **-25% (-12.5 [" in md
    assert "The target alone spans 40.0 to 60.0 over the seeds" in md
    assert "at weights (0.60, 0.40), fixed beforehand" in md
    assert "Command: `python benchmarks/seed_spread.py --results s0,s1 --out" in md
    assert (tmp_path / "sp.png").stat().st_size > 0


def test_weights_a_seeds_search_chose_are_said_to_be_its(tmp_path):
    (tmp_path / "s0.json").write_text(json.dumps(_results(0, [6] * 30, [4] * 30, search="grid")))
    (tmp_path / "s1.json").write_text(json.dumps(_results(1, [4] * 30, [4, 3] * 15)))
    assert main(["--results", "s0,s1", "--out", str(tmp_path), "--name", "sp"]) == 0
    md = (tmp_path / "sp.md").read_text()
    assert "chosen by seed 0's search on validation clips and fixed for the other seeds" in md


def test_refuses_files_that_do_not_compare(tmp_path, capsys):
    (tmp_path / "s0.json").write_text(json.dumps(_results(0, [6] * 30, [4] * 30)))
    (tmp_path / "w.json").write_text(json.dumps(_results(1, [4] * 30, [4] * 30, weights=(1.0, 0.2))))
    (tmp_path / "short.json").write_text(json.dumps(_results(1, [4] * 20, [4] * 20)))
    (tmp_path / "again.json").write_text(json.dumps(_results(0, [5] * 30, [4] * 30)))
    (tmp_path / "running.json").write_text(json.dumps({"command": "python benchmarks/real_fusion.py"}))
    for other, says in [("w", "give runs of one fusion recipe"), ("short", "scored other test clips than s0"),
                        ("again", "the same --target-seed"), ("running", "has not finished"),
                        ("gone", "no such results file")]:
        with pytest.raises(SystemExit, match=says):
            main(["--results", f"s0,{other}", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--results", "s0", "--out", str(tmp_path)])
    assert "at least two results files" in capsys.readouterr().err


def test_the_shrinkage_control_per_seed_and_over_seeds(tmp_path):
    """Runs with ``--scaled-target``: each seed's control (its own scale) and the fused expert against it."""
    runs = [_results(0, [6] * 30, [4] * 30), _results(1, [4] * 30, [4, 3] * 15)]
    for run, scale, errors in zip(runs, (0.6, 1.0), ([5] * 30, [4] * 30)):
        run["rows"]["matched"] = {**_row(errors, "control: x scaled by 0.5 (the fused expert's step along the target)"),
                                  "scale": scale}
    for i, run in enumerate(runs):
        (tmp_path / f"s{i}.json").write_text(json.dumps(run))
    assert main(["--results", "s0,s1", "--out", str(tmp_path), "--name", "sp"]) == 0
    md = (tmp_path / "sp.md").read_text()
    m = json.loads((tmp_path / "sp.json").read_text())
    assert m["mean"]["control_wer"] == pytest.approx(0.45)
    assert m["mean"]["fused_vs_control"]["relative"] == pytest.approx(0.375 / 0.45 - 1)
    assert "| (0.6) 50.0 [45.0, 55.0] | -20% (-10.0 [-10.0, -10.0]) |" in md
    assert "| 45.0 (-10% (-5.0 [" in md
    assert "its scale per seed: the fused expert's step along the target." in md
    # One run without the control: the table is the plain one.
    del runs[1]["rows"]["matched"]
    (tmp_path / "s1.json").write_text(json.dumps(runs[1]))
    assert main(["--results", "s0,s1", "--out", str(tmp_path), "--name", "sp2"]) == 0
    plain = (tmp_path / "sp2.md").read_text()
    assert "Control: the target" not in plain and "control: the target scaled" not in plain
