"""Task vectors: from LoRA experts and fine-tunes, truncation back to LoRA, storing as experts."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_experts.model import attach_expert, remove_experts
from lora_experts.task_vectors import (LowRank, apply_task_vector, dense, expert_from_task_vector,
                                       lora_from_task_vector, lora_task_vector, task_vector, truncate,
                                       weights_task_vector)
from registry.expert_file import Expert, expert_bytes, expert_from_bytes, new_manifest
from tests.lora_experts.random_experts import BASE, SHAPES, linear_shapes, random_lora


def test_lora_task_vector_matches_peft_delta_weights(tiny_whisper):
    """scale * B @ A per module, with per-module ranks and alpha_pattern read exactly as peft applies them."""
    model = copy.deepcopy(tiny_whisper[0])
    shapes = linear_shapes(model)
    tensors = random_lora(shapes, 4, seed=1)
    fc1 = [m for m in shapes if m.endswith("fc1")]
    tensors.update(random_lora({fc1[0]: shapes[fc1[0]]}, 2, seed=2))  # a rank-2 module among rank-4 ones
    hyper = {"rank": 4, "alpha": 8.0, "alpha_pattern": {"fc1": 3.0}}
    attach_expert(model, tensors, hyper, "x")
    tv = lora_task_vector(tensors, hyper)
    assert set(tv) == {f"{m}.weight" for m in shapes}
    assert all(isinstance(v, LowRank) for v in tv.values())
    assert tv[f"{fc1[0]}.weight"].rank == 2 and tv[f"{fc1[0]}.weight"].scale == 1.5
    for module in shapes:
        theirs = model.get_submodule(module).get_delta_weight("x")
        torch.testing.assert_close(dense(tv[f"{module}.weight"]), theirs, rtol=1e-6, atol=1e-7)
    dense_tv = lora_task_vector(tensors, hyper, as_dense=True)
    assert all(torch.equal(dense_tv[k], tv[k].dense()) for k in tv)


def test_fine_tune_task_vector_holds_exactly_what_changed(tiny_whisper):
    base = tiny_whisper[0]
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    changed = ["model.decoder.layers.0.fc1.weight", "model.decoder.layers.1.self_attn_layer_norm.bias",
               "model.decoder.embed_tokens.weight"]  # the last is tied to proj_out: one entry, not two
    with torch.no_grad():
        for name in changed:
            p = tuned.get_parameter(name)
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    tv = weights_task_vector(tuned, base)
    assert sorted(tv) == sorted(changed)
    assert all(v.dtype == torch.float32 for v in tv.values())
    assert len(weights_task_vector(tuned, base, skip_unchanged=False)) == len(dict(base.named_parameters()))
    rebuilt = copy.deepcopy(base)
    apply_task_vector(rebuilt, tv)
    for name in changed:
        torch.testing.assert_close(rebuilt.get_parameter(name), tuned.get_parameter(name), rtol=0, atol=1e-6)
    apply_task_vector(rebuilt, tv, scale=-1.0)
    for name in changed:
        torch.testing.assert_close(rebuilt.get_parameter(name), base.get_parameter(name), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="another Whisper size"):
        apply_task_vector(rebuilt, {"model.decoder.layers.0.fc1.weight": torch.zeros(3, 3)})


def test_truncation_is_the_best_low_rank_and_reports_its_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g) + 0.01 * torch.randn(40, 24, generator=g)
    s = torch.linalg.svdvals(x)
    for rank in (1, 3, 24):
        low, error, norm = truncate(x, rank)
        assert low.rank == rank and low.shape == x.shape
        assert torch.linalg.matrix_rank(low.dense()) == rank
        assert error == pytest.approx(float((x - low.dense()).norm() / x.norm()), rel=1e-4, abs=1e-6)
        tail = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        assert error == pytest.approx(tail, rel=1e-4, abs=1e-6)
        assert norm == pytest.approx(float(x.norm()), rel=1e-5)
    assert truncate(x, 24)[1] < 1e-6


def test_truncating_factors_equals_truncating_the_dense_matrix():
    g = torch.Generator().manual_seed(1)
    factored = LowRank(torch.randn(6, 20, generator=g), torch.randn(30, 6, generator=g), 2.5)
    from_factors, err_f, norm_f = truncate(factored, 3)
    from_dense, err_d, norm_d = truncate(factored.dense(), 3)
    torch.testing.assert_close(from_factors.dense(), from_dense.dense(), rtol=1e-4, atol=1e-4)
    assert err_f == pytest.approx(err_d, rel=1e-4) and norm_f == pytest.approx(norm_d, rel=1e-5)
    assert truncate(factored, 6)[1] < 1e-5  # its own rank: nothing lost


def test_dense_delta_back_to_lora():
    tensors = random_lora(SHAPES, 3, seed=4)
    tv = lora_task_vector(tensors, {"alpha": 6.0}, as_dense=True)
    lora, hyper, errors = lora_from_task_vector(tv, rank=3)
    assert max(errors.values()) < 1e-5 and hyper["rank"] == 3
    back = lora_task_vector(lora, hyper)
    for k in tv:
        torch.testing.assert_close(back[k].dense(), tv[k], rtol=1e-4, atol=1e-6)
    _, _, lossy = lora_from_task_vector(tv, rank=1)
    assert all(0.05 < e < 1 for e in lossy.values())
    with pytest.raises(ValueError, match="not a weight matrix"):
        lora_from_task_vector({"model.decoder.layers.0.fc1.bias": torch.ones(32)}, rank=1)


def test_low_rank_task_vector_stores_as_an_attachable_lora_expert(tiny_whisper, tmp_path):
    """Per-module scales survive storage (alpha_pattern) and attach_expert applies exactly scale * B @ A."""
    model = copy.deepcopy(tiny_whisper[0])
    shapes = linear_shapes(model)
    tensors = random_lora(shapes, 2, seed=5)
    tv = {f"{m}.weight": LowRank(tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"], 0.5 if "fc1" in m else 1.25)
          for m in shapes}
    expert = expert_from_task_vector(tv, languages=["uk"], base=BASE, lineage={"parents": [], "method": "test"})
    assert expert.kind == "lora" and expert.manifest["hyperparameters"]["alpha_pattern"]
    assert expert.manifest["lineage"]["method"] == "test"
    loaded = expert_from_bytes(expert_bytes(expert), "test")
    assert all(torch.equal(loaded.tensors[k], v) for k, v in expert.tensors.items())
    back = task_vector(loaded)
    assert all(back[k].scale == tv[k].scale and torch.equal(back[k].B, tv[k].B) for k in tv)
    attach_expert(model, loaded.tensors, loaded.manifest["hyperparameters"], "stored")
    for m in shapes:
        torch.testing.assert_close(model.get_submodule(m).get_delta_weight("stored"), tv[f"{m}.weight"].dense(),
                                   rtol=1e-6, atol=1e-7)
    remove_experts(model)


def test_dense_task_vector_stores_as_task_vector_expert():
    tv = {"model.decoder.layers.0.fc1.weight": torch.randn(32, 16), "model.decoder.layers.0.fc1.bias": torch.randn(32),
          "model.encoder.layers.0.fc1.weight": LowRank(torch.randn(2, 16), torch.randn(32, 2))}
    expert = expert_from_task_vector(tv, languages=["pt"], base=BASE)
    assert expert.kind == "task_vector" and expert.manifest["hyperparameters"]["side"] == "both"
    assert sorted(expert.tensors) == sorted(tv)  # named by the parameter each delta adds to
    back = task_vector(expert_from_bytes(expert_bytes(expert), "test"))
    assert all(torch.equal(back[k], dense(tv[k])) for k in tv)


def test_only_lora_and_task_vector_experts_have_task_vectors():
    gated = Expert({"x": torch.zeros(1)}, new_manifest("clsr", ["uk"], BASE))
    with pytest.raises(ValueError, match="clsr expert .* has no task vector"):
        task_vector(gated)
