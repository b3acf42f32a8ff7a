"""Two-phase sparse expert training on the tiny Whisper: the recipe, gradient masks, packs, eval and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lora_experts.sparse import sparse_deltas
from registry.expert_file import load_expert
from trainers.train_sparse import SparseTrainConfig, train_sparse_expert

TINY = dict(languages=("uk",), rank=2, epochs=1, max_steps=2, batch_size=4, lr=1e-2, sparse_lr=1e-2,
            warmup_steps=1, progress=False, test_limit=1)


@pytest.fixture(scope="module")
def trained(uk_corpus, tiny_whisper_dir, tmp_path_factory):
    cfg = SparseTrainConfig(data=str(uk_corpus), base=str(tiny_whisper_dir), sparsity=0.9,
                            run_dir=str(tmp_path_factory.mktemp("sparse")), **TINY)
    expert, report = train_sparse_expert(cfg)
    return cfg, expert, report


def test_two_phases_give_a_sparse_expert_of_the_requested_sparsity(trained):
    cfg, expert, report = trained
    m, hyper = expert.manifest, expert.manifest["hyperparameters"]
    assert m["kind"] == "sparse" and m["languages"] == ["uk"]
    phase1 = load_expert(Path(cfg.run_dir) / "phase1" / "lora.safetensors")
    # Candidates: every entry of the matrices phase 1 adapted, (out, in) from lora_B (out, r) and lora_A (r, in).
    candidates = sum(phase1.tensors[k].shape[1] * phase1.tensors[k[:-1] + "B"].shape[0]
                     for k in phase1.tensors if k.endswith("lora_A"))
    assert hyper["candidate_entries"] == candidates
    deltas = sparse_deltas(expert)
    kept = sum(d.indices.numel() for d in deltas.values())
    assert kept == round(0.1 * candidates) and hyper["sparsity_achieved"] == pytest.approx(0.9, abs=1e-6)
    # The mask lies in the matrices phase 1 adapted (decoder only), and phase 2 moved the values off zero.
    assert {n[: -len(".weight")] for n in deltas} <= {k.rsplit(".", 1)[0] for k in phase1.tensors}
    assert all(n.startswith("model.decoder.") for n in deltas) and hyper["side"] == "decoder"
    assert any(d.values.abs().sum() > 0 for d in deltas.values())
    assert hyper["sparsity"] == 0.9 and hyper["mask_score"] == "magnitude" and hyper["phase1"]["rank"] == 2
    parent = m["lineage"]["parents"][0]
    assert parent["kind"] == "lora" and parent["role"] == "mask (phase 1)"
    assert parent["expert"].endswith("lora.safetensors")
    assert m["data"]["utterances"] > 0 and set(m["metrics"]["uk"]) == {"validation", "test", "base_test"}
    assert report["phase1"]["history"] and report["history"] and report["size"]["entries"] == kept
    assert set(report["seconds"]) >= {"phase1", "prepare", "train", "test"}


def test_gradient_masks_per_matrix_from_an_existing_expert(trained, tmp_path):
    cfg, _, _ = trained
    phase1 = str(Path(cfg.run_dir) / "phase1" / "lora.safetensors")
    again = SparseTrainConfig(data=cfg.data, base=cfg.base, sparsity=0.5, mask_from=phase1, mask_score="gradient",
                              mask_scope="per_matrix", score_batches=2, run_dir=str(tmp_path),
                              **{**TINY, "max_steps": 1}, test=False)
    expert, report = train_sparse_expert(again)
    assert report["phase1"] == {} and not (tmp_path / "phase1").exists()
    hyper = expert.manifest["hyperparameters"]
    assert hyper["mask_score"] == "gradient" and hyper["score_batches"] == 2
    assert expert.manifest["lineage"]["parents"][0]["expert"] == phase1
    assert all(d.indices.numel() == round(0.5 * d.numel) for d in sparse_deltas(expert).values())


def test_packs_store_sparse_experts_and_evaluation_restores_the_base(trained, tiny_whisper_dir, tmp_path):
    from inference.language_matrix import expert_applied
    from inference.packs import load_pack
    from registry.bases import load_base
    from registry.packs import create_pack, read_pack

    _, expert, _ = trained
    info = create_pack(tmp_path / "pack.safetensors", {"uk-sparse": expert})
    assert [e.kind for e in info.experts] == ["sparse"]
    back = read_pack(info.path)["uk-sparse"]
    assert back.manifest == expert.manifest and all(torch.equal(back.tensors[k], v) for k, v in expert.tensors.items())
    base = load_base(str(tiny_whisper_dir), device="cpu")
    bank = load_pack(base, info.path)  # a pack's sparse expert joins the model's bank, routed per sample
    assert [(e.name, e.kind) for e in bank.experts] == [("uk-sparse", "sparse")]
    bank.clear()
    before = copy.deepcopy(dict(base.model.named_parameters()))
    with expert_applied(base.model, back):
        changed = [n for n, p in base.model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(n in sparse_deltas(back) for n in changed)
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())


def test_train_kind_sparse_from_the_command_line(uk_corpus, tiny_whisper_dir, tmp_path, capsys, monkeypatch):
    import json

    from trainers.cli import main

    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(tmp_path / "home"))
    assert main(["train", "--kind", "sparse", "--sparsity", "0.95", "--base", str(tiny_whisper_dir), "--data",
                 str(uk_corpus), "--language", "uk", "--name", "uk-sparse", "--rank", "2", "--epochs", "1",
                 "--max-steps", "1", "--batch-size", "4", "--test-limit", "1", "--run-dir", str(tmp_path / "run"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stored uk-sparse@1 in the registry" in out and "sparse expert:" in out and "| uk |" in out
    assert load_expert(tmp_path / "run" / "expert.safetensors").kind == "sparse"
    assert main(["train", "--sparsity", "0.9", "--data", str(uk_corpus), "--language", "uk", "--name", "x"]) == 2
    assert "--kind sparse" in capsys.readouterr().err
    report = tmp_path / "eval.json"
    assert main(["eval", "--base", str(tiny_whisper_dir), "--data", str(uk_corpus), "--expert", "uk-sparse@latest",
                 "--limit", "1", "--max-new-tokens", "4", "--out", str(report)]) == 0
    meta = json.loads(report.read_text())["meta"]
    assert meta["expert"]["kind"] == "sparse" and meta["expert"]["ref"] == "uk-sparse@1"


def test_yaml_config_selects_the_sparse_recipe(tmp_path):
    from trainers.cli import build_parser
    from trainers.cli.train import _config_from_args

    (tmp_path / "s.yaml").write_text("data: d\nlanguage: uk\nname: uk-s\nkind: sparse\nsparsity: 0.95\n")
    cfg, name, _ = _config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "s.yaml"),
                                                                "--mask-scope", "per_matrix"]))
    assert isinstance(cfg, SparseTrainConfig) and (cfg.sparsity, cfg.mask_scope, name) == (0.95, "per_matrix", "uk-s")
    with pytest.raises(ValueError, match="only apply to sparse experts; add --kind sparse"):
        _config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "s.yaml"), "--kind", "lora"]))
    with pytest.raises(ValueError, match="sparsity must be in"):
        SparseTrainConfig(data="d", languages=("uk",), sparsity=1.0)
