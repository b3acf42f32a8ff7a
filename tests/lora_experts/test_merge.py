"""Merge methods: invariants for every method, exactness, golden values, parity with peft, fused experts."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from peft import PeftModel

from lora_experts.merge import MERGE_METHODS, fuse_experts, fused_expert, merge, method_options
from lora_experts.merge_methods import SAMPLE, low_rank_sparse, trim_
from lora_experts.model import attach_expert
from lora_experts.peft_format import write_peft_adapter
from lora_experts.task_vectors import apply_task_vector, dense, lora_task_vector, task_vector
from registry.expert_file import expert_bytes, expert_from_bytes
from tests.lora_experts.random_experts import SHAPES, linear_shapes, lora_expert, random_lora

ONLY_A = ["model.decoder.layers.1.fc2"]
ONLY_B = ["model.encoder.layers.0.fc1"]


def _tv(shapes, rank, alpha, seed, dtype=torch.float32):
    return lora_task_vector(random_lora(shapes, rank, seed, dtype=dtype), {"alpha": alpha})


@pytest.fixture()
def pair():
    """Two LoRA task vectors with different ranks (4, 2), scales (2, 3) and target modules."""
    a = _tv({m: s for m, s in SHAPES.items() if m not in ONLY_B}, 4, 8.0, seed=1)
    b = _tv({m: s for m, s in SHAPES.items() if m not in ONLY_A}, 2, 6.0, seed=2)
    return a, b


def _expected(tvs, weights) -> dict:
    keys = set().union(*tvs)
    return {k: sum(w * dense(tv[k]) for tv, w in zip(tvs, weights) if k in tv) for k in keys}


# Options under which each method, given one expert at weight 1 (or (1, 0) over two), returns that expert.
IDENTITY = [("linear", {}, 0.0), ("svd", {"rank": 4}, 1e-5), ("ties", {"density": 1.0}, 1e-6),
            ("magnitude_prune", {"density": 1.0}, 1e-6), ("dare_linear", {"drop_rate": 0.0}, 1e-6),
            ("dare", {"drop_rate": 0.0}, 1e-6), ("dare_ties", {"drop_rate": 0.0}, 1e-6),
            ("lors", {"rank_ratio": 1.0, "density": 1.0}, 1e-5), ("task_arithmetic", {"lam": 0.0}, 0.0)]


def test_every_registered_method_has_an_identity_case_and_documented_options():
    assert {name for name, _, _ in IDENTITY} == set(MERGE_METHODS)
    for fn in MERGE_METHODS.values():  # house style: documented, every step commented
        assert fn.__doc__ and "# Step 1" in inspect.getsource(fn)
    assert method_options("ties") == {"density": 0.2, "lam": 1.0, "sign": "mass"}
    with pytest.raises(ValueError, match="unknown merge method 'mean'; choose one of dare, dare_linear"):
        merge([{}], None, "mean")
    with pytest.raises(ValueError, match="'ties' has no option rank; its options are density=0.2"):
        merge([{"x": torch.ones(2)}], None, "ties", rank=3)


@pytest.mark.parametrize("method,options,atol", IDENTITY, ids=[m for m, _, _ in IDENTITY])
def test_weights_one_zero_give_the_first_expert_back(pair, method, options, atol):
    a, b = pair
    for tvs, weights in (([a, b], [1.0, 0.0]), ([a], [1.0])):
        out = merge(tvs, weights, method, **options).task_vector
        assert set(out) == set(a)  # the zero-weight expert's own modules are left out, not stored as zeros
        for k in a:
            torch.testing.assert_close(dense(out[k]), dense(a[k]), rtol=0, atol=atol)
    exact = merge([a, b], [1.0, 0.0], "linear").task_vector
    assert all(torch.equal(exact[k].A, a[k].A) and torch.equal(exact[k].B, a[k].B) for k in a)  # bit for bit


def test_linear_concatenates_ranks_and_equals_the_dense_sum(pair):
    a, b = pair
    weights = [0.7, -0.4]
    result = merge([a, b], weights, "linear")
    assert result.low_rank and result.relative_error is None
    ranks = {k: v.rank for k, v in result.task_vector.items()}
    assert ranks == {**{k: 6 for k in a if k in b}, **{f"{m}.weight": 4 for m in ONLY_A},
                     **{f"{m}.weight": 2 for m in ONLY_B}}
    expected = _expected([a, b], weights)
    as_dense = merge([a, b], weights, "linear", dense_output=True).task_vector
    for k, v in expected.items():
        torch.testing.assert_close(dense(result.task_vector[k]), v, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(as_dense[k], v, rtol=1e-5, atol=1e-7)
    mixed = merge([a, {k: dense(v) for k, v in b.items()}], weights).task_vector  # a full fine-tune with a LoRA
    assert all(torch.allclose(dense(mixed[k]), v, rtol=1e-5, atol=1e-7) for k, v in expected.items())


def test_negative_weights_subtract(pair):
    a, _ = pair
    assert all(float(dense(v).abs().max()) < 1e-7 for v in merge([a, a], [1.0, -1.0]).task_vector.values())
    # Opposite experts cancel in the TIES vote too: no sign has the mass, nothing is kept.
    assert all(float(v.abs().max()) == 0 for v in merge([a, a], [1.0, -1.0], "ties", density=1.0).task_vector.values())
    flipped = merge([a], [-2.0], "ties", density=1.0).task_vector
    assert all(torch.allclose(flipped[k], -2 * dense(a[k]), atol=1e-7) for k in a)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_dtype_and_shapes_are_preserved(method):
    shapes = {m: s for m, s in SHAPES.items() if m not in ONLY_B}
    a, b = _tv(shapes, 4, 8.0, 1, torch.bfloat16), _tv(shapes, 4, 8.0, 2, torch.bfloat16)
    out = merge([a, b], [0.6, 0.4], method).task_vector
    assert set(out) == set(a)
    for k, v in out.items():
        assert v.dtype == torch.bfloat16 and v.shape == a[k].shape
        assert torch.isfinite(dense(v).float()).all() and dense(v).abs().sum() > 0


def _peft_with(model, tmp_path, adapters: dict):
    """A PeftModel holding each (tensors, hyper) adapter, loaded through the PEFT format."""
    peft_model = None
    for name, (tensors, hyper) in adapters.items():
        write_peft_adapter(tensors, hyper, tmp_path / name, "tiny-whisper")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(tmp_path / name), adapter_name=name)
        else:
            peft_model.load_adapter(str(tmp_path / name), adapter_name=name)
    return peft_model


def _peft_deltas(peft_model, adapter: str) -> dict:
    prefix = "base_model.model."
    return {f"{name[len(prefix):]}.weight": module.get_delta_weight(adapter)
            for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and adapter in module.lora_A}


def test_linear_and_svd_match_peft_cat_and_svd(tiny_whisper, tmp_path):
    """peft's "cat" puts w_i * s_i on A_i and "svd" truncates the weighted dense sum; the deltas are ours."""
    shapes = linear_shapes(tiny_whisper[0])
    only_a = [m for m in shapes if m.endswith("v_proj")]
    a_tensors = random_lora({m: s for m, s in shapes.items()}, 4, seed=1)
    b_tensors = random_lora({m: s for m, s in shapes.items() if m not in only_a}, 2, seed=2)
    a_hyper, b_hyper = {"rank": 4, "alpha": 8.0}, {"rank": 2, "alpha": 6.0}
    adapters = {"a": (a_tensors, a_hyper), "b": (b_tensors, b_hyper)}
    peft_model = _peft_with(copy.deepcopy(tiny_whisper[0]), tmp_path, adapters)
    weights = [0.7, -0.4]
    peft_model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    peft_model.add_weighted_adapter(["a", "b"], weights, "svd", combination_type="svd", svd_rank=3)
    tvs = [lora_task_vector(a_tensors, a_hyper), lora_task_vector(b_tensors, b_hyper)]
    for combination, ours in (("cat", merge(tvs, weights, "linear")), ("svd", merge(tvs, weights, "svd", rank=3))):
        theirs = _peft_deltas(peft_model, combination)
        assert set(theirs) == set(ours.task_vector)
        for k, delta in theirs.items():
            torch.testing.assert_close(dense(ours.task_vector[k]), delta, rtol=1e-4, atol=1e-6)
    assert ours.relative_error > 0.01  # rank 3 < 6: the SVD merge really truncated and says so


