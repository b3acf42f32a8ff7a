"""Sparse experts: index packing, the file, exact apply/remove, task vectors and fusion, masks and their overlap."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lora_experts.merge import fuse_experts, merge
from lora_experts.sparse import (SparseDelta, add_sparse, apply_sparse, pack_indices, remove_sparse, sparse_applied,
                                 sparse_deltas, sparse_expert, sparse_from_dense, sparse_size, sparse_task_vector,
                                 unpack_indices)
from lora_experts.sparse_layer import add_trainable_sparse, remove_trainable_sparse, trained_values
from lora_experts.sparse_masks import magnitude_scores, mask_overlap, plot_overlap, top_k_masks
from lora_experts.task_vectors import apply_task_vector, task_vector
from registry.expert_file import expert_bytes, expert_from_bytes, load_expert, save_expert
from tests.lora_experts.random_experts import BASE


def decoder_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters()
            if n.startswith("model.decoder.layers.") and n.endswith("weight") and p.dim() == 2}


def random_deltas(model, density: float, seed: int, dtype=torch.float32) -> dict[str, SparseDelta]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in decoder_weights(model).items():
        idx = torch.nonzero(torch.rand(p.numel(), generator=g) < density).flatten()
        out[name] = SparseDelta(idx, (0.1 * torch.randn(idx.numel(), generator=g)).to(dtype), p.shape)
    return out


def same_parameters(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("numel", [1, 9, 1000, 65536, 300_001])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.1, 0.3, 1.0])
def test_index_packing_round_trips(numel, density):
    g = torch.Generator().manual_seed(numel)
    idx = torch.nonzero(torch.rand(numel, generator=g) < density).flatten()
    encoding, packed = pack_indices(idx, numel)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_indices(encoding, packed, numel), idx)
    # The smaller encoding is chosen: never more than the bitmap.
    assert packed.numel() <= (numel + 7) // 8 or encoding == "indices" and packed.numel() <= idx.numel()


def test_packing_is_compact_and_handles_large_gaps():
    numel = 512 * 2048
    idx = torch.sort(torch.randperm(numel, generator=torch.Generator().manual_seed(0))[: numel // 100]).values
    encoding, packed = pack_indices(idx, numel)
    assert encoding == "indices" and packed.numel() < 1.5 * idx.numel()  # vs 8 bytes as int64
    assert pack_indices(torch.arange(numel), numel)[0] == "bitmap"
    far = torch.tensor([0, 1, 127, 128, 2**14, 2**31 + 3, 2**40])
    assert torch.equal(unpack_indices(*pack_indices(far, 2**41), 2**41), far)
    with pytest.raises(ValueError, match="ascending"):
        pack_indices(torch.tensor([3, 1]), 10)
    with pytest.raises(ValueError, match="truncated"):
        unpack_indices("indices", torch.tensor([0x81], dtype=torch.uint8), 10)


def test_apply_then_remove_restores_the_base_bit_exactly(tiny_whisper):
    model = copy.deepcopy(tiny_whisper[0])
    for dtype in (torch.float32, torch.float16):
        model = model.to(dtype)
        reference = copy.deepcopy(model)
        a, b = random_deltas(model, 0.05, seed=1, dtype=dtype), random_deltas(model, 0.2, seed=2, dtype=dtype)
        first = apply_sparse(model, a)
        second = apply_sparse(model, b, scale=-0.7)  # stacked experts overlap; removed in reverse order
        assert not same_parameters(model, reference)
        remove_sparse(model, second)
        remove_sparse(model, first)
        assert same_parameters(model, reference)
        with pytest.raises(RuntimeError), sparse_applied(model, a):
            raise RuntimeError("decoding failed")
        assert same_parameters(model, reference)


def test_a_fully_dense_mask_equals_the_dense_delta(tiny_whisper):
    model = tiny_whisper[0]
    g = torch.Generator().manual_seed(3)
    delta = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in decoder_weights(model).items()}
    masks = top_k_masks(magnitude_scores(delta), density=1.0)
    sparse = sparse_from_dense(delta, masks)
    assert all(torch.equal(sparse_task_vector(sparse)[n], delta[n]) for n in delta)
    by_sparse, by_dense = copy.deepcopy(model), copy.deepcopy(model)
    apply_sparse(by_sparse, sparse)
    apply_task_vector(by_dense, delta)
    assert same_parameters(by_sparse, by_dense)


def test_the_file_round_trips_bit_exactly(tiny_whisper, tmp_path):
    deltas = random_deltas(tiny_whisper[0], 0.02, seed=4)
    deltas["model.decoder.layers.0.fc1.weight"] = random_deltas(tiny_whisper[0], 0.6, seed=5)[
        "model.decoder.layers.0.fc1.weight"]  # one bitmap among varint masks
    expert = sparse_expert(deltas, languages=["uk"], base=BASE, hyperparameters={"sparsity": 0.98})
    suffixes = {k.rsplit(".", 1)[1] for k in expert.tensors}
    assert suffixes == {"indices", "bitmap", "values"}
    path = save_expert(expert, tmp_path / "uk.safetensors")
    loaded = load_expert(path)
    assert loaded.manifest == expert.manifest and loaded.kind == "sparse"
    assert all(torch.equal(loaded.tensors[k], expert.tensors[k]) for k in expert.tensors)
    assert expert_bytes(expert_from_bytes(path.read_bytes(), "uk")) == path.read_bytes()
    back = sparse_deltas(loaded)
    assert all(torch.equal(back[n].indices, d.indices) and torch.equal(back[n].values, d.values)
               for n, d in deltas.items())
    size = sparse_size(loaded)
    assert size["file_bytes"] == path.stat().st_size and size["entries"] == expert.num_parameters
    assert size["value_bytes"] == 4 * size["entries"] and 0 < size["density"] < 0.1
    assert expert.manifest["hyperparameters"]["density"] == pytest.approx(size["density"])


def test_weighted_addition_and_fusion_equal_the_dense_sums(tiny_whisper):
    model = tiny_whisper[0]
    a = sparse_expert(random_deltas(model, 0.1, seed=6), languages=["uk"], base=BASE)
    b = sparse_expert(random_deltas(model, 0.1, seed=7), languages=["ru"], base=BASE)
    ta, tb = task_vector(a), task_vector(b)
    added = sparse_task_vector(add_sparse([a, b], [0.7, -0.3]))
    for name in ta:
        want = 0.7 * ta[name] - 0.3 * tb[name]
        assert torch.equal(added[name], want)
        torch.testing.assert_close(merge([ta, tb], [0.7, -0.3], "linear").task_vector[name].cpu(), want)
    assert set(sparse_task_vector(add_sparse([a, b], [1.0, 0.0]))) == set(ta)
    fused, _ = fuse_experts([a, b], [0.5, 0.5], "ties", names=["uk-sparse", "ru-sparse"], density=0.5)
    assert fused.kind == "task_vector" and fused.manifest["lineage"]["parents"][0]["kind"] == "sparse"


def test_top_k_masks_keep_the_largest_entries_globally_or_per_matrix():
    scores = {"a.weight": torch.tensor([[5.0, 1.0], [0.5, 4.0]]), "b.weight": torch.tensor([3.0, 0.1, 0.2, 0.3])}
    glob = top_k_masks(scores, 0.375)  # 3 of 8 entries
    assert {k: v.tolist() for k, v in glob.items()} == {"a.weight": [0, 3], "b.weight": [0]}
    per = top_k_masks(scores, 0.5, scope="per_matrix")
    assert {k: v.tolist() for k, v in per.items()} == {"a.weight": [0, 3], "b.weight": [0, 3]}
    assert list(top_k_masks(scores, 0.25)) == ["a.weight"]  # b keeps nothing: left out
    with pytest.raises(ValueError, match="density"):
        top_k_masks(scores, 0.0)


def test_mask_overlap_is_one_for_identical_and_zero_for_disjoint_masks(tiny_whisper, tmp_path):
    model = tiny_whisper[0]
    a = random_deltas(model, 0.3, seed=8)
    disjoint = {n: SparseDelta(torch.tensor(sorted(set(range(d.numel)) - set(d.indices.tolist()))),
                               torch.ones(d.numel - d.indices.numel()), d.shape) for n, d in a.items()}
    other = random_deltas(model, 0.3, seed=9)
    overlap = mask_overlap({"uk": sparse_expert(a, languages=["uk"], base=BASE), "uk2": a, "xx": disjoint,
                            "ru": other})
    j = overlap.jaccard()
    assert j[0, 1] == 1.0 and j[0, 2] == 0.0 and j[1, 2] == 0.0 and j[3, 3] == 1.0
    # Independent random masks overlap by chance only: about d^2 / (2d - d^2) at density d.
    assert 0 < j[0, 3] < 1 and j[0, 3] == pytest.approx(overlap.chance()[0, 3], abs=0.03)
    assert overlap.chance()[0, 3] == pytest.approx(0.09 / 0.51, abs=0.02) and overlap.chance()[1, 1] == 1
    layers = overlap.per_layer()
    assert set(layers) == {"decoder.0", "decoder.1"} and all(m[0, 1] == 1.0 and m[0, 2] == 0 for m in layers.values())
    name = overlap.parameters[0]
    assert overlap.jaccard(name)[0, 2] == 0.0
    assert "| uk | 100.0 | 100.0 | 0.0 |" in overlap.markdown()
    png = plot_overlap(overlap, str(tmp_path / "overlap.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_overlap_where_neither_mask_has_entries_is_undefined_not_identical(tiny_whisper):
    deltas = random_deltas(tiny_whisper[0], 0.3, seed=8)
    first, second = sorted(deltas)[:2]
    only_first = {"uk": {first: deltas[first]}, "pt": {first: deltas[first]}, "nl": {second: deltas[second]}}
    overlap = mask_overlap(only_first)
    j = overlap.jaccard(second)  # only nl's mask touches this parameter
    assert np.isnan(j[0, 1]) and j[0, 2] == 0.0 and j[2, 2] == 1.0 and j[0, 0] == 1.0
    assert overlap.jaccard()[0, 1] == 1.0 and overlap.as_dict()["per_parameter"][second][0][1] is None
    assert "| uk | 100.0 | -" in overlap.markdown(j)


def test_only_masked_entries_train_and_removal_restores_the_base(tiny_whisper):
    model = copy.deepcopy(tiny_whisper[0])
    reference = copy.deepcopy(model)
    masks = {n: d.indices for n, d in random_deltas(model, 0.05, seed=10).items()}
    add_trainable_sparse(model, masks)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(masks) and all(n.endswith(".values") for n in trainable)
    features = torch.randn(1, 80, 3000)
    ids = torch.tensor([[50258, 50259, 50359, 50363]])
    with torch.no_grad():  # zero values: the base's output
        torch.testing.assert_close(model(input_features=features, decoder_input_ids=ids).logits,
                                   reference(input_features=features, decoder_input_ids=ids).logits)
    model(input_features=features, decoder_input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    weight = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(trained_values(model)[weight], torch.full((masks[weight].numel(),), 0.5))
    # W = W0 + scatter(values): changed on the mask, W0 elsewhere.
    fc1 = model.get_submodule("model.decoder.layers.0.fc1").weight
    diff = (fc1 - reference.get_submodule("model.decoder.layers.0.fc1").weight).reshape(-1)
    assert torch.equal(torch.nonzero(diff).flatten(), masks[weight])
    remove_trainable_sparse(model)
    assert same_parameters(model, reference)
