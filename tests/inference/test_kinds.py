"""The table of expert kinds: one entry per kind of the file format, and every operation of every kind either
works on a tiny expert of that kind (applied, merged and routed, the expert gives the same output) or is refused
by its entry point and by its command with the entry's reason; docs/concepts.md shows the same table."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from distill.clsr import add_language, convert_to_clsr, make_clsr_expert
from distill.teachers import load_teachers
from inference.attach import check_routable
from inference.bank import expert_bank
from inference.kinds import OPERATIONS, ExpertKind, all_kinds, expert_kind, routable
from inference.language_matrix import expert_applied
from inference.packs import add_expert
from lora_experts.export import check_mergeable, merged_model
from lora_experts.kinds import register_kind
from lora_experts.sparse import sparse_expert
from lora_experts.task_vectors import task_vector
from registry.bases import load_base
from registry.ct2_export import ExportError
from registry.expert_file import KINDS as FILE_KINDS
from registry.expert_file import Expert, new_manifest, save_expert
from registry.store import Registry
from tests.distill.clsr_helpers import randomize_language
from tests.inference.test_sparse_routing import random_sparse
from tests.lora_experts.random_experts import linear_shapes, lora_expert
from trainers.cli import main
from trainers.cli.eval import load_for_eval

DOCS = Path(__file__).resolve().parents[2] / "docs" / "concepts.md"
FEATS = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(2))
IDS = torch.tensor([[50258, 50280, 50359, 50363, 400]])


def _fresh(base):
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_features=FEATS, decoder_input_ids=IDS).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _refused(reason: str) -> str:
    return re.escape(reason)


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def experts(tiny_base):
    """A tiny expert of every kind: LoRA on decoder q/v, a dense delta on decoder fc1, sparse on attention, a
    mask, and a low-rank CLSR language moved off its init."""
    model = tiny_base.model
    ident = {"name": tiny_base.name, "fingerprint": tiny_base.fingerprint,
             "tokenizer_fingerprint": tiny_base.tokenizer_fingerprint}
    decoder = {m: s for m, s in linear_shapes(model, ("q_proj", "v_proj")).items() if ".decoder." in m}
    fc1 = dict(model.named_parameters())["model.decoder.layers.0.fc1.weight"]
    dense = 0.05 * torch.randn(fc1.shape, generator=torch.Generator().manual_seed(4))
    clsr = convert_to_clsr(copy.deepcopy(model))
    add_language(clsr, "nl", kind="lowrank", rank=4, alpha=8.0)
    randomize_language(clsr, "nl", seed=3, scale=0.5)
    return {"lora": lora_expert(decoder, 4, 8.0, seed=1, languages=["uk"], base=ident),
            "task_vector": Expert({"model.decoder.layers.0.fc1.weight": dense},
                                  new_manifest("task_vector", ["de"], ident)),
            "sparse": sparse_expert(random_sparse(model, ("q_proj", "v_proj"), 0.1, seed=2), languages=["pt"],
                                    base=ident),
            "mask": Expert({"model.decoder.layers.0.fc1.weight.indices": torch.zeros(1, dtype=torch.uint8)},
                           new_manifest("mask", ["pt"], ident)),
            "clsr": make_clsr_expert(clsr, "nl", tiny_base)}


def test_every_kind_of_the_file_format_has_one_entry_that_explains_each_refusal():
    table = all_kinds()
    assert set(table) == set(FILE_KINDS) and list(table)[:3] == ["lora", "task_vector", "sparse"]
    assert routable() == ["lora", "sparse", "clsr"]
    for name, kind in table.items():
        assert kind.name == name and kind.exports[0] == "safetensors"
        for op in OPERATIONS:
            assert kind.supports(op) != bool(kind.reason(op)), (name, op)  # supported, or refused with a reason
            if not kind.supports(op):
                assert len(kind.reason(op)) > 30, (name, op)
    assert expert_kind("clsr").reason("task_vector").startswith("its language paths replace the feed-forward")
    # An entry must explain what it refuses; a kind has one entry; an unregistered kind refuses everything.
    with pytest.raises(ValueError, match="refuses apply, task_vector, merge, route, peft without saying why"):
        ExpertKind("mask", "a mask")
    with pytest.raises(ValueError, match="registered already"):
        register_kind(dataclasses.replace(all_kinds()["mask"]))
    with pytest.raises(ValueError, match="not a kind of the expert file format"):
        register_kind(dataclasses.replace(all_kinds()["mask"], name="adapter"))
    unknown = expert_kind("adapter")
    assert not any(unknown.supports(op) for op in OPERATIONS) and "no entry" in unknown.reason("apply")


@pytest.mark.parametrize("name", ["lora", "task_vector", "sparse", "mask", "clsr"])
def test_each_operation_works_or_is_refused_with_the_entrys_reason(name, experts, tiny_base, tiny_whisper_dir,
                                                                   tmp_path):
    expert, kind = experts[name], expert_kind(name)
    plain = _logits(tiny_base.model)
    outputs = {}
    # apply: in place on one model, taken out again bit-exactly (the eval matrix), or for good (a teacher)
    model = copy.deepcopy(tiny_base.model)
    before = _state(model)
    if kind.supports("apply"):
        with expert_applied(model, expert):
            outputs["applied"] = _logits(model)
        assert not torch.allclose(outputs["applied"], plain, atol=1e-4)  # the expert did something
        file = save_expert(expert, tmp_path / f"{name}.safetensors")
        teacher = load_teachers(f"{tiny_whisper_dir}+{file}", tiny_base)
        outputs["teacher"] = teacher.logits(FEATS, IDS, ["en"])
    else:
        with pytest.raises(ValueError, match=_refused(kind.reason("apply"))), expert_applied(model, expert):
            pass
    assert _state(model).keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in _state(model).items())
    # task vector, and the base with it merged in
    if kind.supports("task_vector"):
        assert set(task_vector(expert)) <= set(dict(model.named_parameters()))
        outputs["merged"] = _logits(merged_model(expert, name, base=_fresh(tiny_base)).model)
    else:
        with pytest.raises(ValueError, match=_refused(kind.reason("task_vector"))):
            task_vector(expert)
        with pytest.raises(ExportError, match=_refused(kind.reason("merge"))):
            check_mergeable(expert, name)
    # routed per sample in an expert bank
    if kind.supports("route"):
        base = _fresh(tiny_base)
        add_expert(base, expert, f"{name}-x")
        with expert_bank(base.model).route([f"{name}-x"]):
            outputs["routed"] = _logits(base.model)
    else:
        with pytest.raises(ValueError, match=_refused(kind.reason("route"))):
            check_routable(f"{name}-x", name, "test")
        with pytest.raises(ValueError, match=_refused(kind.reason("route"))):
            add_expert(_fresh(tiny_base), expert, f"{name}-x")
    # PEFT
    if kind.supports("peft"):
        assert (kind.peft(expert, tmp_path / "peft") / "adapter_config.json").is_file()
    else:
        with pytest.raises(ValueError, match=_refused(kind.reason("peft"))):
            kind.require("peft", name)
    for logits in outputs.values():  # one expert, one output, whichever way it is put in
        _close(logits, outputs["applied"])
    expected = {op: kind.supports(op) for op in ("apply", "task_vector", "route")}
    assert {"apply": "applied" in outputs, "task_vector": "merged" in outputs,
            "route": "routed" in outputs} == expected


def test_the_commands_refuse_what_a_kind_cannot_do_with_the_reason(experts, tiny_base, tiny_whisper_dir, tmp_path,
                                                                   capsys):
    reg = tmp_path / "registry"
    registry = Registry(str(reg))
    for name in ("task_vector", "sparse", "clsr", "mask"):
        registry.add(experts[name], name.replace("_", "-"))
    r = ["--registry", str(reg)]
    cases = [(["fuse", *r, "--experts", "sparse,clsr", "--name", "x"], "expert clsr is a 'clsr' expert and has no "
              "task vector: " + expert_kind("clsr").reason("task_vector")),
             (["pack", "create", *r, "--experts", "sparse,task-vector", "--out", str(tmp_path / "p.safetensors")],
              "expert task-vector is a 'task_vector' expert; an expert bank routes lora, sparse, clsr experts"),
             (["registry", *r, "export", "clsr", "--format", "hf", "--out", str(tmp_path / "hf")],
              "clsr@1 is a 'clsr' expert and cannot be merged into Whisper's weights: a CLSR expert adds"),
             (["registry", *r, "export", "sparse", "--format", "peft", "--out", str(tmp_path / "peft")],
              "sparse@1 is a 'sparse' expert and has no PEFT form: only LoRA experts have one")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in " ".join(capsys.readouterr().err.split()), argv
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "hf").exists()
    # eval --expert / --experts and distill --teacher: a mask changes no weights
    mask = save_expert(experts["mask"], tmp_path / "mask.safetensors")
    why = re.escape(f"is a 'mask' expert and cannot be applied to a model: {expert_kind('mask').reason('apply')}")
    with pytest.raises(ValueError, match=why):
        load_for_eval(tiny_base, str(mask))
    with pytest.raises(ValueError, match=why):
        load_teachers(f"{tiny_whisper_dir}+{mask}", tiny_base)


def test_the_docs_table_of_kinds_matches_the_code():
    lines = DOCS.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| kind | apply to one model"))
    columns = ["apply", "task_vector", "merge", "route", "peft"]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(columns, cells[1:]))
    assert set(rows) == set(all_kinds())
    for name, cells in rows.items():
        for op, cell in cells.items():
            assert cell.startswith("yes" if all_kinds()[name].supports(op) else "no"), (name, op, cell)
