"""Expert packs: create -> inspect -> load round trips, registry queries, corrupt and foreign packs refused,
experts added to and removed from a live model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from inference.bank import expert_bank
from lora_experts.model import attach_expert
from registry.bases import load_base
from registry.expert_file import ExpertFormatError, ExpertMismatchError, save_expert
from registry.packs import PackFormatError, create_pack, inspect_pack, read_pack, select_experts
from inference.packs import add_expert, load_pack
from registry.records import ExpertNotFoundError
from registry.store import Registry
from tests.lora_experts.random_experts import linear_shapes, lora_expert
from tests.tiny import make_tiny_whisper
from trainers.cli import main

FEATS = torch.randn(3, 80, 3000, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[50258, 50280, 50359, 50363, 400], [50258, 50267, 50359, 50363, 500],
                    [50258, 50271, 50359, 50363, 600]])


def _identity(base) -> dict:
    return {"name": base.name, "fingerprint": base.fingerprint, "tokenizer_fingerprint": base.tokenizer_fingerprint}


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Same architecture and tokenizer, other weights."""
    return load_base(str(make_tiny_whisper(tmp_path_factory.mktemp("other") / "tiny-7", seed=7)), device="cpu")


def _fresh(base):
    """The base with its own copy of the model (loading a pack changes the model in place)."""
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


@pytest.fixture(scope="module")
def reg(tmp_path_factory, tiny_base, other_base):
    reg = Registry(tmp_path_factory.mktemp("packs") / "registry")
    shapes = linear_shapes(tiny_base.model, ("q_proj", "v_proj", "fc1"))
    ours, theirs = _identity(tiny_base), _identity(other_base)
    reg.add(lora_expert(shapes, 2, 4.0, seed=1, languages=["uk"], base=ours), "uk-espeak")
    reg.add(lora_expert(shapes, 4, 8.0, seed=2, languages=["pt"], base=ours), "pt-espeak")
    reg.add(lora_expert(shapes, 8, 8.0, seed=3, languages=["pt"], base=ours), "pt-espeak")  # @2: the latest
    reg.add(lora_expert(shapes, 4, 4.0, seed=4, languages=["nl", "de"], base=ours), "nl-de")
    reg.add(lora_expert(shapes, 4, 4.0, seed=5, languages=["uk"], base=theirs), "uk-other")
    return reg


def _logits(model, routing=None):
    with torch.no_grad():
        if routing is None:
            return model(input_features=FEATS, decoder_input_ids=IDS).logits
        with expert_bank(model).route(routing):
            return model(input_features=FEATS, decoder_input_ids=IDS).logits


# ------------------------------------------------------------------------------------------- round trip
def test_create_inspect_load_round_trip(reg, tiny_base, tmp_path):
    out = tmp_path / "packs" / "eu3.safetensors"
    info = create_pack(out, registry=reg, base=tiny_base.fingerprint[:8], languages=["uk", "pt", "nl", "de"])
    assert info.names == ["uk-espeak", "pt-espeak", "nl-de"]  # one query per language; nl-de listed once
    assert [e.ref for e in info.experts] == ["uk-espeak@1", "pt-espeak@2", "nl-de@1"]
    assert [e.rank for e in info.experts] == [2, 8, 4] and info.base == _identity(tiny_base)
    assert inspect_pack(out) == info and info.size == out.stat().st_size
    for entry in info.experts:
        rec = reg.resolve(entry.ref)
        assert entry.sha256 == rec.sha256 and entry.parameters == rec.num_parameters
        assert entry.languages == rec.languages and entry.manifest == reg.get(entry.ref).manifest
    # The pack's tensors are the registry's, bit for bit: read back, and attached to a model.
    experts = read_pack(out)
    base = _fresh(tiny_base)
    bank = load_pack(base, out)
    assert bank.names == info.names and bank.base == _identity(tiny_base)
    assert bank.expert_for_language() == {"uk": 0, "pt": 1, "nl": 2, "de": 2}
    for entry in info.experts:
        stored = reg.get(entry.ref).tensors
        for got in (experts[entry.name].tensors, bank.tensors(entry.name)):
            assert got.keys() == stored.keys() and all(torch.equal(got[k], stored[k]) for k in stored)
    # A loaded expert computes what the same expert attached alone (peft) computes.
    reference = copy.deepcopy(tiny_base.model)
    attach_expert(reference, reg.get("pt-espeak").tensors, reg.get("pt-espeak").manifest["hyperparameters"])
    torch.testing.assert_close(_logits(base.model, "pt-espeak"), _logits(reference), rtol=1e-5, atol=1e-5)


