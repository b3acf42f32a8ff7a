"""`pack create --languages` takes, per language, the expert tagged 'prod', else the best stored test WER,
else the latest; `--latest` keeps the old rule; the output says which was taken and why."""

from __future__ import annotations

import pytest

from registry.packs import create_pack, select_experts
from registry.store import Registry
from tests.lora_experts.random_experts import lora_expert
from trainers.cli import main

BASE = {"name": "tiny", "fingerprint": "f" * 16, "tokenizer_fingerprint": "t" * 16}
SHAPES = {"model.decoder.layers.0.fc1": (8, 4)}


def _expert(seed: int, wer: float | None = None, language: str = "de"):
    expert = lora_expert(SHAPES, 2, 4.0, seed=seed, languages=[language], base=BASE)
    if wer is not None:
        expert.manifest["metrics"] = {language: {"test": {"wer": wer}}}
    return expert


@pytest.fixture()
def reg(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.add(_expert(1, wer=0.40), "de-real")            # de-real@1
    reg.add(_expert(2, wer=0.30), "de-real")            # de-real@2: best scored
    reg.add(_expert(3), "de-fused-try")                 # the latest, a throwaway without scores
    reg.add(_expert(4, wer=0.50, language="nl"), "nl-real")
    return reg


def test_best_test_wer_beats_a_newer_unscored_throwaway(reg):
    reasons: dict[str, str] = {}
    picked = select_experts(reg, "tiny", ["de", "nl"], reasons=reasons)
    assert [r.ref for r in picked] == ["de-real@2", "nl-real@1"]
    assert reasons["de"] == "de-real@2: best stored de test WER (30.0%) of 2 scored"
    assert [r.ref for r in select_experts(reg, "tiny", ["de"], latest=True)] == ["de-fused-try@1"]


def test_prod_tag_wins_over_scores(reg):
    reg.tag("de-real@1", "prod")
    reasons: dict[str, str] = {}
    assert [r.ref for r in select_experts(reg, "tiny", ["de"], reasons=reasons)] == ["de-real@1"]
    assert reasons["de"] == "de-real@1: tagged 'prod'"


def test_unscored_and_untagged_falls_back_to_latest(tmp_path):
    reg = Registry(tmp_path / "r")
    reg.add(_expert(1), "a")
    reg.add(_expert(2), "b")
    reasons: dict[str, str] = {}
    assert [r.ref for r in select_experts(reg, "tiny", ["de"], reasons=reasons)] == ["b@1"]
    assert "the latest (no version is tagged 'prod'" in reasons["de"]
    info = create_pack(tmp_path / "p.safetensors", registry=reg, base="tiny", languages=["de"])
    assert [e.ref for e in info.experts] == ["b@1"]


def test_cli_says_which_expert_and_why(reg, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["pack", "create", "--registry", str(reg.root), "--base", "tiny", "--languages", "de,nl",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "de: de-real@2: best stored de test WER (30.0%)" in printed and "nl: nl-real@1" in printed
    assert main(["pack", "create", "--registry", str(reg.root), "--base", "tiny", "--languages", "de", "--latest",
                 "--out", str(out)]) == 0
    assert "de: de-fused-try@1: the latest (--latest)" in capsys.readouterr().out
