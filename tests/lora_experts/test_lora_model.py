"""LoRA experts on Whisper: attach/extract round trips, zero-init parity, removal, PEFT interop."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from lora_experts.config import LoraExpertConfig
from lora_experts.model import (add_trainable_expert, attach_expert, expert_tensors, remove_experts,
                                set_active_expert)
from lora_experts.peft_format import read_peft_adapter, write_peft_adapter
from tests.lora_experts.random_experts import peft_random_expert

FEATS = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[50258, 50280, 50359, 50363, 400, 500], [50258, 50261, 50359, 50363, 600, 700]])


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_features=FEATS, decoder_input_ids=IDS).logits


@pytest.fixture()
def model(tiny_whisper):
    return copy.deepcopy(tiny_whisper[0])


def _random_expert(model, config=LoraExpertConfig(rank=4, alpha=8, side="both"), seed=1):
    return peft_random_expert(model, config, seed)


def test_fresh_expert_is_an_identity_and_only_lora_trains(model):
    before = _logits(model)
    modules = add_trainable_expert(model, LoraExpertConfig(rank=4))
    assert modules and all(".decoder." in m for m in modules)
    assert any("encoder_attn.q_proj" in m for m in modules) and any(m.endswith("fc2") for m in modules)
    assert not any("encoder_attn.k_proj" in m for m in modules)  # opt-in: cross_attention_kv
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("config", [LoraExpertConfig(rank=2, target_modules=("q_proj", "v_proj")),
                                    LoraExpertConfig(rank=4, side="encoder", target_modules=("fc1",)),
                                    LoraExpertConfig(rank=8, side="both", cross_attention=False),
                                    LoraExpertConfig(rank=2, cross_attention_kv=True)])
def test_targets_follow_the_config(model, config):
    modules = add_trainable_expert(model, config)
    for m in modules:
        assert m.rsplit(".", 1)[-1] in config.target_modules
        assert (".encoder." in m) == (config.side == "encoder") or config.side == "both"
        assert config.cross_attention or "encoder_attn" not in m
        assert config.cross_attention_kv or not any(f"encoder_attn.{p}" in m for p in ("k_proj", "v_proj"))


def test_attach_extract_roundtrip_and_exact_removal(model):
    base = _logits(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, hyper = _random_expert(model)
    attach_expert(model, tensors, hyper, "uk")
    out = expert_tensors(model, "uk")
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in tensors)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base)
    # The expert is exactly W + (alpha / r) B A on each adapted layer: merge by hand and compare.
    merged = copy.deepcopy(model)
    remove_experts(merged)
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith("lora_A")]:
            module = key[: -len(".lora_A")]
            layer = merged.get_submodule(module)
            layer.weight += (hyper["alpha"] / hyper["rank"]) * tensors[f"{module}.lora_B"] @ tensors[key]
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-4, atol=1e-4)
    set_active_expert(model, None)
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    remove_experts(model)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_two_experts_switch(model):
    a, hyper = _random_expert(model, seed=1)
    b, _ = _random_expert(model, seed=2)
    attach_expert(model, a, hyper, "a")
    la = _logits(model)
    attach_expert(model, b, hyper, "b")
    lb = _logits(model)
    set_active_expert(model, "a")
    torch.testing.assert_close(_logits(model), la, rtol=0, atol=0)
    assert not torch.allclose(la, lb)


def test_peft_export_loads_in_plain_peft_with_identical_logits(model, tmp_path):
    tensors, hyper = _random_expert(model)
    write_peft_adapter(tensors, hyper, tmp_path / "peft", "tiny-whisper")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    # task_type SEQ_2_SEQ_LM makes this PEFT's seq2seq wrapper: its generate() takes Whisper's input_features,
    # its forward() would add input_ids that Whisper refuses, so logits come from the adapted model it wraps
    assert type(reference).__name__ == "PeftModelForSeq2SeqLM"
    with torch.no_grad():
        theirs = reference.get_base_model()(input_features=FEATS, decoder_input_ids=IDS).logits
        assert reference.generate(input_features=FEATS[:1], max_new_tokens=3).shape == (1, 3)
    attach_expert(model, tensors, hyper)
    torch.testing.assert_close(_logits(model), theirs, rtol=0, atol=1e-6)
    back, hyper_back = read_peft_adapter(tmp_path / "peft")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert hyper_back["alpha"] == hyper["alpha"] and hyper_back["rank"] == hyper["rank"]


def test_expert_for_another_model_size_is_refused(model):
    tensors = {"model.decoder.layers.7.fc1.lora_A": torch.zeros(2, 64),
               "model.decoder.layers.7.fc1.lora_B": torch.zeros(128, 2)}
    with pytest.raises(ValueError, match="different Whisper size"):
        attach_expert(model, tensors, {"alpha": 4})
    with pytest.raises(ValueError, match="without their lora_A|missing"):
        attach_expert(model, {"model.decoder.layers.0.fc1.lora_B": torch.zeros(128, 2)}, {"alpha": 4})


def test_adapter_names_that_collide_are_refused(model):
    with pytest.raises(ValueError, match="invalid expert adapter name 'train'"):
        add_trainable_expert(model, LoraExpertConfig(rank=2), "train")
