"""Repairing a registry's index from its journal and its objects (``whisper-experts registry doctor``).

The index (``index.sqlite``) is a cache of two durable sources kept beside the objects: the journal
(:mod:`registry.journal`: every name, version and tag) and the objects' own manifests (everything else a
record holds). :func:`doctor` compares them and repairs whichever is behind:

* index missing, damaged (not a database, failed integrity check) or ``rebuild=True``: a new index is built
  from the journal's replay and the objects' manifests, in a temporary file swapped into place; the damaged
  file (and its ``-wal``/``-shm``) is kept beside it as ``index.sqlite.damaged-<time>``. Journal entries whose
  object is missing or corrupt are reported and left out (their version numbers stay reserved). When the
  journal is missing or damaged too, objects it does not name are kept under ``recovered-<sha256[:12]>``, so
  that no expert is lost; rename them with ``add``/``remove``.
* index healthy but the journal disagrees (older than the journal, edited): the journal is rewritten from the
  index, which is the authority while it is healthy.

Run it while nothing else writes to the registry. Two doctors never run at once (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from registry import journal
from registry.atomic import fsync_dir
from registry.expert_file import ExpertFormatError, expert_from_bytes
from registry.home import ensure_writable
from registry.index_db import (OBJECT_SUFFIX, RegistryIndexError, connect, create_schema, index_error, insert_row,
                               object_path)
from registry.journal import SHA256_PATTERN

if TYPE_CHECKING:  # the store calls these functions; they only need its type
    from registry.store import Registry

RECOVERED_PREFIX = "recovered-"


@dataclass
class DoctorReport:
    """What :func:`doctor` found and did.

    Attributes:
        index_state: ``ok``, ``missing`` or ``damaged: <why>``.
        action: ``none``, ``rebuilt`` (a new index), ``journal rewritten`` (from the index), or, with
            ``check``, what would have been done prefixed by ``would be``.
        experts, tags: counts in the resulting index.
        recovered: refs given to objects the journal did not name.
        dropped: ``"<ref>: why"`` for journal entries left out (object missing or corrupt).
        differences: how the journal and a healthy index disagreed.
        bad_lines: journal lines that could not be read.
        set_aside: files moved aside (the damaged index).
    """

    index_state: str
    action: str = "none"
    experts: int = 0
    tags: int = 0
    recovered: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)


def _index_state(reg: Registry) -> str:
    if not reg.index_path.exists():
        return "missing"
    try:
        with closing(connect(reg.index_path, reg.timeout)) as con:
            check = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            con.execute("SELECT count(*) FROM experts").fetchone()
            con.execute("SELECT count(*) FROM names").fetchone()
            con.execute("SELECT count(*) FROM tags").fetchone()
    except sqlite3.Error as e:
        if "locked" in str(e):
            raise index_error(e, reg.index_path, writing=False) from e
        return f"damaged: {e}"
    return "ok" if check == ["ok"] else f"damaged: {'; '.join(check)[:200]}"


def _index_view(con: sqlite3.Connection) -> tuple[dict, dict, dict]:
    experts = {(r[0], r[1]): r[2] for r in con.execute("SELECT name, version, sha256 FROM experts")}
    tags = {(r[0], r[1]): r[2] for r in con.execute("SELECT name, tag, version FROM tags")}
    last = {r[0]: r[1] for r in con.execute("SELECT name, last_version FROM names")}
    return experts, tags, last


def _differences(index_view: tuple[dict, dict, dict], state: journal.JournalState) -> list[str]:
    experts, tags, last = index_view
    replayed = {k: v["sha256"] for k, v in state.experts.items()}
    out = [f"{n}@{v}: in the index, not in the journal" for (n, v) in sorted(experts.keys() - replayed.keys())]
    out += [f"{n}@{v}: in the journal, not in the index" for (n, v) in sorted(replayed.keys() - experts.keys())]
    out += [f"{n}@{v}: different sha256" for k in sorted(experts.keys() & replayed.keys())
            if experts[k] != replayed[k] for n, v in [k]]
    if tags != state.tags:
        out.append("tags differ")
    if last != state.last_version:
        out.append("last version numbers differ")
    return out


def _read_object(reg: Registry, sha: str):
    """``(expert, size)`` of an intact object, or ``(None, why)``."""
    path = object_path(reg.objects_dir, sha)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"object {path} is missing"
    if hashlib.sha256(data).hexdigest() != sha:
        return None, f"object {path} is corrupt (its sha256 differs)"
    try:
        return expert_from_bytes(data, str(path)), len(data)
    except ExpertFormatError as e:
        return None, str(e)


def _object_shas(reg: Registry) -> list[str]:
    if not reg.objects_dir.is_dir():
        return []
    shas = (p.name.removesuffix(OBJECT_SUFFIX) for p in reg.objects_dir.glob(f"*/*{OBJECT_SUFFIX}")
            if not p.name.startswith("."))
    return sorted(s for s in shas if SHA256_PATTERN.fullmatch(s))


def _build(reg: Registry, state: journal.JournalState, target: Path, report: DoctorReport) -> None:
    """Write a complete index at ``target`` from the journal's state and the objects."""
    recover = not state.present or bool(state.bad_lines)  # the journal may not name every expert
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    with closing(connect(target, reg.timeout)) as con:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("BEGIN IMMEDIATE")
        create_schema(con)
        for name, last in state.last_version.items():
            con.execute("INSERT INTO names (name, last_version) VALUES (?, ?)", (name, last))
        named = set()
        for (name, version), entry in sorted(state.experts.items()):
            expert, size_or_why = _read_object(reg, entry["sha256"])
            if expert is None:
                report.dropped.append(f"{name}@{version}: {size_or_why}")
                continue
            insert_row(con, name, version, entry["sha256"], expert.manifest, size_or_why,
                       entry["params"] or expert.num_parameters, entry["added"])
            named.add(entry["sha256"])
            report.experts += 1
        for (name, tag), version in sorted(state.tags.items()):
            if con.execute("SELECT 1 FROM experts WHERE name = ? AND version = ?", (name, version)).fetchone():
                con.execute("INSERT INTO tags (name, tag, version) VALUES (?, ?, ?)", (name, tag, version))
                report.tags += 1
        for sha in _object_shas(reg) if recover else ():
            if sha in named:
                continue
            expert, size = _read_object(reg, sha)
            if expert is None:
                continue  # verify reports it as an orphan; nothing to recover
            name = f"{RECOVERED_PREFIX}{sha[:12]}"
            version = state.last_version.get(name, 0) + 1
            con.execute("INSERT OR REPLACE INTO names (name, last_version) VALUES (?, ?)", (name, version))
            insert_row(con, name, version, sha, expert.manifest, size, expert.num_parameters, now)
            report.recovered.append(f"{name}@{version}")
            report.experts += 1
        con.execute("COMMIT")


