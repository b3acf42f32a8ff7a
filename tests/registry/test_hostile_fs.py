"""The registry under a hostile file system: planted symlinks, a registry another user may only read, a full
disk, a file too large for memory. Each test builds its situation itself (see tests/registry/hostile.py)."""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path

import pytest

from registry import journal
from registry.expert_file import ExpertFormatError, expert_bytes, save_expert
from registry.store import Registry
from tests.registry.hostile import NOBODY, in_child, make_read_only, preload, run_cli, world_readable_dir
from tests.registry.test_store import make_expert


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


def _state(reg: Registry):
    """Everything a failed command must leave as it was: records, what the journal says, the index's bytes.
    (A failed commit may append an ``abort`` line that cancels its own lines: the journal says the same.)"""
    said = journal.replay(reg.root)
    return reg.records(), (said.experts, said.tags, said.last_version, said.bad_lines), reg.index_path.read_bytes()


# ---------------------------------------------------------------------------------------------- symlinks
def test_a_symlink_at_the_write_probe_is_never_followed(reg, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    reg.root.mkdir()
    probe = reg.root / f".write-probe-{os.getpid()}"  # the name the probe had before: predictable
    probe.symlink_to(victim)
    reg.add(make_expert(1), "uk")
    assert victim.read_text() == "precious" and probe.is_symlink()


def test_push_to_a_file_mirror_replaces_a_planted_object_symlink_without_writing_its_target(reg, tmp_path):
    rec = reg.add(make_expert(1), "uk")
    mirror = tmp_path / "mirror"
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * rec.size)  # same size: the old push skipped it, a pull then read the victim
    key = mirror / "objects" / rec.sha256[:2] / f"{rec.sha256}.safetensors"
    key.parent.mkdir(parents=True)
    key.symlink_to(victim)
    reg.push(mirror.as_uri())
    assert victim.read_bytes() == b"x" * rec.size
    assert not key.is_symlink() and key.read_bytes() == rec.path.read_bytes()
    assert not [p for p in key.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    other = Registry(tmp_path / "other")
    assert [r.ref for r in other.pull(mirror.as_uri())] == ["uk@1"]


def test_push_refuses_a_symlinked_object_directory(reg, tmp_path):
    rec = reg.add(make_expert(1), "uk")
    mirror, elsewhere = tmp_path / "mirror", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (mirror / "objects").mkdir(parents=True)
    (mirror / "objects" / rec.sha256[:2]).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ExpertFormatError, match="symlink.*refusing to write"):
        reg.push(mirror.as_uri())
    assert list(elsewhere.iterdir()) == [] and not (mirror / "index.json").exists()


def test_a_mirror_sha256_with_dot_dot_is_refused_before_any_read(reg, tmp_path):
    mirror = tmp_path / "mirror"
    reg.push(mirror.as_uri(), [reg.add(make_expert(1), "uk").ref])
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(expert_bytes(make_expert(2)))
    index = json.loads((mirror / "index.json").read_text())
    index["experts"][0]["sha256"] = "../../secret"
    (mirror / "index.json").write_text(json.dumps(index))
    other = Registry(tmp_path / "other")
    with pytest.raises(ExpertFormatError, match="sha256 must be 64 lowercase hex digits.*Nothing was copied"):
        other.pull(mirror.as_uri())
    assert other.records() == [] and not other.root.exists()


