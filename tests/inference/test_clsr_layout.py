"""Where CLSR blocks go (``side``, ``encoder_start``): untouched layers stay the base's modules, gate init is still
the base exactly, experts record their layout and are refused by a model of another layout, the bank converts
with the experts' layout and leaves fc1/fc2 outside it free for LoRA experts; a teacher loads a decoder-only
expert with its layout."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import WhisperConfig

from distill.clsr import (ClsrConfig, add_language, attach_clsr_expert, clsr_languages, clsr_layers, collect_gates,
                          convert_from_clsr, convert_to_clsr, load_clsr_expert, make_clsr_expert,
                          parameters_active_per_token, parameters_per_language, save_clsr_expert, set_language)
from distill.clsr.layer import ClsrFc1
from inference.bank import expert_bank
from inference.clsr_bank import add_clsr_experts
from registry.expert_file import read_manifest
from registry.fingerprint import weight_fingerprint
from tests.distill.clsr_helpers import logits, randomize_language
from tests.lora_experts.random_experts import linear_shapes, random_lora

DETERMINISTIC = {"path_dropout": 0.0, "gate_dropout": 0.0, "shared_only_prob": 0.0}
LAYOUTS = {"decoder": {"side": "decoder"}, "encoder-from-1": {"side": "both", "encoder_start": 1},
           "encoder": {"side": "encoder"}}
CONVERTED = {"decoder": ["model.decoder.layers.0", "model.decoder.layers.1"],
             "encoder-from-1": ["model.encoder.layers.1", "model.decoder.layers.0", "model.decoder.layers.1"],
             "encoder": ["model.encoder.layers.0", "model.encoder.layers.1"]}


@pytest.fixture(scope="module")
def base(short_whisper):
    return SimpleNamespace(name="tiny-whisper", fingerprint=weight_fingerprint(short_whisper),
                           tokenizer_fingerprint="tok-0", model=short_whisper)


def _trained(base, language="uk", **layout):
    model = convert_to_clsr(copy.deepcopy(base.model), (language,), **layout)
    randomize_language(model, language)
    return model


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_only_the_layout_is_converted_and_gate_init_is_the_base_exactly(base, layout, mode):
    model = convert_to_clsr(copy.deepcopy(base.model), ("uk",), **LAYOUTS[layout], **DETERMINISTIC)
    assert [name for name, _, _ in clsr_layers(model)] == CONVERTED[layout]
    converted = set(CONVERTED[layout])
    for name, module in base.model.named_modules():  # every other module is the base's, with its weights
        if not any(name.startswith(f"{layer}.fc") for layer in converted):
            mine = model.get_submodule(name)
            assert type(mine) is type(module)
            assert all(torch.equal(p, q) for p, q in zip(mine.parameters(recurse=False),
                                                         module.parameters(recurse=False)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(n.startswith(f"{layer}.fc") for layer in converted) for n in trainable)
    set_language(model, "uk")
    model.train(mode == "train")
    with collect_gates(model) as gates:
        out = logits(model)
    assert torch.equal(out, logits(base.model))
    assert sorted({layer for layer, _ in gates.records}) == sorted(converted)
    convert_from_clsr(model)
    assert not any(isinstance(m, ClsrFc1) for m in model.modules())


def test_bad_layouts_are_refused(base):
    with pytest.raises(ValueError, match="side must be one of"):
        ClsrConfig(side="cross")
    with pytest.raises(ValueError, match="encoder_start 2: the encoder has layers 0..1"):
        convert_to_clsr(copy.deepcopy(base.model), side="both", encoder_start=2)
    convert_to_clsr(copy.deepcopy(base.model), side="decoder", encoder_start=2)  # ignored without encoder layers
    model = convert_to_clsr(copy.deepcopy(base.model), side="decoder")
    with pytest.raises(ValueError, match="a model has one layout"):
        add_language(model, "uk", side="both")
    add_language(model, "uk", side="decoder", kind="lowrank", rank=2)
    assert clsr_languages(model) == ["uk"]


def test_a_negative_encoder_start_counts_from_the_top_and_is_recorded_resolved(base, tmp_path):
    model = _trained(base, side="both", encoder_start=-1)  # the tiny encoder has layers 0..1
    assert [name for name, _, _ in clsr_layers(model)] == CONVERTED["encoder-from-1"]
    hp = read_manifest(save_clsr_expert(model, "uk", tmp_path / "uk.safetensors", base))["hyperparameters"]
    assert (hp["side"], hp["encoder_start"]) == ("both", 1)
    top = ClsrConfig(side="both", encoder_start=-5)  # more than the encoder has: all of it
    assert top.for_encoder(2).encoder_start == 0
    assert parameters_active_per_token(base.model.config, ClsrConfig(side="both", encoder_start=-1)) == \
        parameters_active_per_token(base.model.config, ClsrConfig(side="both", encoder_start=1))


@pytest.mark.parametrize("layout", ["decoder", "encoder-from-1"])
def test_expert_round_trip_records_the_layout(base, tmp_path, layout):
    model = _trained(base, **LAYOUTS[layout])
    path = save_clsr_expert(model, "uk", tmp_path / "uk.safetensors", base)
    hp = read_manifest(path)["hyperparameters"]
    expected = ClsrConfig(**LAYOUTS[layout]).layout
    assert {k: hp[k] for k in expected} == expected
    assert hp["layers"] == len(CONVERTED[layout])
    expert = make_clsr_expert(model, "uk", base)
    assert expert.num_parameters == parameters_per_language(base.model.config, ClsrConfig(**LAYOUTS[layout]))
    fresh = convert_to_clsr(copy.deepcopy(base.model), **LAYOUTS[layout])
    assert load_clsr_expert(fresh, path, base) == "uk"
    set_language(model.eval(), "uk")
    set_language(fresh, "uk")
    assert torch.equal(logits(fresh), logits(model))


def test_an_expert_is_refused_by_a_model_of_another_layout(base, tmp_path):
    decoder_only = save_clsr_expert(_trained(base, side="decoder"), "uk", tmp_path / "uk.safetensors", base)
    full = make_clsr_expert(_trained(base), "uk", base)
    both = convert_to_clsr(copy.deepcopy(base.model))
    with pytest.raises(ValueError, match="layout side decoder, but the CLSR model was converted with layout side "
                                         "both, encoder_start 0.*side='decoder'"):
        load_clsr_expert(both, decoder_only, base)
    decoder = convert_to_clsr(copy.deepcopy(base.model), side="decoder")
    with pytest.raises(ValueError, match="layout side both, encoder_start 0, but .* side decoder"):
        attach_clsr_expert(decoder, full, base)
    assert clsr_languages(both) == [] and clsr_languages(decoder) == []


def test_bank_converts_with_the_experts_layout_and_leaves_other_ffns_to_lora(base):
    trained = _trained(base, side="decoder")
    expert = make_clsr_expert(trained, "uk", base)
    model = copy.deepcopy(base.model)
    bank = expert_bank(model)
    fc = {m: s for m, s in linear_shapes(model, ("fc1", "fc2")).items() if ".encoder." in m}
    bank.add("pt-lora", random_lora(fc, 2, seed=6), {"alpha": 4.0}, ["pt"])  # encoder fc1/fc2: not CLSR's
    add_clsr_experts(bank, {"uk-clsr": expert}, base)
    assert [name for name, _, _ in clsr_layers(model)] == CONVERTED["decoder"]
    assert all(m.startswith("model.decoder.") for m in bank.experts[1].modules)
    with bank.route("uk-clsr"):
        routed = logits(model)
    set_language(trained.eval(), "uk")
    torch.testing.assert_close(routed, logits(trained), rtol=1e-5, atol=1e-5)
    other = make_clsr_expert(_trained(base, "pt"), "pt", base)
    with pytest.raises(ValueError, match="different layouts"):
        add_clsr_experts(expert_bank(copy.deepcopy(base.model)), {"uk-clsr": expert, "pt-clsr": other}, base)


def test_parameters_per_language_and_per_token_follow_the_layout():
    whisper_base = WhisperConfig(d_model=512, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048,
                                 decoder_ffn_dim=2048)
    gate = 512 * 64 + 64 + 64
    full_path = 2 * 512 * 2048 + 2048 + 512
    assert parameters_per_language(whisper_base, ClsrConfig(side="decoder")) == 6 * (full_path + gate)
    assert parameters_per_language(whisper_base, ClsrConfig(encoder_start=4)) == 8 * (full_path + gate)
    assert parameters_active_per_token(whisper_base, ClsrConfig(side="decoder")) == 6 * gate
    low = ClsrConfig(kind="lowrank", rank=16, side="decoder")
    assert parameters_active_per_token(whisper_base, low) == 6 * (gate + 2 * 16 * (512 + 2048))


def test_a_teacher_with_a_decoder_only_clsr_expert(tiny_whisper_dir, tmp_path):
    from distill.teachers import load_teachers
    from registry.bases import load_base

    base = load_base(str(tiny_whisper_dir), device="cpu")
    trained = _trained(base, side="decoder")
    path = save_clsr_expert(trained, "uk", tmp_path / "uk.safetensors", base)
    teacher = load_teachers(f"{tiny_whisper_dir}+{path}", base).teachers[0]
    assert [name for name, _, _ in clsr_layers(teacher.model)] == CONVERTED["decoder"]
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[50258, 50280, 50359, 50363, 400]])
    set_language(trained.eval(), "uk")
    assert torch.equal(teacher.logits(feats, ids, "uk"), logits(trained, feats, ids))