def test_explicit_experts_and_queries(reg, tiny_base, tmp_path):
    info = create_pack(tmp_path / "p.safetensors", ["pt-espeak@1", "uk-espeak"], registry=reg)
    assert [e.ref for e in info.experts] == ["pt-espeak@1", "uk-espeak@1"] and info.experts[0].rank == 4
    assert [r.ref for r in select_experts(reg, tiny_base.fingerprint, ["pt"])] == ["pt-espeak@2"]
    with pytest.raises(ExpertNotFoundError, match="no lora expert for language 'fr'.*registry list --language fr"):
        create_pack(tmp_path / "x.safetensors", registry=reg, base=tiny_base.fingerprint, languages=["fr"])
    with pytest.raises(ExpertFormatError, match="one base, but these differ"):
        create_pack(tmp_path / "x.safetensors", ["uk-espeak", "uk-other"], registry=reg)
    with pytest.raises(ExpertFormatError, match="uk-other was trained on base"):
        create_pack(tmp_path / "x.safetensors", ["uk-other"], registry=reg, base=tiny_base.fingerprint)
    with pytest.raises(ValueError, match="needs --base"):
        create_pack(tmp_path / "x.safetensors", registry=reg, languages=["uk"])
    assert not (tmp_path / "x.safetensors").exists()
    # Experts in memory pack under their given names, and may be loaded selectively.
    mem = create_pack(tmp_path / "m.safetensors", {"fresh-uk": reg.get("uk-espeak"), "fresh-pt": reg.get("pt-espeak")})
    assert mem.names == ["fresh-uk", "fresh-pt"] and mem.experts[0].ref is None
    assert load_pack(_fresh(tiny_base), tmp_path / "m.safetensors", names=["fresh-pt"]).names == ["fresh-pt"]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def pack(reg, tiny_base, tmp_path):
    return create_pack(tmp_path / "pack.safetensors", ["uk-espeak", "pt-espeak"], registry=reg).path


def test_truncated_and_corrupt_packs_are_refused(pack, tiny_base, tmp_path):
    data = pack.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(PackFormatError, match="truncated.safetensors is not a readable safetensors file.*truncated"):
        load_pack(_fresh(tiny_base), truncated)
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(PackFormatError, match="truncated or corrupt"):
        inspect_pack(tmp_path / "short.safetensors")
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    inspect_pack(flipped)  # the header is intact ...
    base = _fresh(tiny_base)
    with pytest.raises(PackFormatError, match="tensors of expert uk-espeak are corrupt"):
        load_pack(base, flipped)  # ... but the digest of the last tensors (uk-espeak, names sort) is not
    assert expert_bank(base.model, create=False) is None  # nothing was attached
    with pytest.raises(PackFormatError, match="does not exist"):
        inspect_pack(tmp_path / "missing.safetensors")


def test_an_expert_file_is_not_a_pack(reg, tmp_path):
    path = save_expert(reg.get("uk-espeak"), tmp_path / "uk.safetensors")
    with pytest.raises(PackFormatError, match="single expert file, not a pack"):
        inspect_pack(path)


def test_a_pack_for_another_base_is_refused(pack, other_base, tiny_base):
    base = _fresh(other_base)
    with pytest.raises(ExpertMismatchError, match="was trained on base .* --force"):
        load_pack(base, pack)
    assert expert_bank(base.model, create=False) is None
    assert load_pack(base, pack, force=True).names == ["uk-espeak", "pt-espeak"]
    # A bare model is checked by its weight fingerprint.
    with pytest.raises(ExpertMismatchError):
        load_pack(copy.deepcopy(other_base.model), pack)
    assert load_pack(copy.deepcopy(tiny_base.model), pack).base["fingerprint"] == tiny_base.fingerprint


def test_another_tokenizer_is_refused_even_with_force(pack, tiny_base):
    base = dataclasses.replace(_fresh(tiny_base), tokenizer_fingerprint="0" * 16)
    with pytest.raises(ExpertMismatchError, match="tokenizer"):
        load_pack(base, pack, force=True)


# --------------------------------------------------------------------------------------------- live model
def test_experts_join_and_leave_a_live_model(pack, reg, tiny_base):
    base = _fresh(tiny_base)
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    base_logits = _logits(base.model)
    bank = load_pack(base, pack)
    with pytest.raises(ValueError, match="already attached"):
        load_pack(base, pack, names=["uk-espeak"])
    assert add_expert(base, reg.get("nl-de"), "nl-de") == 2 and bank.names == ["uk-espeak", "pt-espeak", "nl-de"]
    with pytest.raises(ExpertMismatchError):
        add_expert(base, reg.get("uk-other"), "uk-other")
    mixed = _logits(base.model, ["nl-de", None, "uk-espeak"])
    assert torch.equal(mixed[1], base_logits[1]) and not torch.allclose(mixed[0], base_logits[0])
    bank.remove("uk-espeak")
    torch.testing.assert_close(_logits(base.model, ["nl-de", None, None])[0], mixed[0], rtol=1e-6, atol=1e-6)
    for name in list(bank.names):
        bank.remove(name)
    assert expert_bank(base.model, create=False) is None
    assert all(torch.equal(v, state[k]) for k, v in base.model.state_dict().items())
    assert torch.equal(_logits(base.model), base_logits)


# ------------------------------------------------------------------------------------------------- CLI
def test_pack_create_and_inspect_commands(reg, tiny_base, tmp_path, capsys):
    out = tmp_path / "cli" / "eu.safetensors"
    assert main(["pack", "create", "--registry", str(reg.root), "--base", tiny_base.fingerprint[:12],
                 "--languages", "uk,pt", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "uk-espeak@1" in printed and "pt-espeak@2" in printed
    assert main(["pack", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    header = [line for line in printed.splitlines() if line.startswith("NAME")][0]
    assert header.split()[:4] == ["NAME", "REF", "KIND", "LANGUAGES"] and tiny_base.fingerprint in printed
    assert main(["pack", "create", "--registry", str(reg.root), "--experts", "uk-espeak,nl-de",
                 "--out", str(out)]) == 0
    assert inspect_pack(out).names == ["uk-espeak", "nl-de"]
    capsys.readouterr()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 12)
    assert main(["pack", "inspect", str(tmp_path / "bad.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