def test_peft_linear_is_not_the_exact_sum(tiny_whisper, tmp_path):
    """peft's "linear" mixes sqrt(w) A and sqrt(w) B: cross terms B_a A_b. Ours is the exact sum."""
    shapes = linear_shapes(tiny_whisper[0], ("q_proj",))
    a, b = random_lora(shapes, 2, seed=3), random_lora(shapes, 2, seed=4)
    hyper = {"rank": 2, "alpha": 2.0}
    peft_model = _peft_with(copy.deepcopy(tiny_whisper[0]), tmp_path, {"a": (a, hyper), "b": (b, hyper)})
    peft_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "lin", combination_type="linear")
    tvs = [lora_task_vector(a, hyper), lora_task_vector(b, hyper)]
    expected = _expected(tvs, [0.5, 0.5])
    theirs = _peft_deltas(peft_model, "lin")
    ours = merge(tvs, [0.5, 0.5]).task_vector
    for k, v in expected.items():
        torch.testing.assert_close(dense(ours[k]), v, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(theirs[k], v, rtol=1e-2, atol=1e-5)


def test_ties_golden_values():
    e1, e2, e3 = [1.0, -2.0, 3.0], [2.0, 0.5, -1.0], [-1.5, -1.0, -0.25]
    tvs = [{"p.weight": torch.tensor([row])} for row in (e1, e2, e3)]
    run = lambda **o: merge(tvs, None, "ties", **o).task_vector["p.weight"][0].tolist()  # noqa: E731
    assert run(density=1.0) == [1.5, -1.5, 3.0]  # signs (+, -, +) by mass; means over agreeing experts only
    # Trimmed to 2 of 3 entries: e1 -> (0, -2, 3), e2 -> (2, 0, -1), e3 -> (-1.5, -1, 0).
    assert run(density=2 / 3) == [2.0, -1.5, 3.0]
    assert run(density=2 / 3, lam=0.5) == [1.0, -0.75, 1.5]
    assert run(density=2 / 3, sign="count") == [0.0, -1.5, 0.0]  # one vote each way: no sign elected
    assert merge(tvs, [1.0, 2.0, 1.0], "ties", density=1.0).task_vector["p.weight"][0].tolist() == [2.5, -1.5, 3.0]


def test_trimming_keeps_the_largest_entries_at_the_requested_density():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(2, 50, 40, generator=g)
    kept = trim_(small.clone(), 0.3)
    for before, after in zip(small, kept):
        assert int(torch.count_nonzero(after)) == 600
        assert float(before[after != 0].abs().min()) >= float(before[after == 0].abs().max())
    large = torch.randn(1, 2048, 512, generator=g)
    assert large[0].numel() > SAMPLE  # the sampled threshold
    achieved = int(torch.count_nonzero(trim_(large.clone(), 0.2))) / large.numel()
    assert abs(achieved - 0.2) < 0.005
    out = merge([{"p.weight": small[0]}], None, "magnitude_prune", density=0.25).task_vector["p.weight"]
    assert int(torch.count_nonzero(out)) == 500 and torch.equal(out[out != 0], small[0][out != 0])


def test_dare_is_repeatable_for_a_seed_and_rescales_survivors(pair):
    a, b = pair
    for method in ("dare_linear", "dare_ties"):
        one = merge([a, b], [0.5, 0.5], method, seed=7, drop_rate=0.3)
        again = merge([a, b], [0.5, 0.5], method, seed=7, drop_rate=0.3)
        other = merge([a, b], [0.5, 0.5], method, seed=8, drop_rate=0.3)
        assert all(torch.equal(one.task_vector[k], again.task_vector[k]) for k in one.task_vector)
        assert not all(torch.equal(one.task_vector[k], other.task_vector[k]) for k in one.task_vector)
        assert one.options == {"drop_rate": 0.3, "seed": 7}
    x = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    out = merge([{"p.weight": x}], None, "dare", drop_rate=0.75, seed=1).task_vector["p.weight"]
    survived = out != 0
    assert abs(float(survived.float().mean()) - 0.25) < 0.02
    torch.testing.assert_close(out[survived], 4 * x[survived], rtol=0, atol=1e-6)


def test_lors_parts_have_the_rank_and_sparsity_asked_for():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=g)
    low, sparse = low_rank_sparse(x, 5, 0.3, "residual")
    assert low.rank == 5 and torch.linalg.matrix_rank(low.dense()) == 5
    assert int(torch.count_nonzero(sparse)) == 360
    residual = x - low.dense()
    assert torch.allclose(sparse[sparse != 0], residual[sparse != 0])  # the residual's largest entries, unchanged
    assert float(sparse.abs().max()) == pytest.approx(float(residual.abs().max()))
    low, full = low_rank_sparse(x, 5, 1.0, "residual")
    torch.testing.assert_close(low.dense() + full, x, rtol=0, atol=1e-5)  # nothing pruned: exact again
    low, sparse = low_rank_sparse(x, 5, 0.3, "prune")
    assert low is None and int(torch.count_nonzero(sparse)) == 360
    truncated, nothing = low_rank_sparse(x, 5, 1.0, "prune")
    assert truncated.rank == 5 and nothing is None
    assert torch.allclose(sparse[sparse != 0], truncated.dense()[sparse != 0])  # pruned, not changed
    with pytest.raises(ValueError, match="variant"):
        low_rank_sparse(x, 5, 0.3, "both")


