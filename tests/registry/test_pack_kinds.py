"""Packs holding LoRA, sparse and CLSR experts: create -> inspect -> load round trip, one routing for every kind
(a mixed batch equals each sample alone with its expert), live add/remove restoring the base bit-exactly,
refusals (kinds a bank cannot route, CLSR beside experts on fc1/fc2), and the pack command."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from distill.clsr import add_language, convert_to_clsr, make_clsr_expert, set_language
from inference.bank import expert_bank
from inference.packs import add_expert, load_pack
from lora_experts.model import attach_expert
from lora_experts.sparse import apply_sparse, sparse_deltas, sparse_expert
from registry.bases import load_base
from registry.expert_file import Expert, new_manifest
from registry.packs import create_pack, inspect_pack, read_pack
from registry.store import Registry
from tests.distill.clsr_helpers import randomize_language
from tests.lora_experts.random_experts import linear_shapes, lora_expert
from tests.inference.test_sparse_routing import random_sparse
from trainers.cli import main

FEATS = torch.randn(3, 80, 3000, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[50258, 50280, 50359, 50363, 400], [50258, 50267, 50359, 50363, 500],
                    [50258, 50271, 50359, 50363, 600]])
KINDS = [("uk-lora", "lora"), ("pt-sparse", "sparse"), ("nl-clsr", "clsr")]


def _identity(base) -> dict:
    return {"name": base.name, "fingerprint": base.fingerprint, "tokenizer_fingerprint": base.tokenizer_fingerprint}


def _fresh(base):
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def _logits(model):
    with torch.no_grad():
        return model(input_features=FEATS, decoder_input_ids=IDS).logits


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def kinds(tiny_base):
    """(experts of each kind, the trained CLSR model): uk LoRA on decoder q/v, pt sparse on attention of encoder
    and decoder, nl low-rank CLSR, sv a LoRA expert on fc1 (clashes with CLSR)."""
    model, ident = tiny_base.model, _identity(tiny_base)
    decoder = {m: s for m, s in linear_shapes(model, ("q_proj", "v_proj")).items() if ".decoder." in m}
    clsr = convert_to_clsr(copy.deepcopy(model))
    add_language(clsr, "nl", kind="lowrank", rank=4, alpha=8.0)
    randomize_language(clsr, "nl", seed=3)
    experts = {"uk-lora": lora_expert(decoder, 4, 8.0, seed=1, languages=["uk"], base=ident),
               "pt-sparse": sparse_expert(random_sparse(model, ("q_proj", "v_proj", "out_proj"), 0.1, seed=2),
                                          languages=["pt"], base=ident),
               "nl-clsr": make_clsr_expert(clsr, "nl", tiny_base),
               "sv-fc1": lora_expert(linear_shapes(model, ("fc1",)), 2, 4.0, seed=4, languages=["sv"], base=ident)}
    return experts, clsr


def _alone(tiny_base, kinds, name):
    experts, clsr = kinds
    if name == "nl-clsr":
        set_language(clsr, "nl")
        return clsr
    ref = copy.deepcopy(tiny_base.model)
    if name == "uk-lora":
        attach_expert(ref, experts[name].tensors, experts[name].manifest["hyperparameters"])
    elif name == "pt-sparse":
        apply_sparse(ref, experts[name])
    return ref


def test_a_pack_of_every_kind_round_trips_and_routes_per_sample(kinds, tiny_base, tmp_path):
    experts = {n: e for n, e in kinds[0].items() if n != "sv-fc1"}
    info = create_pack(tmp_path / "kinds.safetensors", experts)
    assert [(e.name, e.kind) for e in info.experts] == KINDS
    back = read_pack(info.path)
    for name, expert in experts.items():
        assert back[name].manifest == expert.manifest
        assert all(torch.equal(back[name].tensors[k], t) for k, t in expert.tensors.items())
    base = _fresh(tiny_base)
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    modules = {n: type(m) for n, m in base.model.named_modules()}
    base_logits = _logits(base.model)
    bank = load_pack(base, info.path)
    assert [(e.name, e.kind) for e in bank.experts] == KINDS
    assert bank.expert_for_language() == {"uk": 0, "pt": 1, "nl": 2}
    deltas = sparse_deltas(experts["pt-sparse"])
    assert all(torch.equal(d.values, deltas[p].values) for p, d in bank.deltas("pt-sparse").items())
    order = ["nl-clsr", "uk-lora", "pt-sparse"]
    with bank.route(order):
        mixed = _logits(base.model)
    for n, name in enumerate(order):
        alone = _alone(tiny_base, kinds, name)
        with torch.no_grad():
            ref = alone(input_features=FEATS[n:n + 1], decoder_input_ids=IDS[n:n + 1]).logits
        torch.testing.assert_close(mixed[n:n + 1], ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[n], base_logits[n])
    with bank.route([None, "pt-sparse", None]):  # BASE_ONLY rows: the base model (CLSR: the shared path)
        other = _logits(base.model)
    assert torch.equal(other[0], base_logits[0]) and torch.equal(other[2], base_logits[2])
    for name in list(bank.names):
        bank.remove(name)
    assert expert_bank(base.model, create=False) is None
    assert {n: type(m) for n, m in base.model.named_modules()} == modules
    assert base.model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in base.model.state_dict().items())


def test_add_expert_takes_sparse_and_clsr_experts_on_a_live_model(kinds, tiny_base, tmp_path):
    experts = kinds[0]
    pack = create_pack(tmp_path / "uk.safetensors", {"uk-lora": experts["uk-lora"]}).path
    base = _fresh(tiny_base)
    bank = load_pack(base, pack)
    assert add_expert(base, experts["pt-sparse"], "pt-sparse") == 1
    assert add_expert(base, experts["nl-clsr"], "nl-clsr") == 2
    with bank.route(["pt-sparse", "nl-clsr", "uk-lora"]):
        mixed = _logits(base.model)
    with torch.no_grad():
        ref = _alone(tiny_base, kinds, "nl-clsr")(input_features=FEATS[1:2], decoder_input_ids=IDS[1:2]).logits
    torch.testing.assert_close(mixed[1:2], ref, rtol=1e-5, atol=1e-5)
    bank.clear()
    assert torch.equal(_logits(base.model), _logits(tiny_base.model))


def test_kinds_a_bank_cannot_route_and_clsr_beside_fc1_experts_are_refused(kinds, tiny_base, tmp_path):
    experts = kinds[0]
    tv = Expert({"model.decoder.layers.0.fc1.weight": torch.zeros(256, 64)},
                new_manifest("task_vector", ["uk"], _identity(tiny_base)))
    pack = create_pack(tmp_path / "tv.safetensors", {"uk-lora": experts["uk-lora"], "uk-tv": tv}).path
    base = _fresh(tiny_base)
    with pytest.raises(ValueError, match="expert uk-tv is a 'task_vector' expert; an expert bank routes lora, sparse, "
                                         "clsr experts.*apply_task_vector"):
        load_pack(base, pack)
    assert load_pack(base, pack, names=["uk-lora"]).names == ["uk-lora"]
    clash = create_pack(tmp_path / "clash.safetensors",
                        {"pt-sparse": experts["pt-sparse"], "nl-clsr": experts["nl-clsr"], "sv-fc1": experts["sv-fc1"]})
    base = _fresh(tiny_base)
    modules = {n: type(m) for n, m in base.model.named_modules()}
    with pytest.raises(ValueError, match="CLSR experts \\(nl-clsr\\) replace every fc1/fc2.*sv-fc1 adapts "
                                         "model.decoder.layers.0.fc1"):
        load_pack(base, clash.path)
    assert expert_bank(base.model, create=False) is None  # nothing attached, nothing converted
    assert {n: type(m) for n, m in base.model.named_modules()} == modules
    bank = load_pack(base, clash.path, names=["pt-sparse", "nl-clsr"])
    with pytest.raises(ValueError, match="sv-fc1 adapts model.decoder.layers.0.fc1"):
        add_expert(base, experts["sv-fc1"], "sv-fc1")
    assert bank.names == ["pt-sparse", "nl-clsr"]


def test_pack_create_takes_sparse_and_clsr_experts(kinds, tiny_base, tmp_path, capsys):
    experts = kinds[0]
    reg = Registry(tmp_path / "registry")
    reg.add(experts["pt-sparse"], "pt-sparse")
    reg.add(experts["nl-clsr"], "nl-clsr")
    reg.add(experts["uk-lora"], "uk-lora")
    out = tmp_path / "p.safetensors"
    assert main(["pack", "create", "--registry", str(reg.root), "--experts", "pt-sparse,nl-clsr",
                 "--out", str(out)]) == 0
    assert [(e.name, e.kind) for e in inspect_pack(out).experts] == [("pt-sparse", "sparse"), ("nl-clsr", "clsr")]
    capsys.readouterr()
    assert main(["pack", "create", "--registry", str(reg.root), "--base", tiny_base.fingerprint[:12], "--languages",
                 "nl,pt", "--kind", "any", "--out", str(out)]) == 0
    assert main(["pack", "inspect", str(out)]) == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("nl-clsr", "pt-sparse"))}
    assert rows == {"nl-clsr": "clsr", "pt-sparse": "sparse"}
    assert main(["pack", "create", "--registry", str(reg.root), "--base", tiny_base.fingerprint[:12], "--languages",
                 "pt", "--kind", "sparse", "--out", str(out)]) == 0
    assert inspect_pack(out).names == ["pt-sparse"]
