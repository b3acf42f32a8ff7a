"""CLSR layouts with ``attention``: gated language paths on the attention projections beside the FFN pairs.

Gate init is the base exactly; forced gates select the language's merged weights or the base; the projections
are only those of the layout's layers; the expert file names and records them, round-trips, and is refused by a
model without them; the bank keeps LoRA experts off the gated projections; per-sample routing in a mixed batch
equals one language at a time; the parameter counts match the stored tensors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from distill.clsr import (ClsrConfig, add_language, attach_clsr_expert, clsr_layers, collect_gates,
                          convert_from_clsr, convert_to_clsr, load_clsr_expert, make_clsr_expert,
                          parameters_active_per_token, parameters_per_language, save_clsr_expert, set_language)
from distill.clsr.expert import clsr_modules
from distill.clsr.layer import ClsrProj
from distill.clsr.model import clsr_module_paths, clsr_projections
from inference.bank import expert_bank
from inference.clsr_bank import add_clsr_experts
from registry.expert_file import Expert, ExpertFormatError, read_manifest
from registry.fingerprint import weight_fingerprint
from tests.distill.clsr_helpers import FEATS3, IDS3, force_gates, language_ffn_model, logits, randomize_language
from tests.lora_experts.random_experts import linear_shapes, random_lora

DETERMINISTIC = {"path_dropout": 0.0, "gate_dropout": 0.0, "shared_only_prob": 0.0}
ATTENTION = {"side": "both", "encoder_start": 1, "attention": True}
SELF = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
GATED = ([("model.encoder.layers.1", s) for s in SELF]
         + [(f"model.decoder.layers.{i}", s) for i in (0, 1)
            for s in SELF + ["encoder_attn.q_proj", "encoder_attn.out_proj"]])


@pytest.fixture(scope="module")
def base(short_whisper):
    return SimpleNamespace(name="tiny-whisper", fingerprint=weight_fingerprint(short_whisper),
                           tokenizer_fingerprint="tok-0", model=short_whisper)


def _trained(base, language="uk", seed=1, **options):
    model = convert_to_clsr(copy.deepcopy(base.model), (language,), **{**ATTENTION, **options})
    randomize_language(model, language, seed=seed)
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_projections_of_the_layout_are_gated_and_gate_init_is_the_base_exactly(base, mode):
    model = convert_to_clsr(copy.deepcopy(base.model), ("uk",), **ATTENTION, **DETERMINISTIC)
    assert [(layer, slot) for layer, slot, _ in clsr_projections(model)] == GATED
    assert not isinstance(model.model.encoder.layers[0].self_attn.q_proj, ClsrProj)  # below encoder_start
    assert not isinstance(model.model.decoder.layers[0].encoder_attn.k_proj, ClsrProj)  # cross k/v: left alone
    set_language(model, "uk")
    model.train(mode == "train")
    with collect_gates(model) as gates:
        out = logits(model)
    assert torch.equal(out, logits(base.model))
    recorded = {layer for layer, _ in gates.records}
    assert {f"{layer}.{slot}" for layer, slot in GATED} <= recorded
    convert_from_clsr(model)
    assert not any(isinstance(m, ClsrProj) for m in model.modules())
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.model.state_dict().values()))
    assert all(not p.requires_grad for p in model.parameters()) == all(not p.requires_grad
                                                                      for p in base.model.parameters())


@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forced_gates_select_the_language_weights_or_the_base(base, kind, mode):
    model = _trained(base, kind=kind, rank=4, **DETERMINISTIC)
    set_language(model, "uk")
    model.train(mode == "train")
    force_gates(model, "uk", open_=False)
    assert torch.equal(logits(model), logits(base.model))
    force_gates(model, "uk", open_=True)
    out = logits(model)
    assert not torch.allclose(out, logits(base.model))
    # Every projection's and FFN's path merged into a plain Whisper: the same function.
    torch.testing.assert_close(out, logits(language_ffn_model(base.model, model, "uk")), rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_routes_each_sample_as_alone(base):
    model = _trained(base)
    add_language(model, "pt")
    randomize_language(model, "pt", seed=2)
    model.eval()
    set_language(model, ["uk", None, "pt"])
    mixed = logits(model, FEATS3, IDS3)
    for i, lang in enumerate(["uk", None, "pt"]):
        set_language(model, lang)
        alone = logits(model, FEATS3[i:i + 1], IDS3[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_expert_names_records_and_round_trips_its_projections(base, tmp_path):
    model = _trained(base, kind="lowrank", rank=4)
    path = save_clsr_expert(model, "uk", tmp_path / "uk.safetensors", base)
    hp = read_manifest(path)["hyperparameters"]
    assert (hp["side"], hp["encoder_start"], hp["attention"]) == ("both", 1, True)
    expert = make_clsr_expert(model, "uk", base)
    assert "model.decoder.layers.0.encoder_attn.q_proj.expert.lora_A" in expert.tensors
    assert "model.encoder.layers.1.self_attn.v_proj.gate.w2.weight" in expert.tensors
    assert expert.num_parameters == parameters_per_language(base.model.config, ClsrConfig(kind="lowrank", rank=4,
                                                                                               **ATTENTION))
    assert sorted(clsr_modules(expert)) == sorted(clsr_module_paths(model))
    fresh = convert_to_clsr(copy.deepcopy(base.model), **ATTENTION)
    assert load_clsr_expert(fresh, path, base) == "uk"
    set_language(model.eval(), "uk")
    set_language(fresh, "uk")
    assert torch.equal(logits(fresh), logits(model))
    # A model converted without the projections refuses it, naming the option to convert with.
    plain = convert_to_clsr(copy.deepcopy(base.model), side="both", encoder_start=1)
    with pytest.raises(ValueError, match="attention projections, but the CLSR model .*attention=True"):
        load_clsr_expert(plain, path, base)
    assert not clsr_projections(plain)


def test_projection_tensors_outside_the_recorded_layout_are_refused(base):
    expert = make_clsr_expert(_trained(base), "uk", base)
    manifest = copy.deepcopy(expert.manifest)
    manifest["hyperparameters"]["attention"] = False  # the tensors say otherwise
    tampered = Expert(expert.tensors, manifest)
    plain = convert_to_clsr(copy.deepcopy(base.model), side="both", encoder_start=1)
    with pytest.raises(ExpertFormatError, match="outside its recorded layout.*encoder_attn.out_proj.expert"):
        attach_clsr_expert(plain, tampered, base)
    assert not clsr_layers(plain)[0][1].experts  # nothing left behind


def test_the_bank_keeps_lora_experts_off_the_gated_projections(base):
    expert = make_clsr_expert(_trained(base), "uk", base)
    model = copy.deepcopy(base.model)
    bank = expert_bank(model)
    q = {m: s for m, s in linear_shapes(model, ("q_proj",)).items() if ".decoder.layers.0.self_attn" in m}
    bank.add("pt-lora", random_lora(q, 2, seed=6), {"alpha": 4.0}, ["pt"])
    with pytest.raises(ValueError, match="CLSR experts \\(uk-clsr\\) replace every fc1/fc2.*attention.*pt-lora adapts "
                                         "model.decoder.layers.0.self_attn.q_proj"):
        add_clsr_experts(bank, {"uk-clsr": expert}, base)
    assert not clsr_layers(model)  # refused before converting
    free = copy.deepcopy(base.model)
    bank = expert_bank(free)
    low = {m: s for m, s in linear_shapes(free, ("q_proj",)).items() if ".encoder.layers.0." in m}
    bank.add("pt-lora", random_lora(low, 2, seed=6), {"alpha": 4.0}, ["pt"])  # below encoder_start: free
    add_clsr_experts(bank, {"uk-clsr": expert}, base)
    assert len(clsr_projections(free)) == len(GATED)


def test_parameter_counts_follow_the_projections(base):
    config = base.model.config
    d, h, r = config.d_model, 64, 16
    plain, gated = ClsrConfig(kind="lowrank", side="decoder"), ClsrConfig(kind="lowrank", side="decoder",
                                                                          attention=True)
    per_projection = 2 * r * d + d * h + 2 * h
    assert parameters_per_language(config, gated) - parameters_per_language(config, plain) == \
        config.decoder_layers * 6 * per_projection
    assert parameters_active_per_token(config, gated) - parameters_active_per_token(config, plain) == \
        config.decoder_layers * 6 * per_projection
    model = convert_to_clsr(copy.deepcopy(base.model), ("uk",), kind="lowrank", side="decoder", attention=True)
    assert make_clsr_expert(model, "uk", base).num_parameters == parameters_per_language(config, gated)


def test_distill_refuses_attention_without_clsr():
    from trainers.configs import DistillConfig

    with pytest.raises(ValueError, match="--attention gates CLSR paths.*--kind lora"):
        DistillConfig(data="d", languages=("uk",), kind="lora", teachers=("uk-t",), attention=True)
    assert DistillConfig(data="d", languages=("uk",), path="lowrank", attention=True).clsr().attention


def test_gate_logs_name_the_projection():
    from trainers.clsr_module import short_layer

    assert short_layer("model.encoder.layers.3") == "enc.3"
    assert short_layer("model.decoder.layers.0.self_attn.q_proj") == "dec.0.self_attn.q_proj"
