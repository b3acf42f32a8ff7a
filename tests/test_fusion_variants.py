"""benchmarks/fusion_variants.py: several fusion recipes of one target expert side by side (each run's own choice,
its paired change, the search curves); runs of another target or other clips are refused by name."""

from __future__ import annotations

import json

import pytest

from benchmarks.fusion_variants import main, recipe


def _row(errors: list[float], label: str = "row", ids=None) -> dict:
    ids = ids or [f"u{i}" for i in range(len(errors))]
    utts = [{"id": i, "language": "cs", "word_errors": e, "words": 10} for i, e in zip(ids, errors)]
    wer = sum(errors) / (10 * len(errors))
    return {"label": label, "wer": wer, "cer": wer / 2, "n": len(errors), "wer_ci95": [wer - 0.05, wer + 0.05],
            "utterances": utts}


def _results(command: str, fused: list[float], weight: float, trials: list[dict], target="cs-real-100",
             label="fused (x)", ids=None) -> dict:
    return {"command": command, "target": "cs", "target_expert": target,
            "dev_wer": {"target_only": trials[0]["wer"], "fused": min(t["wer"] for t in trials)},
            "trials": trials,
            "rows": {target: _row([5] * 20, ids=ids),
                     "fused": {**_row(fused, label, ids), "weights": {target: 1.0, "cs-espeak": weight}}}}


def _trial(w: float, wer: float, options=None) -> dict:
    t = {"weights": [1.0, w], "wer": wer, "cer": wer / 2, "objective": wer, "seconds": 1.0}
    return t if options is None else {**t, "options": options}


def test_recipes_side_by_side(tmp_path):
    linear = _results("python benchmarks/real_fusion.py --supports cs:synth --search grid", [5] * 19 + [4], 0.2,
                      [_trial(0, 0.63), _trial(0.2, 0.61), _trial(0.4, 0.62)])
    # Searched densities: each trial keeps its options; the choice is density 1.0 at 0.4.
    ties = _results("python benchmarks/real_fusion.py --supports cs:synth --method ties "
                    "--option density=0.5,1.0 --search grid", [4] * 20, 0.4,
                    [_trial(0, 0.63, {"density": 0.5}), _trial(0.4, 0.62, {"density": 0.5}),
                     _trial(0, 0.63, {"density": 1.0}), _trial(0.4, 0.60, {"density": 1.0})])
    (tmp_path / "lin.json").write_text(json.dumps(linear))
    (tmp_path / "ties.json").write_text(json.dumps(ties))
    assert main(["--results", "lin,ties", "--out", str(tmp_path), "--name", "fv"]) == 0
    md = (tmp_path / "fv.md").read_text()
    assert "| linear, grid | cs-espeak at (1.00, 0.20) | 63.0 -> 61.0 | 50.0 | 49.5 [44.5, 54.5] | -1% (-0.5 [" in md
    assert "| ties density=1.0 (searched), grid | cs-espeak at (1.00, 0.40) | 63.0 -> 60.0 | 50.0 | 40.0" in md
    assert "-20% (-10.0 [-10.0, -10.0]) | ties |" in md
    assert "retrained" not in md and "Command: `python benchmarks/fusion_variants.py --results lin,ties" in md
    m = json.loads((tmp_path / "fv.json").read_text())
    assert m["runs"][1]["curves"] == {"density=0.5": [[0.0, 0.63], [0.4, 0.62]],
                                      "density=1.0": [[0.0, 0.63], [0.4, 0.6]]}
    assert (tmp_path / "fv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Against a control run: every other fused row's paired change against the control's fused row.
    assert main(["--results", "lin,ties", "--out", str(tmp_path), "--name", "fv2", "--against", "lin"]) == 0
    md = (tmp_path / "fv2.md").read_text()
    assert "| vs lin [paired 95% CI] | results |" in md
    assert "| – | lin |" in md  # the control itself
    assert "-20% (-10.0 [-10.0, -10.0]) | -19% (-9.5 [" in md
    with pytest.raises(SystemExit, match="--against other: not one of --results"):
        main(["--results", "lin,ties", "--out", str(tmp_path), "--against", "other"])


def test_options_of_a_run_from_before_trials_kept_them_come_from_its_command():
    res = _results("python benchmarks/real_fusion.py --method ties --option density=0.5 --search grid "
                   "--support-scope decoder", [4] * 20, 0.4, [_trial(0, 0.6), _trial(0.4, 0.62)],
                   label="fused (ties density=0.5, grid search, 2 trials): the target alone")
    assert recipe(res) == "ties density=0.5, grid, supports' decoder only: the target alone"


def test_runs_of_another_target_or_other_clips_are_refused(tmp_path, capsys):
    a = _results("python benchmarks/real_fusion.py --search grid", [4] * 20, 0.2, [_trial(0, 0.6), _trial(0.2, 0.5)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    seed1 = _results("python benchmarks/real_fusion.py --search grid", [4] * 20, 0.2,
                     [_trial(0, 0.6), _trial(0.2, 0.5)], target="cs-real-100-seed1")
    (tmp_path / "b.json").write_text(json.dumps(seed1))
    with pytest.raises(SystemExit, match="fused target cs-real-100-seed1, a cs-real-100"):
        main(["--results", "a,b", "--out", str(tmp_path)])
    other = _results("python benchmarks/real_fusion.py --search grid", [4] * 20, 0.2,
                     [_trial(0, 0.6), _trial(0.2, 0.5)], ids=[f"v{i}" for i in range(20)])
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="c scored other test clips than a"):
        main(["--results", "a,c", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such results file"):
        main(["--results", "a,missing", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--results", "a", "--out", str(tmp_path)])
    assert "at least two results files" in capsys.readouterr().err
