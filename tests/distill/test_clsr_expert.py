"""CLSR experts as files: bit-exact round trips of one language, base checks, sizes from shapes."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from distill.clsr import (ClsrConfig, add_language, clsr_expert_tensors, clsr_languages, convert_to_clsr,
                          language_config, load_clsr_expert, make_clsr_expert, parameters_per_language,
                          save_clsr_expert, set_language)
from distill.clsr.expert import attach_clsr_expert
from registry.expert_file import Expert, ExpertFormatError, ExpertMismatchError, load_expert, read_manifest
from registry.fingerprint import weight_fingerprint
from tests.distill.clsr_helpers import logits, randomize_language
from tests.tiny import tiny_config

KINDS = [{"kind": "full"}, {"kind": "lowrank", "rank": 4, "alpha": 8.0}]


@pytest.fixture(scope="module")
def base(short_whisper):
    model = short_whisper
    return SimpleNamespace(name="tiny-whisper", fingerprint=weight_fingerprint(model), tokenizer_fingerprint="tok-0",
                           model=model)


def _clsr(base, languages=()):
    return convert_to_clsr(copy.deepcopy(base.model), languages)


def _trained(base, options, language="uk"):
    model = _clsr(base, ("pt",))
    add_language(model, language, **options)
    randomize_language(model, language)
    return model


@pytest.mark.parametrize("options", KINDS, ids=["full", "lowrank"])
def test_save_load_round_trip_is_bit_exact(base, tmp_path, options):
    model = _trained(base, options)
    path = save_clsr_expert(model, "uk", tmp_path / "uk.safetensors", base, data={"utterances": 3})
    manifest = read_manifest(path)
    assert manifest["kind"] == "clsr" and manifest["languages"] == ["uk"]
    assert manifest["base"]["fingerprint"] == base.fingerprint
    assert manifest["hyperparameters"]["path"] == options["kind"]
    assert manifest["hyperparameters"]["layers"] == 4
    stored = load_expert(path)
    assert all(".uk." not in name and name.startswith("model.") for name in stored.tensors)

    fresh = _clsr(base)
    assert load_clsr_expert(fresh, path, base) == "uk"
    original, loaded = clsr_expert_tensors(model, "uk"), clsr_expert_tensors(fresh, "uk")
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert language_config(fresh, "uk") == language_config(model, "uk")
    set_language(model, "uk")
    set_language(fresh, "uk")
    assert torch.equal(logits(fresh), logits(model))
    assert not any(p.requires_grad for n, p in fresh.named_parameters())  # loaded for inference


def test_expert_holds_exactly_one_language(base):
    model = _trained(base, {"kind": "full"})
    expert = make_clsr_expert(model, "uk", base)
    pt = clsr_expert_tensors(model, "pt")
    assert expert.tensors.keys() == pt.keys()
    assert not any(torch.equal(expert.tensors[k], pt[k]) for k in pt if k.endswith("w2.weight"))
    assert expert.num_parameters == parameters_per_language(base.model.config, ClsrConfig(kind="full"))


def test_loading_under_another_name_and_trainable(base):
    model = _trained(base, {"kind": "lowrank", "rank": 2})
    fresh = _clsr(base, ("uk",))
    attach_clsr_expert(fresh, make_clsr_expert(model, "uk", base), base, language="uk2", trainable=True)
    assert clsr_languages(fresh) == ["uk", "uk2"]
    assert all(p.requires_grad for n, p in fresh.named_parameters() if ".uk2." in n)


def test_mismatched_base_is_refused_unless_forced(base):
    expert = make_clsr_expert(_trained(base, {"kind": "full"}), "uk", base)
    other = SimpleNamespace(name="other", fingerprint="0" * 16, tokenizer_fingerprint=base.tokenizer_fingerprint)
    fresh = _clsr(base)
    with pytest.raises(ExpertMismatchError, match="fingerprint"):
        attach_clsr_expert(fresh, expert, other)
    assert clsr_languages(fresh) == []
    attach_clsr_expert(fresh, expert, other, force=True)
    assert clsr_languages(fresh) == ["uk"]
    other_tokenizer = SimpleNamespace(name="x", fingerprint=base.fingerprint, tokenizer_fingerprint="tok-1")
    with pytest.raises(ExpertMismatchError, match="tokenizer"):
        attach_clsr_expert(_clsr(base), expert, other_tokenizer, force=True)


def test_wrong_files_are_refused_and_leave_the_model_clean(base):
    expert = make_clsr_expert(_trained(base, {"kind": "full"}), "uk", base)
    fresh = _clsr(base)
    lora = Expert(expert.tensors, {**expert.manifest, "kind": "lora"})
    with pytest.raises(ExpertFormatError, match="not a 'clsr' expert"):
        attach_clsr_expert(fresh, lora, base)
    missing = Expert({k: v for k, v in expert.tensors.items() if ".decoder.layers.1." not in k}, expert.manifest)
    with pytest.raises(ValueError, match="model.decoder.layers.1"):
        attach_clsr_expert(fresh, missing, base)
    renamed = Expert({k.replace("w2.weight", "w3.weight"): v for k, v in expert.tensors.items()}, expert.manifest)
    with pytest.raises(ExpertFormatError, match="w3.weight"):
        attach_clsr_expert(fresh, renamed, base)
    assert clsr_languages(fresh) == []

    wider = convert_to_clsr(WhisperForConditionalGeneration(tiny_config(d_model=32)).eval(), ())
    with pytest.raises(ValueError, match="shape"):
        attach_clsr_expert(wider, expert, base)
    assert clsr_languages(wider) == []


def test_parameters_per_language_for_whisper_base_shapes():
    whisper_base = WhisperConfig(d_model=512, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048,
                                 decoder_ffn_dim=2048)
    gate = 512 * 64 + 64 + 64
    full = parameters_per_language(whisper_base, ClsrConfig(kind="full"))
    assert full == 12 * (2 * 512 * 2048 + 2048 + 512 + gate)
    for rank in (16, 32):
        low = parameters_per_language(whisper_base, ClsrConfig(kind="lowrank", rank=rank))
        assert low == 12 * (2 * rank * (512 + 2048) + gate)
