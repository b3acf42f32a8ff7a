"""A lost or damaged index loses no expert: the journal and the objects give back every expert, version and
tag (`registry doctor`); until then every command says what happened and how to repair it."""

from __future__ import annotations

import json

import pytest

from registry import journal
from registry.expert_file import save_expert
from registry.index_db import RegistryIndexError
from registry.store import Registry
from tests.registry.test_store import make_expert
from trainers.cli import main


@pytest.fixture
def reg(tmp_path):
    """A registry with history: removed versions, moved tags, a removed name, a tag removed."""
    reg = Registry(tmp_path / "registry")
    reg.add(make_expert(1), "uk", tags=["best"])
    reg.add(make_expert(2), "uk", tags=["prod"])
    reg.add(make_expert(3), "uk")
    reg.tag("uk@3", "best")
    reg.remove("uk@1")
    reg.add(make_expert(4, languages=["pt"], metrics={"pt": {"test": {"wer": 0.3}}}), "pt", tags=["best", "old"])
    reg.untag("pt", "old")
    reg.add(make_expert(5), "gone")
    reg.remove("gone@all")
    reg.add(make_expert(2), "uk-copy")  # the same bytes as uk@2, under another name
    return reg


def _index_files(reg: Registry):
    return [reg.index_path.with_name(reg.index_path.name + s) for s in ("", "-wal", "-shm")]


def _cli(reg: Registry, *argv) -> int:
    return main(["registry", "--registry", str(reg.root), *argv])


def _after_repair_numbers_continue(reg: Registry) -> None:
    assert reg.add(make_expert(6), "uk").version == 4  # 1 was removed; numbers are never reused
    assert reg.add(make_expert(7), "gone").version == 2
    assert not [p for p in reg.verify() if p.serious]


