"""The learned router: its file round-trips bit-exactly, it refuses banks and files it was not made for, it
pools only the audio frames, and its policy's decisions (hard top-1, soft top-k, base-model slots)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference.bank import expert_bank
from inference.batched_layer import BASE_ONLY
from inference.router import LearnedRouter, RouterFormatError, RouterMismatchError, audio_frames, pool, router_slots
from inference.routing import POLICIES, LearnedRouting
from registry.expert_file import save_expert
from tests.lora_experts.random_experts import BASE, SHAPES, linear_shapes, lora_expert, random_lora

FEATS = torch.randn(3, 80, 3000, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bank(tiny_whisper):
    """uk (decoder), pt+es (one expert serving two languages), nl (adapts the encoder too) on the tiny Whisper."""
    model = copy.deepcopy(tiny_whisper[0])
    shapes = linear_shapes(model, ("q_proj", "fc1"))
    decoder = {m: s for m, s in shapes.items() if ".decoder." in m}
    experts = {"uk-x": (random_lora(decoder, 2, 1), {"alpha": 4.0}, ["uk"]),
               "ibero-x": (random_lora(decoder, 4, 2), {"alpha": 8.0}, ["pt", "es"]),
               "nl-x": (random_lora(shapes, 2, 3, scale=0.5), {"alpha": 4.0}, ["nl"])}
    b = expert_bank(model)
    b.add_many(experts)
    b.base = dict(BASE)
    return b


def _router(bank, languages=("uk", "pt", "de"), hidden=16, seed=0) -> LearnedRouter:
    torch.manual_seed(seed)
    router = LearnedRouter(router_slots(bank, languages), bank.names, 64, hidden, base=bank.base)
    with torch.no_grad():  # away from LayerNorm's init (ones, zeros), so every tensor is checked
        for p in router.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return router


def test_slots_are_each_experts_languages_then_base_slots_for_languages_without_one(bank):
    assert router_slots(bank, ["uk", "pt", "de", "de"]) == [("uk-x", "uk"), ("ibero-x", "pt"), ("ibero-x", "es"),
                                                            ("nl-x", "nl"), (None, "de")]
    router = _router(bank)
    assert router.slot_ids(bank).tolist() == [0, 1, 1, 2, BASE_ONLY]
    assert router.languages == ["uk", "pt", "es", "nl", "de"]


def test_save_load_round_trip_is_bit_exact(bank, tmp_path):
    router = _router(bank).eval()
    router.manifest_extra.update(training={"corpus": "x", "steps": 3}, metrics={"validation": {"wer": 0.25}})
    path = router.save(tmp_path / "r.safetensors")
    loaded = LearnedRouter.load(path)
    assert loaded.slots == router.slots and loaded.experts == router.experts and loaded.base == router.base
    assert loaded.manifest() == router.manifest()
    state, back = router.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    states = torch.randn(3, 1500, 64)
    assert torch.equal(loaded(states, [10, 700, 1500]), router(states, [10, 700, 1500]))
    assert loaded.save(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    manifest = json.loads(safe_open(str(path), "pt").metadata()["whisper_experts_router"])
    assert manifest["kind"] == "router" and manifest["format_version"] == 1 and manifest["hidden"] == 16
    assert manifest["base"]["fingerprint"] == BASE["fingerprint"] and manifest["languages"] == router.languages
    assert manifest["slots"][-1] == {"expert": None, "language": "de"} and manifest["training"]["steps"] == 3


def test_a_linear_gate_round_trips_too(bank, tmp_path):
    router = _router(bank, hidden=0)
    loaded = LearnedRouter.load(router.save(tmp_path / "linear.safetensors"))
    states = torch.randn(2, 1500, 64)
    assert loaded.hidden == 0 and torch.equal(loaded(states), router.eval()(states))


def test_a_bank_with_other_experts_or_another_base_is_refused(bank, tiny_whisper):
    router = _router(bank)
    other = copy.deepcopy(bank.model)
    other_bank = expert_bank(other)
    other_bank.remove("nl-x")
    other_bank.add("ru-x", random_lora({m: s for m, s in linear_shapes(other, ("fc1",)).items()}, 2, 9),
                   {"alpha": 4.0}, ["ru"])
    with pytest.raises(RouterMismatchError, match=r"trained for experts \[uk-x, ibero-x, nl-x\] but the bank holds "
                                                  r"\[uk-x, ibero-x, ru-x\]"):
        LearnedRouting(other_bank, router)
    other_bank.base = {**BASE, "fingerprint": "0" * 16}
    other_bank.remove("ru-x")
    other_bank.add("nl-x", bank.tensors("nl-x"), {"alpha": 4.0}, ["nl"])
    with pytest.raises(RouterMismatchError, match="fingerprint ffff.*fingerprint 0000"):
        LearnedRouting(other_bank, router)
    with pytest.raises(RouterMismatchError, match="width 64"):
        router(torch.zeros(1, 10, 32))
    # Order does not matter: slots are matched by name.
    other_bank.base = dict(BASE)
    other_bank.remove("uk-x")
    other_bank.add("uk-x", bank.tensors("uk-x"), {"alpha": 4.0}, ["uk"])
    assert other_bank.names == ["ibero-x", "nl-x", "uk-x"]
    assert router.slot_ids(other_bank).tolist() == [2, 0, 0, 1, BASE_ONLY]


def test_missing_corrupt_and_foreign_files_are_refused(bank, tmp_path):
    path = _router(bank).save(tmp_path / "r.safetensors")
    with pytest.raises(RouterFormatError, match="does not exist"):
        LearnedRouter.load(tmp_path / "nope.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(RouterFormatError, match="truncated or corrupt"):
        LearnedRouter.load(cut)
    expert = tmp_path / "expert.safetensors"
    save_expert(lora_expert(SHAPES, 2, 4.0, 0), expert)
    with pytest.raises(RouterFormatError, match="is an expert file, not a router"):
        LearnedRouter.load(expert)
    tensors = dict(LearnedRouter.load(path).state_dict())
    meta = json.loads(safe_open(str(path), "pt").metadata()["whisper_experts_router"])
    for bad, match in ((dict(meta, format_version=99), "newer"), (dict(meta, kind="lora"), "not a router's"),
                       (dict(meta, hidden=8), "do not match its manifest")):
        save_file(tensors, tmp_path / "bad.safetensors", metadata={"whisper_experts_router": json.dumps(bad)})
        with pytest.raises(RouterFormatError, match=match):
            LearnedRouter.load(tmp_path / "bad.safetensors")
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"whisper_experts_router": "{not json"})
    with pytest.raises(RouterFormatError, match="not valid JSON"):
        LearnedRouter.load(tmp_path / "bad.safetensors")


def test_pooling_averages_only_the_audio_frames():
    states = torch.randn(2, 1500, 8)
    pooled = pool(states, [3, 1500])
    torch.testing.assert_close(pooled[0], states[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], states[1].mean(0))
    padded = states.clone()
    padded[0, 3:] = 100.0  # what lies beyond the audio does not matter
    torch.testing.assert_close(pool(padded, [3, 1500]), pooled)
    assert audio_frames([0.0, 1.0, 2.345, 45.0]) == [1, 50, 118, 1500]


def test_hard_decision_names_the_top_slot_its_language_and_probability(bank):
    policy = LearnedRouting(bank, _router(bank))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05],   # uk-x
                          [0.1, 0.3, 0.35, 0.2, 0.05],  # ibero-x, in Spanish: pt + es = 0.65
                          [0.1, 0.1, 0.1, 0.2, 0.5]])   # the base model, in German
    d = policy.decide(probs)
    assert len(d) == 3 and d.experts.tolist() == [[0], [1], [BASE_ONLY]] and d.weights.tolist() == [[1.0]] * 3
    assert d.names == ["uk-x", "ibero-x", None] and d.languages == ["uk", "es", "de"]
    assert d.probabilities == pytest.approx([0.7, 0.35, 0.5])
    codes, by_language = policy.language_posterior(probs)
    assert codes == ["uk", "pt", "es", "nl", "de"]
    torch.testing.assert_close(by_language, probs)
    with bank.route(d):  # the decision is what the bank takes
        assert bank.routing.experts.tolist() == [[0], [1], [BASE_ONLY]]


def test_soft_top_k_mixes_the_top_slots_by_the_routers_probabilities(bank):
    policy = LearnedRouting(bank, _router(bank), top_k=2)
    probs = torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.2, 0.6]])
    d = policy.decide(probs)
    assert d.experts.tolist() == [[0, 1], [BASE_ONLY, 2]] and d.names == ["uk-x", "nl-x"]
    torch.testing.assert_close(d.weights, torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    assert d.languages == ["uk", "de"]  # the top slot's language, even when its expert is the base model
    raw = LearnedRouting(bank, _router(bank), top_k=2, normalize=False).decide(probs)
    torch.testing.assert_close(raw.weights, torch.tensor([[0.6, 0.2], [0.6, 0.2]]))
    with pytest.raises(ValueError, match="top_k"):
        LearnedRouting(bank, _router(bank), top_k=0)


def test_route_listens_to_the_base_models_encoder_whatever_routing_is_in_force(bank):
    policy = POLICIES["learned"](bank, _router(bank))
    with bank.route(None), torch.no_grad():
        states = bank.model.get_encoder()(FEATS).last_hidden_state
    want = policy.route(encoder_hidden_states=states, frames=[100, 1500, 20])
    with bank.route("nl-x"):  # nl-x adapts the encoder; the router still hears the base model
        got = policy.route(FEATS, frames=[100, 1500, 20])
    assert got.experts.tolist() == want.experts.tolist() and got.probabilities == pytest.approx(want.probabilities)
    torch.testing.assert_close(policy.probabilities(FEATS), _router(bank).eval().probabilities(states))
    with pytest.raises(ValueError, match="listens to the audio"):
        policy.route()