def test_lors_merge_ranks_and_reported_error(pair):
    a, b = pair
    weights = [0.6, 0.4]
    low = merge([a, b], weights, "lors", rank_ratio=0.5, density=1.0)
    assert low.low_rank  # nothing pruned after truncation: exactly low-rank
    assert {k: v.rank for k, v in low.task_vector.items() if k in a and k in b} == {k: 2 + 1 for k in a if k in b}
    expected = _expected([a, b], weights)
    for variant in ("prune", "residual"):
        result = merge([a, b], weights, "lors", rank_ratio=0.5, density=0.3, variant=variant)
        missed = math.sqrt(sum(float((dense(result.task_vector[k]) - v).norm()) ** 2 for k, v in expected.items()))
        total = math.sqrt(sum(float(v.norm()) ** 2 for v in expected.values()))
        assert result.relative_error == pytest.approx(missed / total, rel=1e-4)
        assert 0 < result.relative_error < 1


def test_svd_truncates_to_rank_and_reports_the_error(pair):
    a, b = pair
    result = merge([a, b], [0.5, 0.5], "svd", rank=2)
    expected = _expected([a, b], [0.5, 0.5])
    assert all(v.rank == 2 for v in result.task_vector.values())
    for k, v in expected.items():
        explicit = float((v - dense(result.task_vector[k])).norm() / v.norm())
        assert result.errors[k] == pytest.approx(explicit, rel=1e-3, abs=1e-6)
    assert result.errors[f"{ONLY_B[0]}.weight"] < 1e-5  # rank 2 already
    with pytest.raises(ValueError, match="needs rank="):
        merge([{k: dense(v) for k, v in a.items()}], None, "svd")


