"""Mixed-language batches: each sample routed to its own LoRA expert in one forward pass equals running it
alone with that expert (peft as the reference), for logits and for greedy and beam-search generation; soft
routing equals the weighted sum of deltas; routing policies."""

from __future__ import annotations

import copy

import pytest
import torch

from inference.bank import ExpertBank, expert_bank
from inference.batched_layer import BASE_ONLY, BatchedLoraLinear
from inference.routing import CallerLanguages, FixedLanguage, LanguageIDRouting, SoftLanguageRouting, language_posterior
from lora_experts.task_vectors import lora_scale
from tests.lora_experts.random_experts import expert_alone, linear_shapes, random_lora

FEATS = torch.randn(4, 80, 3000, generator=torch.Generator().manual_seed(0))
LANGS = ["uk", "pt", "en", "nl"]  # sample 2 has no expert: the base model serves it
SOS, TRANSCRIBE, NO_TS = 50258, 50359, 50363


def _ids(model, languages, extra=(400, 500, 600)):
    lang_to_id = model.generation_config.lang_to_id
    return torch.tensor([[SOS, lang_to_id[f"<|{lang}|>"], TRANSCRIBE, NO_TS, *extra] for lang in languages])


def _experts(model) -> dict:
    """Three experts of different ranks and module sets (one adapts the encoder too)."""
    specs = {"uk": (("q_proj", "v_proj", "fc1"), 2, 4.0, ".decoder."),
             "pt": (("k_proj", "out_proj", "fc2"), 4, 8.0, ".decoder."),
             "nl": (("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), 8, 16.0, "")}
    out = {}
    for seed, (name, (targets, rank, alpha, side)) in enumerate(specs.items()):
        shapes = {m: s for m, s in linear_shapes(model, targets).items() if side in m}
        out[name] = (random_lora(shapes, rank, seed=seed + 10, scale=0.2), {"rank": rank, "alpha": alpha}, [name])
    return out


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


def test_a_mixed_batch_gives_each_sample_its_own_experts_logits(setup):
    base, model, experts = setup
    bank = expert_bank(model)
    names = [lang if lang in experts else None for lang in LANGS]
    ids = _ids(model, LANGS)
    with bank.route(names):
        mixed = _logits(model, FEATS, ids)
    base_logits = _logits(base, FEATS, ids)
    for n, name in enumerate(names):
        alone = _logits(expert_alone(base, experts, name), FEATS[n:n + 1], ids[n:n + 1])
        torch.testing.assert_close(mixed[n:n + 1], alone, rtol=1e-5, atol=1e-5)
        assert (name is None) == torch.equal(mixed[n], base_logits[n])  # experts change the output, base does not
    # Outside the route block the model is the base model again.
    assert torch.equal(_logits(model, FEATS, ids), base_logits)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate_equals_one_sample_at_a_time(setup, num_beams):
    base, model, experts = setup
    names = [lang if lang in experts else None for lang in LANGS]
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    with expert_bank(model).route(names) as routing:
        mixed = model.generate(FEATS, language=LANGS, **kwargs)
    assert set(routing._expanded) == {4, 4 * num_beams}  # encoder rows, decoder rows (samples x beams)
    pad = model.generation_config.pad_token_id
    for n, name in enumerate(names):
        alone = expert_alone(base, experts, name).generate(FEATS[n:n + 1], language=[LANGS[n]], **kwargs)[0]
        row = mixed[n]
        assert row[:len(alone)].tolist() == alone.tolist()
        assert (row[len(alone):] == pad).all()


def test_one_expert_for_everyone_takes_the_single_expert_path(setup):
    base, model, experts = setup
    ids = _ids(model, ["nl"] * 4)
    with expert_bank(model).route("nl") as routing:
        assert routing.uniform == expert_bank(model).index("nl")
        out = _logits(model, FEATS, ids)
    torch.testing.assert_close(out, _logits(expert_alone(base, experts, "nl"), FEATS, ids), rtol=1e-5, atol=1e-5)


def _merged(base, experts, mix):
    """The base with sum_e w_e * (alpha_e / r_e) B_e A_e added to its weights: the soft-routing reference."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in mix.items():
            if name is None:
                continue
            tensors, hyper, _ = experts[name]
            for key in [k for k in tensors if k.endswith(".lora_A")]:
                module = key[: -len(".lora_A")]
                a, b = tensors[key], tensors[f"{module}.lora_B"]
                ref.get_submodule(module).weight += w * lora_scale(hyper, module, a.shape[0]) * b @ a
    return ref


def test_soft_routing_mixes_experts_per_sample(setup):
    base, model, experts = setup
    bank = expert_bank(model)
    mixes = [{"uk": 0.7, "nl": 0.3}, {"pt": 0.2, None: 0.8}, {"nl": 1.0, "pt": 0.0}, {"uk": 0.5, "pt": 0.5}]
    table = [[bank.index(k) if k else BASE_ONLY for k in mix] for mix in mixes]
    weights = torch.tensor([list(mix.values()) for mix in mixes])
    ids = _ids(model, LANGS)
    with bank.route(torch.tensor(table), weights=weights):
        mixed = _logits(model, FEATS, ids)
    for n, mix in enumerate(mixes):
        ref = _logits(_merged(base, experts, mix), FEATS[n:n + 1], ids[n:n + 1])
        torch.testing.assert_close(mixed[n:n + 1], ref, rtol=1e-4, atol=1e-4)


def test_mixing_weights_carry_gradients(setup):
    """A learned router trains the weights while the experts stay frozen."""
    _, model, _ = setup
    bank = expert_bank(model)
    weights = torch.full((4, 2), 0.5, requires_grad=True)
    with bank.route(torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]]), weights=weights):
        model(input_features=FEATS, decoder_input_ids=_ids(model, LANGS)).logits.square().mean().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    assert all(not t.requires_grad for layer in bank.layers().values() for t in (layer.lora_A, layer.lora_B))


def test_add_and_remove_on_a_live_model_restore_the_base_bit_exactly(tiny_whisper):
    model = copy.deepcopy(tiny_whisper[0])
    experts = _experts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    ids = _ids(model, LANGS)
    base_logits = _logits(model, FEATS, ids)
    bank = expert_bank(model)
    bank.add_many({"uk": experts["uk"], "pt": experts["pt"]})
    with bank.route(["uk", "pt", None, "pt"]):
        before = _logits(model, FEATS, ids)
    bank.add("nl", *experts["nl"])  # larger rank: every stack is re-padded
    assert bank.names == ["uk", "pt", "nl"]
    saved = model.state_dict()  # the base's keys and values: experts are not saved with the model
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    model.load_state_dict(saved)
    with bank.route(["uk", "pt", None, "pt"]):
        torch.testing.assert_close(_logits(model, FEATS, ids), before, rtol=1e-6, atol=1e-6)
    for name in bank.names:
        assert all(torch.equal(t, experts[name][0][k]) for k, t in bank.tensors(name).items())
        assert bank.tensors(name).keys() == experts[name][0].keys()
    bank.remove("uk")
    assert bank.names == ["pt", "nl"] and bank.index("pt") == 0  # ids shift down
    with bank.route([None, "pt", None, "pt"]):
        torch.testing.assert_close(_logits(model, FEATS, ids)[1:2], before[1:2], rtol=1e-6, atol=1e-6)
    bank.remove("pt")
    bank.remove("nl")
    assert expert_bank(model, create=False) is None
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, FEATS, ids), base_logits)


def test_routing_errors_are_clear(setup):
    _, model, _ = setup
    bank = expert_bank(model)
    with pytest.raises(KeyError, match="no expert named 'xx'.*attached: uk, pt, nl"):
        bank.set_routing(["xx"])
    with pytest.raises(IndexError, match="out of range"):
        bank.set_routing([7])
    with pytest.raises(RuntimeError, match="batch of 3 samples, but a layer got 4 rows"):
        with bank.route(["uk", "pt", "nl"]):
            _logits(model, FEATS, _ids(model, LANGS))
    assert bank.routing is None  # the block restored the previous routing
    with pytest.raises(ValueError, match="already attached"):
        bank.add("uk", *_experts(model)["uk"])
    with pytest.raises(ValueError, match="peft experts attached"):
        ExpertBank(expert_alone(setup[0], setup[2], "uk"))
    assert isinstance(model.get_submodule("model.decoder.layers.0.fc1"), BatchedLoraLinear)


# ---------------------------------------------------------------------------------------------- policies
def test_fixed_and_caller_language_policies(setup):
    _, model, _ = setup
    bank = expert_bank(model)
    d = FixedLanguage(bank, "pt").route(FEATS)
    assert d.experts.tolist() == [[1]] * 4 and d.names == ["pt"] * 4 and d.languages == ["pt"] * 4
    d = CallerLanguages(bank).route(FEATS, LANGS)
    assert d.experts.tolist() == [[0], [1], [BASE_ONLY], [2]] and d.names == ["uk", "pt", None, "nl"]
    with pytest.raises(ValueError, match="4 samples"):
        CallerLanguages(bank).route(FEATS, LANGS[:3])


def test_language_id_routing_picks_the_detected_languages_expert_and_falls_back_below_threshold(setup):
    base, model, _ = setup
    bank = expert_bank(model)
    candidates = ["uk", "pt", "nl", "de"]  # de has no expert
    codes, probs = language_posterior(base, FEATS, candidates)
    detected = [codes[i] for i in probs.argmax(-1).tolist()]
    with bank.route(["nl"] * 4):  # language ID ignores the routing in force: it asks the base model
        d = LanguageIDRouting(bank, threshold=0.0, candidates=candidates).route(FEATS)
    assert d.languages == detected
    assert d.probabilities == pytest.approx(probs.max(-1).values.tolist())
    want = [bank.index(lang) if lang in bank.expert_for_language() else BASE_ONLY for lang in detected]
    assert d.experts[:, 0].tolist() == want
    # Above every sample's confidence: all go to the base model, still decoded in the detected language.
    high = LanguageIDRouting(bank, threshold=float(probs.max()) + 1e-3, candidates=candidates).route(FEATS)
    assert high.experts.tolist() == [[BASE_ONLY]] * 4 and high.names == [None] * 4 and high.languages == detected
    # A detected language with no expert goes to the base model.
    only_de = LanguageIDRouting(bank, threshold=0.0, candidates=["de"]).route(FEATS)
    assert only_de.languages == ["de"] * 4 and only_de.experts.tolist() == [[BASE_ONLY]] * 4
    # Same answer as the evaluation harness's language ID.
    from inference.decoding import detect_languages

    assert [lang for lang, _ in detect_languages(base, FEATS, candidates)] == detected


def test_soft_language_routing_weights_are_the_top_k_posterior(setup):
    base, model, _ = setup
    bank = expert_bank(model)
    candidates = ["uk", "pt", "nl"]
    codes, probs = language_posterior(base, FEATS, candidates)
    d = SoftLanguageRouting(bank, top_k=2, candidates=candidates).route(FEATS)
    top_p, top = probs.topk(2, -1)
    assert d.experts.tolist() == [[bank.index(codes[i]) for i in row] for row in top.tolist()]
    assert d.languages == [codes[row[0]] for row in top.tolist()]
    torch.testing.assert_close(d.weights, top_p / top_p.sum(-1, keepdim=True))
    # A language without an expert among the top k contributes the base model (id -1) with its weight.
    d4 = SoftLanguageRouting(bank, top_k=4, candidates=candidates + ["de"]).route(FEATS)
    assert (d4.experts == BASE_ONLY).sum(-1).tolist() == [1] * 4
    torch.testing.assert_close(d4.weights.sum(-1), torch.ones(4))
    with bank.route(d):  # the decision is what the bank takes
        mixed = _logits(model, FEATS, _ids(model, LANGS))
    assert mixed.shape[0] == 4
