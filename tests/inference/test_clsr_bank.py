"""CLSR experts in an expert bank: the bank's routing sets each sample's CLSR language, so a mixed batch (and
beam-search generate) equals per-sample single-language runs; LoRA experts on other layers share the bank;
removal restores the base bit-exactly; soft weights and fc1/fc2 clashes are refused."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from distill.clsr import add_language, convert_to_clsr, make_clsr_expert, set_language
from inference.bank import expert_bank
from inference.clsr_bank import add_clsr_experts
from lora_experts.model import attach_expert
from registry.fingerprint import weight_fingerprint
from tests.distill.clsr_helpers import FEATS3, IDS3, logits, randomize_language
from tests.lora_experts.random_experts import linear_shapes, random_lora

LANGS = ["uk", "pt", "en"]


@pytest.fixture(scope="module")
def clsr_setup(short_whisper):
    """(base identity, the trained CLSR model with uk (full) and pt (low-rank), their experts)."""
    base = SimpleNamespace(name="tiny-whisper", fingerprint=weight_fingerprint(short_whisper),
                           tokenizer_fingerprint="tok-0")
    trained = convert_to_clsr(copy.deepcopy(short_whisper))
    add_language(trained, "uk")
    add_language(trained, "pt", kind="lowrank", rank=4, alpha=8.0)
    randomize_language(trained, "uk", seed=1)
    randomize_language(trained, "pt", seed=2)
    experts = {"uk-clsr": make_clsr_expert(trained, "uk", base), "pt-clsr": make_clsr_expert(trained, "pt", base)}
    return base, trained, experts


def _single(trained, language):
    set_language(trained, language)
    return trained


def test_a_mixed_batch_equals_per_sample_single_language_runs(short_whisper, clsr_setup):
    base, trained, experts = clsr_setup
    model = copy.deepcopy(short_whisper)
    bank = expert_bank(model)
    assert add_clsr_experts(bank, experts, base) == [0, 1]
    assert [e.kind for e in bank.experts] == ["clsr", "clsr"] and bank.expert_for_language() == {"uk": 0, "pt": 1}
    assert any(m.startswith("model.encoder.") for m in bank.experts[0].modules)
    with bank.route(["uk-clsr", "pt-clsr", None]):
        mixed = logits(model, FEATS3, IDS3)
    for n, language in enumerate(["uk", "pt", None]):
        alone = logits(_single(trained, language), FEATS3[n:n + 1], IDS3[n:n + 1])
        torch.testing.assert_close(mixed[n:n + 1], alone, rtol=1e-5, atol=1e-5)
    base_logits = logits(short_whisper, FEATS3, IDS3)
    # The base-routed row equals the base to float rounding: the shared path runs on that row alone, and the CPU's
    # matmul kernels (oneDNN/AMX) may block a 1-row product differently from a 3-row one, so not bit for bit.
    torch.testing.assert_close(mixed[2], base_logits[2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(mixed[0], base_logits[0])
    assert torch.equal(logits(model, FEATS3, IDS3), base_logits)  # outside the block: the shared path
    with bank.route("pt-clsr"):  # one expert for all
        torch.testing.assert_close(logits(model, FEATS3, IDS3), logits(_single(trained, "pt"), FEATS3, IDS3),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate_equals_one_sample_at_a_time(short_whisper, clsr_setup, num_beams):
    base, trained, experts = clsr_setup
    model = copy.deepcopy(short_whisper)
    bank = expert_bank(model)
    add_clsr_experts(bank, experts, base)
    kwargs = dict(max_new_tokens=5, num_beams=num_beams, do_sample=False)
    with bank.route(["pt-clsr", None, "uk-clsr"]):
        mixed = model.generate(FEATS3, language=["pt", "en", "uk"], **kwargs)
    for n, language in enumerate(["pt", None, "uk"]):
        alone = _single(trained, language).generate(FEATS3[n:n + 1], language=[["pt", "en", "uk"][n]], **kwargs)[0]
        assert mixed[n][:len(alone)].tolist() == alone.tolist()


def test_lora_and_clsr_experts_share_one_bank_and_removal_restores_the_base(short_whisper, clsr_setup):
    base, trained, experts = clsr_setup
    model = copy.deepcopy(short_whisper)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    bank = expert_bank(model)
    shapes = {m: s for m, s in linear_shapes(model, ("q_proj", "v_proj")).items() if ".decoder." in m}
    lora = (random_lora(shapes, 4, seed=5, scale=0.2), {"rank": 4, "alpha": 8.0}, ["nl"])
    bank.add("nl-lora", *lora)
    add_clsr_experts(bank, {"uk-clsr": experts["uk-clsr"]}, base)
    with bank.route(["nl-lora", "uk-clsr", None]):
        mixed = logits(model, FEATS3, IDS3)
    peft = copy.deepcopy(short_whisper)
    attach_expert(peft, lora[0], lora[1])
    torch.testing.assert_close(mixed[0:1], logits(peft, FEATS3[0:1], IDS3[0:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:2], logits(_single(trained, "uk"), FEATS3[1:2], IDS3[1:2]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uk-clsr with weight\\(s\\) 0.5: clsr experts route hard"):
        bank.set_routing(torch.tensor([[0, 1]] * 3), weights=torch.tensor([[0.5, 0.5]] * 3))
    fc1 = linear_shapes(short_whisper, ("fc1",))  # the plain model's paths: now CLSR pairs
    with pytest.raises(ValueError, match="is a ClsrFc1 here, not a linear layer"):
        bank.add("pt-lora", random_lora(fc1, 2, seed=6), {"alpha": 4.0}, ["pt"])
    bank.remove("uk-clsr")
    assert isinstance(model.get_submodule("model.decoder.layers.0.fc1"), torch.nn.Linear)  # converted back
    bank.remove("nl-lora")
    assert expert_bank(model, create=False) is None
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_clsr_experts_are_refused_beside_experts_on_fc1_fc2(short_whisper, clsr_setup):
    base, _, experts = clsr_setup
    model = copy.deepcopy(short_whisper)
    bank = expert_bank(model)
    fc = {m: s for m, s in linear_shapes(model, ("fc1", "fc2")).items() if ".decoder." in m}
    bank.add("pt-lora", random_lora(fc, 2, seed=6), {"alpha": 4.0}, ["pt"])
    with pytest.raises(ValueError, match="CLSR experts \\(uk-clsr\\) replace every fc1/fc2.*pt-lora adapts "
                                         "model.decoder.layers.0.fc1"):
        add_clsr_experts(bank, {"uk-clsr": experts["uk-clsr"]}, base)
    assert bank.names == ["pt-lora"] and "clsr" not in bank.routed
    assert isinstance(model.get_submodule("model.encoder.layers.0.fc1"), torch.nn.Linear)  # not converted