def _set_aside(reg: Registry, stamp: str) -> list[Path]:
    """Keep the old index under another name (a hard link: the index itself is then replaced atomically) and
    move its -wal/-shm out of the way (a stale log must never meet the new database)."""
    moved = []
    for suffix in ("", "-wal", "-shm"):
        path = reg.index_path.with_name(reg.index_path.name + suffix)
        aside = reg.index_path.with_name(f"{reg.index_path.name}.damaged-{stamp}{suffix}")
        try:
            if suffix:
                path.rename(aside)
            else:
                try:
                    os.link(path, aside)
                except OSError:
                    shutil.copy2(path, aside)  # a file system without hard links
        except FileNotFoundError:
            continue
        moved.append(aside)
    return moved


def doctor(reg: Registry, *, rebuild: bool = False, check: bool = False) -> DoctorReport:
    """Make the index and the journal agree, repairing whichever is behind (see the module docstring).

    Args:
        rebuild: rebuild the index from the journal and objects even if it is healthy.
        check: report what would be done, change nothing.

    Raises:
        PermissionError: the registry cannot be written (nothing is changed).
        RegistryIndexError: another doctor is running, or the index is locked.
    """
    state_text = _index_state(reg)
    report = DoctorReport(state_text)
    replayed = journal.replay(reg.root)
    report.bad_lines = replayed.bad_lines
    if state_text == "missing" and not replayed.present and not _object_shas(reg):
        return report  # no registry here (or an empty one): nothing to repair, nothing to create
    if state_text == "ok" and not rebuild:
        with closing(connect(reg.index_path, reg.timeout)) as con:
            report.differences = _differences(_index_view(con), replayed)
            report.experts = con.execute("SELECT count(*) FROM experts").fetchone()[0]
            report.tags = con.execute("SELECT count(*) FROM tags").fetchone()[0]
        if not (report.differences or replayed.bad_lines or not replayed.present):
            return report
        report.action = "would be: journal rewritten" if check else "journal rewritten"
        if not check:
            with reg._write() as txn:  # under the write lock, so no change slips between read and rewrite
                reg.index._journal_io(lambda: journal.write_snapshot(reg.root, txn.con))
        return report
    if check:
        report.action = "would be: rebuilt"
        report.experts = len(replayed.experts)
        return report
    ensure_writable(reg.root, "the repaired registry index", "run it as the registry's owner,")
    with _doctor_lock(reg):
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = reg.root / f".index.sqlite.rebuild-{os.getpid()}"
        try:
            _build(reg, replayed, target, report)
            report.set_aside = _set_aside(reg, stamp)
            os.replace(target, reg.index_path)
            fsync_dir(reg.root)
        except sqlite3.Error as e:
            raise index_error(e, target, writing=True) from e
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{target}{suffix}")
        with closing(connect(reg.index_path, reg.timeout)) as con:
            reg.index._journal_io(lambda: journal.write_snapshot(reg.root, con))
    report.action = "rebuilt"
    return report


@contextlib.contextmanager
def _doctor_lock(reg: Registry):
    fd = os.open(reg.root / ".doctor.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegistryIndexError(f"another `registry doctor` is repairing {reg.root}; wait for it") from None
        yield
    finally:
        os.close(fd)