def test_support_language_task_arithmetic(pair):
    target, support = pair
    other = _tv(SHAPES, 3, 3.0, seed=9)
    result = merge([target, support, other], None, "task_arithmetic", lam=0.6)
    expected = _expected([target, support, other], [1.0, 0.3, 0.3])  # theta_T + 0.6 * mean(supports)
    assert result.low_rank
    assert all(torch.allclose(dense(result.task_vector[k]), v, rtol=1e-5, atol=1e-7) for k, v in expected.items())
    pooled = merge([support, other], [0.5, 0.5]).task_vector  # a pooled-support expert, fused beforehand
    again = merge([target, pooled], None, "task_arithmetic", lam=0.6).task_vector
    assert all(torch.allclose(dense(again[k]), v, rtol=1e-5, atol=1e-7) for k, v in expected.items())


def test_experts_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="p.weight: expert 0 has shape \\(4, 4\\) but expert 1 has \\(8, 4\\)"):
        merge([{"p.weight": torch.ones(4, 4)}, {"p.weight": torch.ones(8, 4)}])
    with pytest.raises(ValueError, match="2 weights for 3 experts"):
        merge([{}, {}, {}], [1, 2])


def test_fused_expert_records_lineage_and_round_trips():
    uk = lora_expert(SHAPES, 4, 8.0, seed=1, languages=["uk"])
    ru = lora_expert(SHAPES, 2, 4.0, seed=2, languages=["ru"])
    fused, result = fuse_experts([uk, ru], [0.8, 0.2], "linear", names=["uk-small", "ru-espeak"])
    assert fused.kind == "lora" and fused.languages == ["uk", "ru"] and result.low_rank
    lineage = fused.manifest["lineage"]
    assert lineage["method"] == "linear" and lineage["weights"] == [0.8, 0.2]
    assert [(p["expert"], p["weight"], p["languages"]) for p in lineage["parents"]] == [("uk-small", 0.8, ["uk"]),
                                                                                       ("ru-espeak", 0.2, ["ru"])]
    loaded = expert_from_bytes(expert_bytes(fused), "fused")
    assert all(torch.equal(loaded.tensors[k], v) for k, v in fused.tensors.items())
    back = task_vector(loaded)
    for k, v in _expected([task_vector(uk), task_vector(ru)], [0.8, 0.2]).items():
        torch.testing.assert_close(back[k].dense(), v, rtol=1e-5, atol=1e-7)
    same, _ = fuse_experts([uk, ru], [1.0, 0.0])  # the first expert, bit for bit, under the same scale
    assert same.tensors.keys() == uk.tensors.keys()
    assert all(torch.equal(same.tensors[k], uk.tensors[k]) for k in uk.tensors)
    assert same.manifest["hyperparameters"]["alpha"] / same.manifest["hyperparameters"]["rank"] == 2.0
    ties, _ = fuse_experts([uk, ru], [1.0, 1.0], "ties", names=["uk", "ru"], languages=["uk"], seed=3)
    assert ties.kind == "task_vector" and ties.languages == ["uk"] and ties.manifest["lineage"]["options"] == {}
    svd = fused_expert(merge([task_vector(uk), task_vector(ru)], [1, 1], "svd", rank=2), [uk, ru])
    assert svd.kind == "lora" and 0 < svd.manifest["lineage"]["relative_error"] < 1
    target_only = fuse_experts([uk, ru], None, "task_arithmetic", lam=0.5)[0]
    assert target_only.languages == ["uk"]


