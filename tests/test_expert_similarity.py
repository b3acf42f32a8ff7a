"""benchmarks/expert_similarity.py: the table, JSON and plot from expert files, and its argument checks."""

from __future__ import annotations

import json

import pytest

from benchmarks.expert_similarity import main, parse_experts
from registry.expert_file import save_expert
from tests.lora_experts.random_experts import SHAPES, lora_expert


def test_parse_experts_needs_labels_and_two_experts():
    assert parse_experts("a=x.safetensors, b=cs-real@2") == [("a", "x.safetensors"), ("b", "cs-real@2")]
    for bad in ("a=x.safetensors", "x.safetensors,y.safetensors", "a=,b=y"):
        with pytest.raises(SystemExit):
            parse_experts(bad)


def test_writes_the_matrices_with_the_command(tmp_path):
    files = {}
    for seed, label in ((0, "cs-real"), (1, "sk-espeak")):
        files[label] = tmp_path / f"{label}.safetensors"
        save_expert(lora_expert(SHAPES, 4, 8, seed=seed), files[label])
    spec = ",".join(f"{k}={v}" for k, v in files.items())
    assert main(["--experts", spec, "--out", str(tmp_path / "out"), "--name", "sim"]) == 0
    md = (tmp_path / "out" / "sim.md").read_text()
    assert "| cosine (all) | cs-real | sk-espeak | norm |" in md and "| cs-real | +1.000 |" in md
    assert "Command: `python benchmarks/expert_similarity.py --experts" in md
    saved = json.loads((tmp_path / "out" / "sim.json").read_text())
    assert saved["experts"] == {k: str(v) for k, v in files.items()}
    assert saved["cosine"]["decoder"][1][1] == pytest.approx(1.0)
    assert (tmp_path / "out" / "sim.png").stat().st_size > 0