# -------------------------------------------------------------------------------------- read-only registry
def test_a_read_only_registry_reads_and_says_so_and_refuses_changes_cleanly():
    preload()
    with world_readable_dir() as shared:
        root, out = shared / "registry", shared / "out"
        reg = Registry(root)
        reg.add(make_expert(1), "uk", tags=["best"])
        reg.add(make_expert(2), "uk")
        reg.add(make_expert(3, languages=["pt"]), "pt")
        out.mkdir()
        out.chmod(0o777)
        new = save_expert(make_expert(4), out / "new.safetensors")
        make_read_only(root)
        before = _state(reg)
        r = str(root)

        def as_nobody():
            results = {}
            for label, argv in [
                ("list", ["registry", "--registry", r, "list"]),
                ("show", ["registry", "--registry", r, "show", "uk@best"]),
                ("verify", ["registry", "--registry", r, "verify"]),
                ("export", ["registry", "--registry", r, "export", "uk", "--format", "safetensors",
                            "--out", str(out / "uk.safetensors")]),
                ("push", ["registry", "--registry", r, "push", (out / "mirror").as_uri()]),
                ("pack", ["pack", "create", "--registry", r, "--experts", "uk,pt",
                          "--out", str(out / "p.safetensors")]),
                ("add", ["registry", "--registry", r, "add", str(new), "--name", "nl"]),
                ("tag", ["registry", "--registry", r, "tag", "uk@2", "prod"]),
                ("doctor", ["registry", "--registry", r, "doctor"]),
            ]:
                results[label] = run_cli(argv)
            api = Registry(r)
            results["get"] = api.get("uk@best").manifest["languages"], api.read_only
            return results

        results = in_child(as_nobody, uid=NOBODY)
        for label in ("list", "show", "verify", "export", "push", "pack"):
            code, stdout, stderr = results[label]
            assert code == 0, (label, stderr)
            assert "read-only" in stderr and "Traceback" not in stderr  # it says so
        assert "uk@2" in results["list"][1] and "pt@1" in results["list"][1]
        assert '"kind": "lora"' in results["show"][1] and results["verify"][1].startswith("ok: 3 expert")
        assert (out / "uk.safetensors").read_bytes() == reg.read_bytes("uk@2")
        assert (out / "mirror" / "index.json").is_file() and (out / "p.safetensors").is_file()
        assert results["get"] == [["uk"], True]
        for label in ("add", "tag", "doctor"):
            code, _, stderr = results[label]
            lines = stderr.strip().splitlines()
            assert code == 2 and lines[-1].startswith("error: ") and str(root) in lines[-1], (label, stderr)
            assert "permissions" in lines[-1] and "Traceback" not in stderr
        assert _state(reg) == before


# ----------------------------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("limit, says", [(100, "cannot write the expert object"), (4000, "disk is full")])
def test_a_full_disk_fails_an_add_with_one_line_and_changes_nothing(reg, tmp_path, limit, says):
    """100 bytes: the object cannot be written; 4000: the object and journal fit, SQLite's log does not."""
    reg.add(make_expert(1), "uk", tags=["best"])
    new = save_expert(make_expert(2), tmp_path / "new.safetensors")
    assert new.stat().st_size < 4000 and reg.journal_path.stat().st_size < 2000
    before = _state(reg)
    # Another process holds the index open, so its lock and log files exist, full size: the add gets past
    # opening the database and fails where a full disk fails a busy registry.
    with closing(reg._connect()) as held:
        held.execute("SELECT count(*) FROM experts").fetchall()
        code, _, stderr = in_child(lambda: run_cli(["registry", "--registry", str(reg.root), "add", str(new),
                                                    "--name", "uk", "--tag", "best"]), fsize=limit)
    assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
    assert says in stderr and "ulimit -f" in stderr and "was not changed" in stderr
    assert _state(reg) == before
    assert not [p for p in reg.verify() if p.serious]  # at most a harmless orphan object is left
    assert reg.add(new, "uk").version == 2  # and with space again, the same add works


def test_reads_work_on_a_full_disk(reg):
    reg.add(make_expert(1), "uk", tags=["best"])
    reg.add(make_expert(2, languages=["pt"]), "pt")

    def read():
        api = Registry(reg.root)
        return [r.ref for r in api.find()], api.resolve("uk@best").ref, run_cli(["registry", "--registry",
                                                                                str(reg.root), "list"])[:2]

    refs, best, (code, stdout) = in_child(read, fsize=1000)
    assert refs == ["pt@1", "uk@1"] and best == "uk@1" and code == 0 and "pt@1" in stdout


# ------------------------------------------------------------------------------------------ huge files
def _sparse(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)  # a hole: gigabytes that take no disk space
    return path


def test_a_3_gb_file_is_refused_from_its_header_without_being_read(reg, tmp_path):
    expert = expert_bytes(make_expert(1))
    foreign = _sparse(tmp_path / "foreign.safetensors", (3 << 30).to_bytes(8, "little"), 3 << 30)
    padded = _sparse(tmp_path / "padded.safetensors", expert, 3 << 30)

    def add_both():
        # 256 MB more address space than the child has: reading 3 GB would fail with MemoryError.
        return [run_cli(["registry", "--registry", str(reg.root), "add", str(p), "--name", "big"])
                for p in (foreign, padded)]

    (code1, _, err1), (code2, _, err2) = in_child(add_both, extra_memory=256 << 20)
    assert code1 == 2 and "header of 3221225472 bytes" in err1 and "not a safetensors expert file" in err1
    assert code2 == 2 and "header describes" in err2 and "other data follows" in err2
    assert "Traceback" not in err1 + err2 and reg.records() == []