def test_experts_of_different_bases_are_not_fused():
    uk = lora_expert(SHAPES, 4, 8.0, seed=1)
    other = lora_expert(SHAPES, 4, 8.0, seed=2, base={"name": "whisper-small", "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="expert ru was trained on base whisper-small"):
        fuse_experts([uk, other], [0.5, 0.5], names=["uk", "ru"])


def test_fused_lora_on_whisper_equals_the_summed_weights(tiny_whisper):
    """End to end: the fused expert attached by peft changes the logits exactly as adding the dense sum does."""
    model = tiny_whisper[0]
    shapes = linear_shapes(model, ("q_proj", "fc1", "fc2"))
    uk = lora_expert(shapes, 4, 8.0, seed=1)
    ru = lora_expert({m: s for m, s in shapes.items() if "fc2" not in m}, 8, 8.0, seed=2)
    fused, _ = fuse_experts([uk, ru], [0.7, 0.5])
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[50258, 50280, 50359, 50363, 400]])
    summed = copy.deepcopy(model)
    apply_task_vector(summed, merge([task_vector(uk), task_vector(ru)], [0.7, 0.5], dense_output=True).task_vector)
    adapted = copy.deepcopy(model)
    attach_expert(adapted, fused.tensors, fused.manifest["hyperparameters"])
    with torch.no_grad():
        ours = adapted(input_features=feats, decoder_input_ids=ids).logits
        reference = summed(input_features=feats, decoder_input_ids=ids).logits
        base = model(input_features=feats, decoder_input_ids=ids).logits
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_exact_fusion_of_eight_whisper_base_sized_experts_concatenates_ranks():
    """8 rank-16 experts on whisper-base's decoder shapes (d_model 512, ffn 2048, 6 layers); the time it takes
    is measured by benchmarks/merge_speed.py, never asserted here."""
    shapes = {}
    for layer in range(6):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "encoder_attn.q_proj", "encoder_attn.out_proj"):
            shapes[f"model.decoder.layers.{layer}.{proj}"] = (512, 512)
        shapes[f"model.decoder.layers.{layer}.fc1"] = (2048, 512)
        shapes[f"model.decoder.layers.{layer}.fc2"] = (512, 2048)
    tvs = [_tv(shapes, 16, 32.0, seed) for seed in range(8)]
    result = merge(tvs, [0.125] * 8, "linear", device="cpu")
    assert result.low_rank and all(v.rank == 128 for v in result.task_vector.values())
