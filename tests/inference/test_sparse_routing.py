"""Sparse experts in an expert bank: a mixed batch (of sparse experts, and of LoRA and sparse experts in one bank)
equals running each sample alone with its expert applied in place (``apply_sparse``) or attached through peft,
for logits and for greedy and beam-search generation; soft mixing, gradients, add/remove bit-exactness, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from inference.bank import expert_bank
from inference.batched_layer import BASE_ONLY, BatchedLoraLinear
from lora_experts.sparse import SparseDelta, add_sparse, apply_sparse
from tests.lora_experts.random_experts import expert_alone, linear_shapes, random_lora

FEATS = torch.randn(4, 80, 3000, generator=torch.Generator().manual_seed(0))
LANGS = ["uk", "pt", "en", "nl"]
SOS, TRANSCRIBE, NO_TS = 50258, 50359, 50363


def _ids(model, languages, extra=(400, 500, 600)):
    lang_to_id = model.generation_config.lang_to_id
    return torch.tensor([[SOS, lang_to_id[f"<|{lang}|>"], TRANSCRIBE, NO_TS, *extra] for lang in languages])


def random_sparse(model, contains: tuple[str, ...], density: float, seed: int, side: str = "") -> dict:
    """Parameter name -> SparseDelta on the weights of the linear layers whose path contains one of ``contains``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (o, i) in linear_shapes(model, contains).items():
        if side in module:
            idx = torch.nonzero(torch.rand(o * i, generator=g) < density).flatten()
            out[f"{module}.weight"] = SparseDelta(idx, 0.3 * torch.randn(idx.numel(), generator=g), torch.Size((o, i)))
    return out


def _experts(model) -> dict:
    """uk: sparse on decoder attention + fc1; pt: LoRA on decoder fc1 (a layer uk also changes) and v_proj;
    nl: sparse on every attention and feed-forward layer of encoder and decoder, denser."""
    lora_shapes = {m: s for m, s in linear_shapes(model, ("fc1", "v_proj")).items() if ".decoder." in m}
    return {"uk": (random_sparse(model, ("q_proj", "v_proj", "fc1"), 0.05, seed=1, side=".decoder."), {}, ["uk"]),
            "pt": (random_lora(lora_shapes, 4, seed=2, scale=0.2), {"rank": 4, "alpha": 8.0}, ["pt"]),
            "nl": (random_sparse(model, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), 0.2, seed=3),
                   {}, ["nl"])}


@pytest.fixture(scope="module")
def setup(tiny_whisper):
    base = copy.deepcopy(tiny_whisper[0])
    experts = _experts(base)
    model = copy.deepcopy(base)
    expert_bank(model).add_many(experts)
    return base, model, experts


def _logits(model, feats, ids):
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=ids).logits


def test_the_bank_holds_both_kinds_in_the_same_layers(setup):
    _, model, _ = setup
    bank = expert_bank(model)
    assert [e.kind for e in bank.experts] == ["sparse", "lora", "sparse"]
    fc1 = model.get_submodule("model.decoder.layers.0.fc1")
    assert isinstance(fc1, BatchedLoraLinear) and fc1.sparse is not None and fc1.ranks == [0, 4, 0]
    assert [d is not None for d in fc1.sparse_slots()] == [True, False, True]
    assert any(m.startswith("model.encoder.") for m in bank.experts[2].modules)


@pytest.mark.parametrize("names", [["uk", "nl", None, "uk"], ["uk", "pt", None, "nl"]], ids=["sparse", "lora+sparse"])
def test_a_mixed_batch_gives_each_sample_its_own_experts_logits(setup, names):
    base, model, experts = setup
    ids = _ids(model, LANGS)
    with expert_bank(model).route(names):
        mixed = _logits(model, FEATS, ids)
    base_logits = _logits(base, FEATS, ids)
    for n, name in enumerate(names):
        alone = _logits(expert_alone(base, experts, name), FEATS[n:n + 1], ids[n:n + 1])
        torch.testing.assert_close(mixed[n:n + 1], alone, rtol=1e-5, atol=1e-5)
        assert (name is None) == torch.equal(mixed[n], base_logits[n])
    assert torch.equal(_logits(model, FEATS, ids), base_logits)  # outside the block: the base model


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate_equals_one_sample_at_a_time(setup, num_beams):
    base, model, experts = setup
    names = ["uk", "pt", None, "nl"]
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    with expert_bank(model).route(names) as routing:
        mixed = model.generate(FEATS, language=LANGS, **kwargs)
    assert set(routing._expanded) == {4, 4 * num_beams}  # encoder rows, decoder rows (samples x beams)
    pad = model.generation_config.pad_token_id
    for n, name in enumerate(names):
        alone = expert_alone(base, experts, name).generate(FEATS[n:n + 1], language=[LANGS[n]], **kwargs)[0]
        assert mixed[n][:len(alone)].tolist() == alone.tolist()
        assert (mixed[n][len(alone):] == pad).all()