def test_a_deleted_index_is_refused_clearly_then_rebuilt_with_every_version_and_tag(reg, capsys, tmp_path):
    before = reg.records()
    new = save_expert(make_expert(6), tmp_path / "new.safetensors")
    for path in _index_files(reg):
        path.unlink(missing_ok=True)
    for argv in (["list"], ["show", "uk"], ["verify"], ["add", str(new), "--name", "x"]):
        assert _cli(reg, *argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "registry doctor" in err and "Traceback" not in err, (argv, err)
    with pytest.raises(RegistryIndexError, match="is missing or empty.*journal"):
        reg.add(make_expert(6), "uk")  # a fresh index would hand out uk@1 again
    assert _cli(reg, "doctor", "--check") == 1 and "would be: rebuilt" in capsys.readouterr().out
    assert _cli(reg, "doctor") == 0
    assert "rebuilt: 4 expert version(s), 3 tag(s)" in capsys.readouterr().out
    assert Registry(reg.root).records() == before  # every field, the times of adding included
    _after_repair_numbers_continue(Registry(reg.root))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed pages"])
def test_a_damaged_index_is_refused_clearly_then_rebuilt(reg, capsys, damage):
    before = reg.records()
    data = reg.index_path.read_bytes()
    if damage == "garbage":
        reg.index_path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        reg.index_path.write_bytes(data[:len(data) // 3])
    else:
        reg.index_path.write_bytes(data[:4096] + bytes(len(data) - 4096))
    assert _cli(reg, "list") == 2 and _cli(reg, "verify") in (1, 2)
    err = capsys.readouterr()
    assert "registry doctor" in err.err + err.out and "Traceback" not in err.err
    assert _cli(reg, "doctor") == 0
    out = capsys.readouterr().out
    assert "damaged" in out and "kept the old file as" in out and "rebuilt" in out
    assert Registry(reg.root).records() == before
    assert list(reg.root.glob("index.sqlite.damaged-*"))  # the damaged file is kept for a post-mortem
    _after_repair_numbers_continue(Registry(reg.root))


def test_a_registry_older_than_the_journal_gets_one_and_survives_losing_its_index(reg, capsys):
    before = reg.records()
    reg.journal_path.unlink()  # as a registry written before the journal existed
    assert _cli(reg, "doctor") == 0 and "journal rewritten" in capsys.readouterr().out
    assert _cli(reg, "doctor") == 0 and "ok: the index and the journal agree" in capsys.readouterr().out
    for path in _index_files(reg):
        path.unlink(missing_ok=True)
    assert Registry(reg.root).doctor().action == "rebuilt" and Registry(reg.root).records() == before


def test_the_first_write_to_a_registry_without_journal_snapshots_its_index(reg):
    before = reg.records()
    reg.journal_path.unlink()
    Registry(reg.root).tag("pt@1", "new")
    state = journal.replay(reg.root)
    assert {(n, v) for n, v in state.experts} == {(r.name, r.version) for r in before}
    assert state.tags[("pt", "new")] == 1 and state.last_version["gone"] == 1


def test_without_index_and_journal_the_objects_are_kept_under_recovered_names(reg):
    shas = {r.sha256 for r in reg.records()}
    for path in _index_files(reg) + [reg.journal_path]:
        path.unlink(missing_ok=True)
    report = Registry(reg.root).doctor()
    assert report.action == "rebuilt" and len(report.recovered) == 3  # uk-copy shares uk@2's object
    recovered = Registry(reg.root).records()
    assert {r.sha256 for r in recovered} == shas and all(r.name.startswith("recovered-") for r in recovered)
    assert not [p for p in Registry(reg.root).verify() if p.serious]


def test_entries_whose_object_is_gone_are_reported_and_their_numbers_stay_reserved(reg):
    lost = reg.resolve("uk@3")
    lost.path.unlink()
    reg.index_path.write_bytes(b"x" * 5000)
    report = Registry(reg.root).doctor()
    assert report.dropped == [f"uk@3: object {lost.path} is missing"]
    fresh = Registry(reg.root)
    assert [r.ref for r in fresh.resolve_all("uk@all")] == ["uk@2"] and fresh.add(make_expert(8), "uk").version == 4


def test_a_torn_journal_line_is_stepped_over(reg):
    before = reg.records()
    with open(reg.journal_path, "ab") as f:
        f.write(b'{"op":"add","name":"uk","vers')  # a crash in the middle of an append
    rec = reg.add(make_expert(9), "nl")
    state = journal.replay(reg.root)
    assert len(state.bad_lines) == 1 and ("nl", 1) in state.experts
    for path in _index_files(reg):
        path.unlink(missing_ok=True)
    report = Registry(reg.root).doctor()
    assert report.bad_lines == state.bad_lines and report.recovered == []  # every object is named
    assert Registry(reg.root).records() == sorted([*before, rec], key=lambda r: (r.name, r.version))


def test_an_aborted_transaction_is_not_replayed(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    sha = "ab" * 32
    journal.append(root, [{"op": "add", "txn": "t1", "name": "uk", "version": 1, "sha256": sha, "size": 1,
                           "params": 1, "added": "now", "tags": ["best"]}])
    journal.append(root, [{"op": "add", "txn": "t2", "name": "uk", "version": 2, "sha256": sha, "size": 1,
                           "params": 1, "added": "now", "tags": ["best"]}])
    journal.abort(root, "t2")
    state = journal.replay(root)
    assert list(state.experts) == [("uk", 1)] and state.tags == {("uk", "best"): 1}


def test_journal_lines_with_unsafe_names_or_hashes_are_skipped(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    lines = [{"op": "add", "txn": "t", "name": "../x", "version": 1, "sha256": "ab" * 32, "size": 1, "added": "a"},
             {"op": "add", "txn": "t", "name": "uk", "version": 1, "sha256": "../../etc", "size": 1, "added": "a"},
             {"op": "tag", "txn": "t", "name": "uk", "tag": "latest", "version": 1}]
    journal.journal_path(root).write_text("".join(json.dumps(e) + "\n" for e in lines))
    state = journal.replay(root)
    assert state.bad_lines == [1, 2, 3] and not state.experts and not state.tags
