"""CLSR Whisper: parity at gate init, hard gates selecting one path, per-token and per-sample routing, round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from distill.clsr import (ClsrConfig, add_language, clsr_languages, clsr_layers, collect_gates, convert_from_clsr,
                          convert_to_clsr, language_parameters, noise_scale_at, ramp_at, remove_language,
                          set_language, set_noise_scale, set_warmup)
from distill.clsr.layer import FullPath
from tests.distill.clsr_helpers import (FEATS, FEATS3, IDS, IDS3, force_gates, language_ffn_model, logits,
                                        randomize_language)

KINDS = [{"kind": "full"}, {"kind": "lowrank", "rank": 4}]
DETERMINISTIC = {"path_dropout": 0.0, "gate_dropout": 0.0, "shared_only_prob": 0.0}  # training without randomness


@pytest.fixture(scope="module")
def base(short_whisper):
    return short_whisper


@pytest.fixture(scope="module")
def base_logits(base):
    return logits(base)


def _clsr(base, languages=("uk",), **options):
    return convert_to_clsr(copy.deepcopy(base), languages, **options)


@pytest.mark.parametrize("options", KINDS, ids=["full", "lowrank"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gate_init_gives_the_base_output_exactly(base, base_logits, options, mode):
    model = _clsr(base, ("uk", "pt"), **options, **DETERMINISTIC)
    set_language(model, "uk")
    model.train(mode == "train")
    with collect_gates(model) as gates:
        out = logits(model)
    assert torch.equal(out, base_logits)
    assert len(gates.records) == 4  # 2 encoder + 2 decoder layers each used a gate
    expected = 1.0 if mode == "eval" else 0.5  # G = 0: hard gate 1[0 >= 0], soft gate sigmoid(0)
    assert all(torch.all(g == expected) for g in gates.values)


def test_training_defaults_at_init_still_match_the_base_without_path_dropout(base, base_logits):
    # shared-only draws change nothing while the language path equals the shared path ...
    model = _clsr(base, path_dropout=0.0)
    set_language(model, "uk")
    model.train()
    torch.manual_seed(0)
    assert torch.equal(logits(model), base_logits)
    set_noise_scale(model, 5.0)  # ... nor do noisy gates, up to the rounding of g * a + (1 - g) * a
    torch.testing.assert_close(logits(model), base_logits, rtol=1e-5, atol=1e-5)
    model_dropout = _clsr(base)  # path dropout 0.3 does perturb the language path in training
    set_language(model_dropout, "uk")
    model_dropout.train()
    assert not torch.equal(logits(model_dropout), base_logits)


def test_path_dropout_on_the_delta_leaves_the_shared_part_of_a_lowrank_path_clean(base, base_logits):
    noisy = {"kind": "lowrank", "rank": 4, "path_dropout": 0.5, "gate_dropout": 0.0, "shared_only_prob": 0.0}
    outputs = {}
    for target in ("output", "delta"):
        model = _clsr(base, **noisy, path_dropout_on=target)  # fresh paths: the delta is zero (lora_B = 0)
        set_language(model, "uk")
        model.train()
        force_gates(model, "uk", open_=True)  # every token on the language path
        torch.manual_seed(0)
        outputs[target] = logits(model)
    assert torch.equal(outputs["delta"], base_logits)  # nothing but the zero delta is dropped
    assert not torch.allclose(outputs["output"], base_logits)  # the whole path output, shared part included
    with pytest.raises(ValueError, match="needs low-rank paths.*--path lowrank"):
        ClsrConfig(kind="full", path_dropout_on="delta")
    with pytest.raises(ValueError, match="path_dropout_on must be one of output, delta"):
        ClsrConfig(kind="lowrank", path_dropout_on="input")


@pytest.mark.parametrize("options", KINDS, ids=["full", "lowrank"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forced_gates_select_exactly_one_path(base, base_logits, options, mode):
    model = _clsr(base, **options, **DETERMINISTIC)
    randomize_language(model, "uk")
    set_language(model, "uk")
    model.train(mode == "train")
    force_gates(model, "uk", open_=False)
    assert torch.equal(logits(model), base_logits)
    force_gates(model, "uk", open_=True)
    out = logits(model)
    assert not torch.allclose(out, base_logits)
    reference = logits(language_ffn_model(base, model, "uk"))
    if options["kind"] == "full":
        assert torch.equal(out, reference)
    else:  # W x + B A x versus (W + B A) x: equal up to rounding
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_hard_gates_route_each_token_and_skip_the_unused_path(base, monkeypatch):
    model = _clsr(base)
    randomize_language(model, "uk")
    set_language(model, "uk")
    name, fc1, fc2 = clsr_layers(model)[0]
    x = torch.randn(2, 7, fc1.in_features, generator=torch.Generator().manual_seed(3))
    act = torch.nn.functional.gelu
    rows = []
    original = FullPath.language_linear

    def counting(self, x, *args, **kwargs):
        rows.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(FullPath, "language_linear", counting)
    with torch.no_grad(), collect_gates(model) as gates:
        out = fc2(act(fc1(x)))
    opened = gates.values[0].reshape(2, 7, 1).bool()
    assert 0 < int(opened.sum()) < 14, "the test needs a mix of open and closed gates"
    assert rows == [int(opened.sum())] * 2  # the language path ran on the open tokens only, in fc1 and fc2
    with torch.no_grad():
        shared = fc2.shared(act(fc1.shared(x)))
        lang = fc2.experts["uk"](act(fc1.experts["uk"](x)))
    torch.testing.assert_close(out, torch.where(opened, lang, shared), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_per_sample_languages_equal_each_sample_alone(base, mode):
    model = _clsr(base, ("uk", "pt"), **DETERMINISTIC)
    randomize_language(model, "uk", seed=1)
    randomize_language(model, "pt", seed=2)
    model.train(mode == "train")
    languages = ["uk", None, "pt"]
    set_language(model, languages)
    mixed = logits(model, FEATS3, IDS3)
    for i, language in enumerate(languages):
        set_language(model, language)
        alone = logits(model, FEATS3[i:i + 1], IDS3[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        if language is not None:  # the sample really used its own language
            set_language(model, "pt" if language == "uk" else "uk")
            assert not torch.allclose(mixed[i], logits(model, FEATS3[i:i + 1], IDS3[i:i + 1])[0], atol=1e-4)


def test_generate_on_a_clsr_model_with_per_sample_languages_and_beams(base):
    model = _clsr(base, ("uk", "pt"))
    randomize_language(model, "uk", seed=1, scale=0.5)
    randomize_language(model, "pt", seed=2, scale=0.5)
    kwargs = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False}
    languages = ["uk", "pt"]
    set_language(model, languages)
    batch = model.generate(FEATS, **kwargs)
    for i, language in enumerate(languages):
        set_language(model, language)
        alone = model.generate(FEATS[i:i + 1], **kwargs)
        assert torch.equal(batch[i:i + 1, :alone.shape[1]], alone)


def test_translate_and_no_language_use_the_shared_path_only(base, base_logits):
    model = _clsr(base)
    randomize_language(model, "uk")
    force_gates(model, "uk", open_=True)
    set_language(model, "uk", task="translate")
    with collect_gates(model) as gates:
        assert torch.equal(logits(model), base_logits)
    assert gates.records == []
    set_language(model, None)
    assert torch.equal(logits(model), base_logits)


def test_shared_only_draw_skips_gates_in_training(base):
    model = _clsr(base, shared_only_prob=0.2)
    set_language(model, "uk")
    model.train()
    fc1 = clsr_layers(model)[0][1]
    x = torch.randn(1, 3, fc1.in_features)
    torch.manual_seed(0)
    with collect_gates(model) as gates:
        widths = [fc1(x).shape[-1] for _ in range(500)]
    shared_only = widths.count(fc1.out_features)  # soft calls return both paths: 2 * ffn_dim wide
    assert 0.15 * 500 < shared_only < 0.25 * 500
    assert len(gates.records) == 500 - shared_only


def test_noise_ramp_and_noisy_gates(base):
    assert [noise_scale_at(s, 100) for s in (0, 50, 100, 200)] == [0.0, 2.5, 5.0, 5.0]
    model = _clsr(base, **DETERMINISTIC)
    set_language(model, "uk")
    model.train()
    set_noise_scale(model, 5.0)
    with collect_gates(model) as gates:
        logits(model, FEATS[:1], IDS[:1])
    g = torch.cat(gates.values)
    assert g.min() < 0.1 and g.max() > 0.9  # sigmoid(0 + 5 * noise) spreads towards 0 and 1
    with pytest.raises(ValueError):
        set_noise_scale(model, -1.0)


def test_warmup_ramp_values():
    assert [ramp_at(s, 100, 0.5) for s in (0, 25, 50, 80)] == [0.0, 0.5, 1.0, 1.0]
    assert ramp_at(0, 100, 0.0) == 1.0 and ramp_at(0, 0, 0.5) == 1.0  # no warm-up: the full value at once
    with pytest.raises(ValueError):
        ramp_at(0, 100, 1.5)


@pytest.mark.parametrize("options", KINDS, ids=["full", "lowrank"])
def test_gate_floor_holds_training_gates_open_and_stops_their_gradient(base, options):
    model = _clsr(base, **options, **DETERMINISTIC)
    randomize_language(model, "uk")
    set_language(model, "uk")
    model.train()
    opened = copy.deepcopy(model)
    force_gates(opened, "uk", True)
    set_warmup(model, gate_floor=1.0)
    with collect_gates(model) as gates:
        out = model(input_features=FEATS[:1], decoder_input_ids=IDS[:1]).logits
    # every token on its language path, as with the gates forced open; the records are the learned gates
    torch.testing.assert_close(out, logits(opened, FEATS[:1], IDS[:1]))
    assert any(torch.any(g < 1.0) for g in gates.values)
    out.square().mean().backward()
    params = language_parameters(model, "uk")
    gate_grads = [p.grad for k, p in params.items() if "gate" in k]
    path_grads = [p.grad for k, p in params.items() if "gate" not in k]
    assert gate_grads and all(g is None or not g.any() for g in gate_grads)  # the CE side cannot move them ...
    assert any(g is not None and g.any() for g in path_grads)
    model.zero_grad()
    with collect_gates(model) as gates:
        model(input_features=FEATS[:1], decoder_input_ids=IDS[:1])
    torch.cat(gates.values).mean().backward()  # ... the budget on the learned gates still does
    assert any(p.grad is not None and p.grad.any() for k, p in params.items() if "gate" in k)
    model.eval()  # inference's hard gates ignore the floor
    with torch.no_grad(), collect_gates(model) as gates:
        logits(model, FEATS[:1], IDS[:1])
    assert all(torch.all((g == 0.0) | (g == 1.0)) for g in gates.values)
    with pytest.raises(ValueError):
        set_warmup(model, gate_floor=1.5)


def test_path_dropout_scale_zero_turns_path_dropout_off(base, base_logits):
    model = _clsr(base, gate_dropout=0.0, shared_only_prob=0.0)  # path dropout 0.3, the recipe's
    set_language(model, "uk")
    model.train()
    set_warmup(model, path_dropout_scale=0.0)
    assert torch.equal(logits(model), base_logits)  # at init the path equals the shared FFN: only dropout differs
    set_warmup(model, path_dropout_scale=1.0)
    assert not torch.equal(logits(model), base_logits)


def test_only_language_parameters_are_trainable_and_get_gradients(base):
    model = _clsr(base, ("uk", "pt"), **DETERMINISTIC)
    randomize_language(model, "uk")
    set_language(model, "uk")
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(language_parameters(model, "uk")) | set(language_parameters(model, "pt"))
    with collect_gates(model) as gates:
        out = model(input_features=FEATS[:1], decoder_input_ids=IDS[:1]).logits
    (out.square().mean() + torch.cat(gates.values).mean()).backward()
    for name, p in language_parameters(model, "uk").items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in language_parameters(model, "pt").values())


def test_convert_from_clsr_restores_the_base_bit_exactly(base, base_logits):
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = _clsr(base, ("uk",), kind="lowrank", rank=4)
    add_language(model, "pt", kind="full")
    randomize_language(model, "uk")
    convert_from_clsr(model)
    assert not clsr_layers(model)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(logits(model), base_logits)


def test_languages_are_managed_and_checked(base):
    model = _clsr(base, ("uk",))
    add_language(model, "pt", kind="lowrank", rank=2)
    assert clsr_languages(model) == ["uk", "pt"]
    with pytest.raises(ValueError, match="exists already"):
        add_language(model, "uk")
    with pytest.raises(ValueError, match="invalid CLSR language"):
        add_language(model, "train")
    with pytest.raises(KeyError, match="no CLSR language 'nl'"):
        set_language(model, ["uk", "nl"])
    with pytest.raises(ValueError, match="task"):
        set_language(model, "uk", task="summarize")
    with pytest.raises(ValueError, match="already a CLSR"):
        convert_to_clsr(model, ())
    set_language(model, ["pt", "pt"])
    remove_language(model, "pt")
    assert clsr_languages(model) == ["uk"]
    set_language(model, ["uk", None])
    with pytest.raises(ValueError, match="per-sample languages"):
        logits(model, FEATS3, IDS3)  # 2 languages for a batch of 3
    with pytest.raises(ValueError, match="CLSR path kind"):
        ClsrConfig(kind="dense")


def test_on_the_standard_tiny_whisper_parity_and_back(tiny_whisper):
    """The 3000-frame tiny Whisper of tests/tiny.py: gate init is the base, conversion back undoes everything."""
    plain = tiny_whisper[0].eval()
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(5))
    reference = logits(plain, feats, IDS[:1])
    model = _clsr(plain, ("uk",), kind="lowrank", rank=4)
    set_language(model, "uk")
    assert torch.equal(logits(model, feats, IDS[:1]), reference)
    randomize_language(model, "uk", scale=0.5)
    assert not torch.equal(logits(model, feats, IDS[:1]), reference)
    convert_from_clsr(model)
    assert torch.equal(logits(model, feats, IDS[:1]), reference)