def test_one_sparse_expert_for_everyone_takes_the_single_expert_path(setup):
    base, model, experts = setup
    ids = _ids(model, ["nl"] * 4)
    with expert_bank(model).route("nl") as routing:
        assert routing.uniform == 2
        out = _logits(model, FEATS, ids)
    torch.testing.assert_close(out, _logits(expert_alone(base, experts, "nl"), FEATS, ids), rtol=1e-5, atol=1e-5)


def test_soft_routing_mixes_sparse_experts_per_sample(setup):
    base, model, experts = setup
    bank = expert_bank(model)
    mixes = [{"uk": 0.7, "nl": 0.3}, {"nl": 0.4, None: 0.6}, {"uk": 1.0, "nl": 0.0}, {"nl": 0.5, "uk": 0.5}]
    table = torch.tensor([[bank.index(k) if k else BASE_ONLY for k in mix] for mix in mixes])
    weights = torch.tensor([list(mix.values()) for mix in mixes])
    ids = _ids(model, LANGS)
    with bank.route(table, weights=weights):
        mixed = _logits(model, FEATS, ids)
    for n, mix in enumerate(mixes):
        named = {k: w for k, w in mix.items() if k is not None}
        ref = copy.deepcopy(base)
        apply_sparse(ref, add_sparse([experts[k][0] for k in named], list(named.values())))
        torch.testing.assert_close(mixed[n:n + 1], _logits(ref, FEATS[n:n + 1], ids[n:n + 1]), rtol=1e-4, atol=1e-4)


def test_mixing_weights_carry_gradients_through_sparse_experts(setup):
    base, model, experts = setup
    bank = expert_bank(model)
    ids = _ids(model, LANGS)
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75]], requires_grad=True)
    table = torch.tensor([[0, 2]] * 4)  # uk and nl, both sparse
    with bank.route(table, weights=weights):
        logits = model(input_features=FEATS, decoder_input_ids=ids).logits
    logits.square().mean().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    with bank.route(table, weights=weights.detach()):  # the folded (no-gradient) path computes the same
        torch.testing.assert_close(_logits(model, FEATS, ids), logits.detach(), rtol=1e-5, atol=1e-5)


def test_add_and_remove_on_a_live_model_restore_the_base_bit_exactly(tiny_whisper):
    model = copy.deepcopy(tiny_whisper[0])
    experts = _experts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    ids = _ids(model, LANGS)
    base_logits = _logits(model, FEATS, ids)
    bank = expert_bank(model)
    bank.add_many({"uk": experts["uk"], "pt": experts["pt"]})
    with bank.route(["uk", "pt", None, "uk"]):
        before = _logits(model, FEATS, ids)
    bank.add("nl", *experts["nl"])
    assert model.state_dict().keys() == state.keys()  # experts are not saved with the model
    for name in ("uk", "nl"):
        got, given = bank.deltas(name), experts[name][0]
        assert got.keys() == given.keys()
        assert all(torch.equal(d.indices, given[p].indices) and torch.equal(d.values, given[p].values)
                   for p, d in got.items())
    with pytest.raises(ValueError, match="is a sparse expert, without LoRA matrices.*bank.deltas"):
        bank.tensors("uk")
    bank.remove("uk")
    assert bank.names == ["pt", "nl"]
    with bank.route([None, "pt", None, None]):
        torch.testing.assert_close(_logits(model, FEATS, ids)[1:2], before[1:2], rtol=1e-6, atol=1e-6)
    bank.remove("pt")
    bank.remove("nl")
    assert expert_bank(model, create=False) is None
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, FEATS, ids), base_logits)


def test_sparse_deltas_off_linear_weights_or_of_another_size_are_refused(tiny_whisper):
    model = copy.deepcopy(tiny_whisper[0])
    bank = expert_bank(model)
    norm = "model.decoder.layers.0.self_attn_layer_norm.weight"
    delta = SparseDelta(torch.tensor([0, 3]), torch.ones(2), model.get_parameter(norm).shape)
    with pytest.raises(ValueError, match=f"changes {norm}, which is not the weight of a linear layer.*apply_sparse"):
        bank.add("ln", {norm: delta}, {}, ["uk"])
    fc1 = "model.decoder.layers.0.fc1.weight"
    with pytest.raises(ValueError, match="has shape \\(3, 3\\).*different Whisper size"):
        bank.add("small", {fc1: SparseDelta(torch.tensor([0]), torch.ones(1), torch.Size((3, 3)))}, {}, ["uk"])
    assert not bank.experts and not bank.layers()  # nothing was attached
