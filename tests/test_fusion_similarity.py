"""benchmarks/fusion_similarity.py: experts found again from real_fusion's results, pooled cosines, the table."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.fusion_similarity import expert_files, main, pooled_cosine
from lora_experts.similarity import expert_similarity
from registry.expert_file import save_expert
from tests.lora_experts.random_experts import SHAPES, lora_expert


def _counts(errors: list[int]) -> dict:
    utts = [{"id": f"u{i}", "language": "cs", "word_errors": e, "words": 10} for i, e in enumerate(errors)]
    wer = sum(errors) / (10 * len(errors))
    return {"wer": wer, "cer": wer / 2, "n": len(errors), "wer_ci95": [wer - 0.05, wer + 0.05], "utterances": utts}


def _results(command: str, names: list[str], weights: list[float], trials: list[tuple[list[float], float]]) -> dict:
    rows = {"base": {"label": "base", **_counts([7] * 20)}, names[0]: {"label": "target", **_counts([5] * 20)}}
    for k, name in enumerate(names[1:]):
        rows[name] = {"label": name, **_counts([6 + k] * 20)}
    rows["fused"] = {"label": "fused", "weights": dict(zip(names, weights)), **_counts([4] * 20)}
    return {"command": command, "target": "cs", "target_train": 100, "support_scope": "all", "names": names,
            "trials": [{"weights": w, "wer": e} for w, e in trials], "target_expert": names[0], "dev_n": 10,
            "dev_wer": {"target_only": trials[0][1], "fused": min(e for _, e in trials)}, "rows": rows}


def test_expert_files_from_the_recorded_command(tmp_path):
    res = {"command": f"python benchmarks/real_fusion.py --supports sk:synth,cs={tmp_path}/twin.safetensors "
                      f"--runs {tmp_path}/runs --search grid",
           "rows": {"fused": {"weights": {"cs-real-100": 1.0, "sk-espeak": 0.0, "cs-twin": 0.0}}}}
    assert expert_files(res) == {"cs-real-100": tmp_path / "runs" / "cs-real-100.safetensors",
                                 "sk-espeak": tmp_path / "runs" / "sk-espeak.safetensors",
                                 "cs-twin": tmp_path / "twin.safetensors"}


def test_pooled_cosine_of_the_supports_sum():
    # t = (1, 0), s1 = (1, 1), s2 = (1, -1): s1 + s2 = (2, 0) points along t
    gram = [[1, 1, 1], [1, 2, 0], [1, 0, 2]]
    assert pooled_cosine(gram, 0, [1, 2]) == pytest.approx(1.0)
    assert pooled_cosine(gram, 0, [1]) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(pooled_cosine([[0, 0], [0, 1]], 0, [1]))


def test_table_and_plot_from_results_files(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    runs.mkdir(), out.mkdir()
    save_expert(lora_expert(SHAPES, 4, 8, seed=0, languages=("cs",)), runs / "cs-real-100.safetensors")
    save_expert(lora_expert(SHAPES, 4, 8, seed=1, languages=("sk",)), runs / "sk-espeak.safetensors")
    twin = tmp_path / "twin.safetensors"
    save_expert(lora_expert(SHAPES, 4, 8, seed=0, languages=("cs",)), twin)  # the target's own direction
    base = f"python benchmarks/real_fusion.py --runs {runs} --trials 3"
    (out / "real_fusion_sk.json").write_text(json.dumps(_results(
        f"{base} --supports sk:synth --search grid", ["cs-real-100", "sk-espeak"], [1.0, 0.0],
        [([1.0, 0.0], 0.60), ([1.0, 0.2], 0.62), ([1.0, 0.4], 0.66)])))
    (out / "real_fusion_twin.json").write_text(json.dumps(_results(
        f"{base} --supports cs={twin} --search interpolate", ["cs-real-100", "cs-twin"], [0.6, 0.4],
        [([1.0, 0.0], 0.60), ([0.8, 0.2], 0.57), ([0.6, 0.4], 0.54)])))
    (out / "real_fusion_gone.json").write_text(json.dumps(_results(
        f"{base} --supports pl:synth --search grid", ["cs-real-100", "pl-espeak"], [1.0, 0.0],
        [([1.0, 0.0], 0.60), ([1.0, 0.2], 0.61)])))
    save_expert(lora_expert(SHAPES, 4, 8, seed=2, languages=("cs",)), runs / "cs-real-100-seed1.safetensors")
    fixed = _results(f"{base} --supports cs={twin} --target-seed 1 --search fixed --weights 0.6,0.4",
                     ["cs-real-100-seed1", "cs-twin"], [0.6, 0.4], [([0.6, 0.4], 0.55)])
    fixed["dev_wer"]["target_only"] = None  # weights chosen beforehand: no target-alone trial
    (out / "real_fusion_fixed.json").write_text(json.dumps(fixed))

    assert main(["--out", str(out), "--name", "fs"]) == 0
    md = (out / "fs.md").read_text()
    saved = json.loads((out / "fs.json").read_text())
    rows = {r["results"]: r for r in saved["rows"]}
    assert rows["real_fusion_twin"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["real_fusion_twin"]["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    direct = expert_similarity([lora_expert(SHAPES, 4, 8, seed=s) for s in (0, 1)], ["t", "s"])
    assert rows["real_fusion_sk"]["cosine"] == pytest.approx(direct.cosine["all"][0][1], abs=1e-5)
    assert rows["real_fusion_sk"]["dev_change"] == pytest.approx(0.62 / 0.60 - 1)  # its best with any weight
    assert rows["real_fusion_twin"]["dev_change"] == pytest.approx(0.54 / 0.60 - 1)
    assert rows["real_fusion_gone"]["missing"] == ["pl-espeak"]
    assert "| real_fusion_twin | cs-real-100 | cs-twin | +1.000 / +1.000 / +1.000 | 1.00 |" in md
    assert "-10.0% at (0.60, 0.40), interpolate search | -20% (-10.0 [" in md
    assert "| real_fusion_sk |" in md and "+3.3% at (1.00, 0.20), grid search | the target alone |" in md
    assert "missing: pl-espeak" in md
    assert "dev_change" not in rows["real_fusion_fixed"]
    assert "| real_fusion_fixed | cs-real-100-seed1 | cs-twin |" in md and "| weights fixed beforehand | -20% (" in md
    assert "Command: `python benchmarks/fusion_similarity.py --out" in md
    assert (out / "fs.png").stat().st_size > 0 and (out / "fs_matrix.png").stat().st_size > 0
    assert sorted(json.loads((out / "fs_matrix.json").read_text())["names"]) == [
        "cs-real-100", "cs-real-100-seed1", "cs-twin", "sk-espeak"]


def test_refuses_a_missing_results_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--results", "real_fusion_nope"])
    assert "real_fusion_nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
    assert "no real_fusion" in capsys.readouterr().err
