"""Packs under hostile conditions: an expert listed twice, a mistyped manifest, and the temporary files a
killed `pack create` leaves beside its --out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save

from registry.atomic import temp_writer
from registry.packs import PACK_KEY, PackFormatError, create_pack, inspect_pack, read_pack
from tests.registry.test_store import make_expert
from trainers.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pack(tmp_path):
    return create_pack(tmp_path / "pack.safetensors", {"uk-x": make_expert(1), "pt-x": make_expert(2, ["pt"])}).path


def _rewrite_manifest(path: Path, edit) -> Path:
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()[PACK_KEY])
    path.write_bytes(save(load_file(path), metadata={PACK_KEY: json.dumps(edit(manifest))}))
    return path


def test_a_pack_listing_one_expert_twice_is_refused(pack, capsys):
    _rewrite_manifest(pack, lambda m: {**m, "experts": [m["experts"][0], m["experts"][1], m["experts"][0]]})
    for read in (inspect_pack, read_pack):
        with pytest.raises(PackFormatError, match="lists expert 'uk-x' twice"):
            read(pack)
    assert main(["pack", "inspect", str(pack)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "twice" in err and "Traceback" not in err


@pytest.mark.parametrize("edit, says", [
    (lambda m: {**m, "format_version": "1"}, "format_version must be a positive integer"),
    (lambda m: {**m, "format_version": None}, "format_version must be a positive integer"),
    (lambda m: {**m, "experts": None}, "experts a list"),
    (lambda m: {**m, "base": [1]}, "base must be an object"),
])
def test_a_mistyped_pack_manifest_is_one_clear_error(pack, capsys, edit, says):
    _rewrite_manifest(pack, edit)
    assert main(["pack", "inspect", str(pack)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err


_KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from registry import atomic
os.replace = lambda *a: time.sleep(600)  # stop between writing the temporary file and renaming it
atomic.write_replacing_stale(sys.argv[2], b"half a pack")
"""


def _killed_pack_create(out: Path) -> Path:
    """Run a writer of ``out`` and SIGKILL it mid-write; returns the temporary file it left."""
    before = set(out.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(ROOT), str(out)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [p for p in set(out.parent.iterdir()) - before if p.name.endswith(".tmp")]
        if left:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert left, "the writer never wrote its temporary file"
    return left[0]


def _old_file(path: Path, seconds: float = 2 * 3600) -> Path:
    path.write_bytes(b"")
    os.utime(path, (time.time() - seconds, time.time() - seconds))
    return path


def test_the_next_pack_written_there_cleans_a_killed_writers_stale_temporaries(pack, tmp_path):
    out = tmp_path / "pack.safetensors"
    stale = _killed_pack_create(out)
    os.utime(stale, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    young = _killed_pack_create(out)  # killed a moment ago: as far as anyone can tell, a slow write
    _, host = temp_writer(stale)
    alive = _old_file(out.parent / f".{out.name}.w{os.getpid()}-{host}.x1.tmp")  # old, its writer still runs
    untagged = _old_file(out.parent / f".{out.name}.abc123.tmp")  # from an older version: only age can tell
    other_target = _old_file(out.parent / ".other.safetensors.abc123.tmp")  # not a temporary of this pack
    create_pack(out, {"uk-x": make_expert(1)})
    assert not stale.exists() and not untagged.exists()
    assert young.exists() and alive.exists() and other_target.exists()
    assert inspect_pack(out).names == ["uk-x"]
