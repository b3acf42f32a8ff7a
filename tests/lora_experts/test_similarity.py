"""Cosine similarity of task vectors: factored inner products equal dense ones, groups, and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_experts.deltas import LowRank, dense
from lora_experts.similarity import delta_inner, expert_similarity, group_of, similarity
from lora_experts.task_vectors import task_vector
from registry.expert_file import save_expert
from tests.lora_experts.random_experts import BASE, SHAPES, lora_expert


def _low_rank(out: int, inp: int, rank: int, seed: int, scale: float = 1.0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), scale)


def test_factored_inner_products_equal_the_dense_ones():
    a, b = _low_rank(24, 16, 4, 0, 0.5), _low_rank(24, 16, 8, 1, 2.0)
    d = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    want = {(a, b): (dense(a) * dense(b)).sum(), (a, d): (dense(a) * d).sum(), (d, b): (d * dense(b)).sum(),
            (d, d): (d * d).sum()}
    for (x, y), value in want.items():
        assert delta_inner(x, y) == pytest.approx(float(value), rel=1e-5)
    with pytest.raises(ValueError, match="different parameters"):
        delta_inner(a, torch.zeros(16, 24))


def test_parameter_groups_follow_the_module_path():
    assert group_of("model.encoder.layers.3.fc1.weight") == "encoder"
    assert group_of("model.decoder.layers.0.encoder_attn.q_proj.weight") == "decoder"
    assert group_of("model.decoder.embed_tokens.weight") == "decoder"
    assert group_of("proj_out.weight") == "other"


def test_cosines_and_norms_per_group():
    enc, dec = "model.encoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.weight"
    dec2 = "model.decoder.layers.1.fc1.weight"
    t = {enc: _low_rank(8, 8, 2, 0), dec: _low_rank(8, 8, 2, 1)}
    flipped = {k: LowRank(v.A, v.B, -3.0) for k, v in t.items()}  # -3 x the same deltas
    decoder_only = {dec2: _low_rank(8, 8, 2, 2)}  # another module: orthogonal by construction
    sim = similarity([t, flipped, decoder_only], ["t", "flipped", "dec"])
    for group in ("encoder", "decoder", "all"):
        assert sim.cosine[group][0][1] == pytest.approx(-1.0)
        assert sim.cosine[group][0][0] == pytest.approx(1.0)
        assert sim.norms[group][1] == pytest.approx(3 * sim.norms[group][0])
    assert math.isnan(sim.cosine["encoder"][2][0]) and sim.norms["encoder"][2] == 0.0
    assert sim.cosine["decoder"][2][0] == 0.0 and sim.cosine["decoder"][2][2] == pytest.approx(1.0)
    want = float(dense(t[dec]).norm() ** 2 + dense(t[enc]).norm() ** 2) ** 0.5
    assert sim.norms["all"][0] == pytest.approx(want, rel=1e-5)
    table = sim.markdown("encoder")
    assert "| cosine (encoder) | t | flipped | dec | norm |" in table and "| dec | – | – | – | 0 |" in table


def test_expert_similarity_reads_stored_experts_and_refuses_another_base():
    a = lora_expert(SHAPES, 4, 8, seed=0)
    b = lora_expert(SHAPES, 4, 8, seed=1, languages=("ru",))
    sim = expert_similarity([a, b, a], ["a", "b", "a2"])
    assert sim.cosine["all"][0][2] == pytest.approx(1.0)
    ta, tb = task_vector(a, as_dense=True), task_vector(b, as_dense=True)
    dot = sum(float((ta[k] * tb[k]).sum()) for k in ta)
    norms = [sum(float(v.norm() ** 2) for v in t.values()) ** 0.5 for t in (ta, tb)]
    assert sim.cosine["all"][0][1] == pytest.approx(dot / (norms[0] * norms[1]), rel=1e-4)
    other = lora_expert(SHAPES, 4, 8, seed=2, base={**BASE, "name": "other", "fingerprint": "e" * 16})
    with pytest.raises(ValueError, match="expert c was trained on base other.*one base model can be compared"):
        expert_similarity([a, other], ["a", "c"])


def test_fuse_similarity_command_prints_and_writes_json_and_plot(tmp_path, capsys):
    from trainers.cli import main

    paths = []
    for seed, lang in ((0, "cs"), (1, "sk")):
        paths.append(tmp_path / f"{lang}-expert.safetensors")
        save_expert(lora_expert(SHAPES, 4, 8, seed=seed, languages=(lang,)), paths[-1])
    run = tmp_path / "sim"
    assert main(["fuse", "--similarity", "--experts", ",".join(map(str, paths)), "--run-dir", str(run),
                 "--registry", str(tmp_path / "registry")]) == 0
    out = capsys.readouterr().out
    assert "| cosine (decoder) | cs-expert | sk-expert | norm |" in out and "plot:" in out
    saved = json.loads((run / "similarity.json").read_text())
    assert saved["names"] == ["cs-expert", "sk-expert"] and saved["cosine"]["all"][0][0] == pytest.approx(1.0)
    assert (run / "similarity.png").stat().st_size > 0
    # One expert is nothing to compare; a missing one is named.
    assert main(["fuse", "--similarity", "--experts", str(paths[0]), "--registry", str(tmp_path / "r")]) == 2
    assert "--similarity compares experts" in capsys.readouterr().err
    assert main(["fuse", "--similarity", "--experts", f"{paths[0]},nope", "--registry", str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err


def test_step_along_splits_a_delta_into_the_targets_direction_and_the_rest():
    from lora_experts.similarity import step_along

    torch.manual_seed(0)
    target = {"a": torch.randn(4, 3), "b": LowRank(torch.randn(2, 6), torch.randn(5, 2), 0.5)}
    other = {"a": torch.randn(4, 3), "c": torch.randn(2, 2)}
    dense_t = torch.cat([target["a"].flatten(), dense(target["b"]).flatten()])
    # the other's part orthogonal to the target (module "c" the target never touches is orthogonal already)
    proj = float(torch.dot(other["a"].flatten(), target["a"].flatten())) / float(dense_t.dot(dense_t))
    rest = {"a": other["a"] - proj * target["a"], "b": -proj * dense(target["b"]), "c": other["c"]}
    fused = {"a": 0.4 * target["a"] + rest["a"], "b": 0.4 * dense(target["b"]) + rest["b"], "c": rest["c"]}
    coef, ratio = step_along(fused, target)
    rest_norm = sum(float((v ** 2).sum()) for v in rest.values()) ** 0.5
    assert coef == pytest.approx(0.4, abs=1e-6) and ratio == pytest.approx(rest_norm / float(dense_t.norm()), rel=1e-5)
    assert step_along(target, target) == pytest.approx((1.0, 0.0), abs=1e-6)
    with pytest.raises(ValueError, match="zero task vector"):
        step_along(target, {"a": torch.zeros(4, 3)})
