"""Soft inference gates (``set_gate_mode(model, "soft")``): every token mixes both paths by ``sigmoid(G)``.

At inference they equal training's mix with the randomness off (no noise, no dropouts, no shared-only draws), for
FFN blocks and gated attention projections, in one language or a mixed batch; at gate init (``G = 0``) a block
mixes half of its language path, where hard gates (``1[0 >= 0]``) take all of it; generation runs with them; hard stays
the default, and an unknown mode is refused. The mode is per language (a mixed batch may mix modes) and travels
in the expert file (``gate_inference``), which loading applies."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from distill.clsr import (ClsrConfig, add_language, attach_clsr_expert, clsr_layers, clsr_routing, collect_gates,
                          convert_to_clsr, make_clsr_expert, set_gate_mode, set_language)
from distill.clsr.layer import LowRankPath
from registry.fingerprint import weight_fingerprint
from tests.distill.clsr_helpers import FEATS3, IDS3, logits, randomize_language

DETERMINISTIC = {"path_dropout": 0.0, "gate_dropout": 0.0, "shared_only_prob": 0.0}
LAYOUTS = [{"kind": "lowrank", "rank": 4}, {"kind": "full"},
           {"kind": "lowrank", "rank": 4, "side": "both", "encoder_start": 1, "attention": True}]


def _model(base, layout, languages=("uk",)):
    model = convert_to_clsr(copy.deepcopy(base), languages, **layout, **DETERMINISTIC)
    for seed, language in enumerate(languages, start=1):
        randomize_language(model, language, seed=seed)
    return model


def _assert_mixed_batch_equals_each_alone(model, languages) -> None:
    """The three samples in one batch, sample i routed to ``languages[i]``, equal each sample run alone."""
    set_language(model, languages)
    mixed = logits(model, FEATS3, IDS3)
    for i, language in enumerate(languages):
        set_language(model, language)
        torch.testing.assert_close(mixed[i:i + 1], logits(model, FEATS3[i:i + 1], IDS3[i:i + 1]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["lowrank", "full", "lowrank-attention"])
def test_soft_inference_is_the_training_mix_without_randomness(short_whisper, layout):
    model = _model(short_whisper, layout)
    set_language(model, "uk")
    model.train()  # noise scale 0 and the dropouts off: the training mix is deterministic
    trained_mix = logits(model)
    model.eval()
    hard = logits(model)
    set_gate_mode(model, "soft")
    with collect_gates(model) as gates:
        soft = logits(model)
    torch.testing.assert_close(soft, trained_mix, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(soft, hard, atol=1e-4)  # the randomized gates are neither all 0 nor all 1
    values = torch.cat([g.reshape(-1) for g in gates.values])
    assert ((values > 0) & (values < 1)).all()  # recorded gates are sigmoid(G), not 0/1


def test_soft_gates_at_init_mix_half_of_the_language_path(short_whisper):
    """At ``G = 0`` a hard gate (``1[0 >= 0]``) takes the language path whole; a soft gate (``sigmoid(0)``) mixes
    half of it, as training does on average while the gates stay near 0."""
    model = convert_to_clsr(copy.deepcopy(short_whisper), ("uk",), kind="lowrank", rank=4, **DETERMINISTIC)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LowRankPath):
                module.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    set_language(model, "uk")
    model.eval()
    _, fc1, fc2 = clsr_layers(model)[0]
    x = torch.randn(2, 7, fc1.in_features, generator=torch.Generator().manual_seed(3))
    act = torch.nn.functional.gelu
    with torch.no_grad():
        shared = fc2.shared(act(fc1.shared(x)))
        lang = fc2.experts["uk"].language_linear(act(fc1.experts["uk"].language_linear(x, fc1.shared)), fc2.shared)
        hard = fc2(act(fc1(x)))
        set_gate_mode(model, "soft")
        soft = fc2(act(fc1(x)))
    torch.testing.assert_close(hard, lang, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(soft, 0.5 * lang + 0.5 * shared, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(soft, hard, atol=1e-4)


def test_soft_gates_route_a_mixed_batch_and_generate(short_whisper):
    model = _model(short_whisper, LAYOUTS[2], languages=("uk", "pt"))
    model.eval()
    set_gate_mode(model, "soft")
    languages = ["uk", None, "pt"]
    _assert_mixed_batch_equals_each_alone(model, languages)
    set_language(model, languages)
    with torch.no_grad():
        out = model.generate(input_features=FEATS3, decoder_input_ids=IDS3[:, :4], max_new_tokens=3, num_beams=2)
    assert out.shape[0] == 3


def test_hard_is_the_default_and_unknown_modes_are_refused(short_whisper):
    model = _model(short_whisper, LAYOUTS[0])
    set_language(model, "uk")
    model.eval()
    with collect_gates(model) as gates:
        logits(model)
    assert all(torch.all((g == 0) | (g == 1)) for g in gates.values)
    with pytest.raises(ValueError, match="unknown CLSR gate mode 'sometimes'.*hard, soft"):
        set_gate_mode(model, "sometimes")


def test_gate_modes_are_per_language_and_a_mixed_batch_may_mix_them(short_whisper):
    """uk with soft gates and pt with hard ones in one batch: each row equals its language alone in its own mode
    (inside a mixing call a hard gate mixes by 1[G >= 0], which takes the one path exactly)."""
    model = _model(short_whisper, LAYOUTS[2], languages=("uk", "pt"))
    model.eval()
    set_gate_mode(model, "soft", "uk")
    assert clsr_routing(model).gate_modes == {"uk": "soft", "pt": "hard"}
    _assert_mixed_batch_equals_each_alone(model, ["uk", "pt", None])
    set_language(model, "pt")
    hard_pt = logits(model, FEATS3[1:2], IDS3[1:2])
    set_gate_mode(model, "soft")  # every language, and those added later
    assert not torch.allclose(logits(model, FEATS3[1:2], IDS3[1:2]), hard_pt, atol=1e-4)
    add_language(model, "de")
    assert clsr_routing(model).gate_mode("de") == "soft"
    with pytest.raises(KeyError, match="no CLSR language 'fr'"):
        set_gate_mode(model, "hard", ["fr"])


def test_an_expert_records_its_gate_mode_and_loading_applies_it(short_whisper):
    """``gate_inference`` travels in the expert's manifest: a model converted with soft gates writes it, loading
    the file gives the language soft gates again (same output), an old manifest without it loads hard, and an
    unknown mode is refused."""
    base = SimpleNamespace(name="tiny-whisper", fingerprint=weight_fingerprint(short_whisper),
                           tokenizer_fingerprint="tok-0")
    trained = _model(short_whisper, {**LAYOUTS[0], "gate_inference": "soft"})
    expert = make_clsr_expert(trained, "uk", base)
    assert expert.manifest["hyperparameters"]["gate_inference"] == "soft"
    trained.eval()
    set_language(trained, "uk")
    want = logits(trained)
    fresh = convert_to_clsr(copy.deepcopy(short_whisper), (), **LAYOUTS[0])  # the model's default stays hard
    attach_clsr_expert(fresh, expert, base)
    assert clsr_routing(fresh).gate_mode("uk") == "soft"
    fresh.eval()
    set_language(fresh, "uk")
    torch.testing.assert_close(logits(fresh), want, rtol=1e-6, atol=1e-6)
    old = copy.deepcopy(expert)
    del old.manifest["hyperparameters"]["gate_inference"]
    attach_clsr_expert(fresh, old, base, language="uk_old")
    assert clsr_routing(fresh).gate_mode("uk_old") == "hard"
    old.manifest["hyperparameters"]["gate_inference"] = "sometimes"
    with pytest.raises(ValueError, match="unknown CLSR gate mode 'sometimes'"):
        attach_clsr_expert(fresh, old, base, language="uk_bad")
    with pytest.raises(ValueError, match="unknown CLSR gate mode 'sometimes'"):
        ClsrConfig(gate_inference="sometimes")
