"""The registry's journal: names, versions and tags kept beside the objects, so a lost index loses no expert.

``<root>/journal.jsonl`` holds one JSON object per line. Every change to the index appends its lines, and
fsyncs them, inside the index's write transaction and before it commits, so the journal never lacks a
committed change (like a write-ahead log, or git's refs beside its objects)::

    {"op": "journal", "format": 1}                                           first line
    {"op": "add", "txn", "name", "version", "sha256", "size", "params", "added", "tags": [...]}
    {"op": "tag", "txn", "name", "tag", "version"}      {"op": "untag", "txn", "name", "tag"}
    {"op": "remove", "txn", "name", "version"}          {"op": "name", "txn", "name", "last_version"}
    {"op": "abort", "txn"}     that transaction's lines were written but its commit failed

Replaying the lines in order (:func:`replay`) gives every name, version, tag and the last version number of
each name (so numbers stay unique after removals); the manifests inside the objects give the rest of each
record. ``registry doctor`` (:mod:`registry.doctor`) rebuilds the index that way.

Writers hold the index's write lock while appending, so lines never interleave. A crash mid-append leaves a
torn last line, which :func:`append` moves past and :func:`replay` reports; a failed append is truncated
away. A registry made before the journal existed gets one on its first write: a snapshot of its index.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from registry.atomic import atomic_write_bytes, fsync_dir
from registry.records import InvalidNameError, validate_name, validate_tag

JOURNAL_NAME = "journal.jsonl"
JOURNAL_FORMAT = 1
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def journal_path(root: Path) -> Path:
    return Path(root) / JOURNAL_NAME


def new_txn() -> str:
    """An id tying a transaction's lines together (so an ``abort`` line can cancel them)."""
    return os.urandom(6).hex()


def _encode(entries) -> bytes:
    return "".join(json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
                   for e in entries).encode("utf-8")


def append(root: Path, entries: list[dict]) -> None:
    """Append ``entries`` as lines and fsync. Call with the index's write lock held, before it commits.

    Raises:
        OSError: the journal could not be written (the file is left as it was before the call).
    """
    data = _encode(entries)
    # O_NOFOLLOW: a symlink planted at journal.jsonl must not make us append to its target.
    fd = os.open(journal_path(root), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a torn last line (a crash mid-append) stays on a line of its own
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no partial line for the next append to continue
            raise
    finally:
        os.close(fd)


def abort(root: Path, txn: str) -> None:
    """Cancel a transaction whose lines were appended but whose commit failed (best effort: if this too
    fails, a later rebuild may restore that change, whose object was written)."""
    with contextlib.suppress(OSError):
        append(root, [{"op": "abort", "txn": txn}])


def snapshot_entries(con: sqlite3.Connection) -> list[dict]:
    """The journal lines that recreate the index ``con`` reads (names, versions, tags)."""
    entries: list[dict] = [{"op": "journal", "format": JOURNAL_FORMAT}]
    entries += [{"op": "name", "txn": "snapshot", "name": r[0], "last_version": r[1]}
                for r in con.execute("SELECT name, last_version FROM names ORDER BY name")]
    entries += [{"op": "add", "txn": "snapshot", "name": r[0], "version": r[1], "sha256": r[2], "size": r[3],
                 "params": r[4], "added": r[5], "tags": []}
                for r in con.execute("SELECT name, version, sha256, size, num_parameters, added FROM experts "
                                     "ORDER BY name, version")]
    entries += [{"op": "tag", "txn": "snapshot", "name": r[0], "tag": r[1], "version": r[2]}
                for r in con.execute("SELECT name, tag, version FROM tags ORDER BY name, tag")]
    return entries


def write_snapshot(root: Path, con: sqlite3.Connection) -> None:
    """Replace the journal with a snapshot of the index (atomically); the caller holds the write lock."""
    atomic_write_bytes(journal_path(root), _encode(snapshot_entries(con)))
    fsync_dir(root)


@dataclass
class JournalState:
    """What replaying a journal gives.

    Attributes:
        experts: ``(name, version) -> {"sha256", "size", "params", "added"}``.
        tags: ``(name, tag) -> version``.
        last_version: name -> the highest version it ever had (removed ones included).
        bad_lines: numbers of lines that could not be read or applied (torn, edited, damaged).
        present: whether a journal file exists.
    """

    experts: dict[tuple[str, int], dict] = field(default_factory=dict)
    tags: dict[tuple[str, str], int] = field(default_factory=dict)
    last_version: dict[str, int] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)
    present: bool = False

    def tags_of(self, name: str, version: int) -> tuple[str, ...]:
        return tuple(sorted(t for (n, t), v in self.tags.items() if n == name and v == version))


def _version(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"bad version {value!r}")
    return value


def _apply(state: JournalState, e: dict) -> None:
    """Apply one line; raises ValueError/KeyError/TypeError/InvalidNameError for a malformed one."""
    op = e["op"]
    if op in ("journal", "abort"):
        return
    name = validate_name(e["name"])  # a damaged line must not put a path-like name into the index
    if op == "add":
        version, sha = _version(e["version"]), e["sha256"]
        if not isinstance(sha, str) or not SHA256_PATTERN.fullmatch(sha):
            raise ValueError(f"bad sha256 {sha!r}")
        size, params = int(e["size"]), int(e.get("params") or 0)
        state.experts[(name, version)] = {"sha256": sha, "size": size, "params": params, "added": str(e["added"])}
        state.last_version[name] = max(state.last_version.get(name, 0), version)
        for tag in e.get("tags") or ():
            state.tags[(name, validate_tag(tag))] = version
    elif op == "tag":
        state.tags[(name, validate_tag(e["tag"]))] = _version(e["version"])
    elif op == "untag":
        state.tags.pop((name, e["tag"]), None)
    elif op == "remove":
        version = _version(e["version"])
        state.experts.pop((name, version), None)
        for key in [k for k, v in state.tags.items() if k[0] == name and v == version]:
            del state.tags[key]
    elif op == "name":
        state.last_version[name] = max(state.last_version.get(name, 0), _version(e["last_version"]))
    else:
        raise ValueError(f"unknown op {op!r}")


def replay(root: Path) -> JournalState:
    """Read the journal and apply its lines in order, skipping aborted transactions and unreadable lines."""
    state = JournalState()
    try:
        raw = journal_path(root).read_bytes()
    except FileNotFoundError:
        return state
    state.present = True
    entries: list[tuple[int, dict]] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("op"), str):
                raise ValueError("not a journal entry")
        except ValueError:
            state.bad_lines.append(number)
            continue
        entries.append((number, entry))
    aborted = {e.get("txn") for _, e in entries if e["op"] == "abort"}
    for number, entry in entries:
        if entry["op"] != "abort" and entry.get("txn") in aborted:
            continue
        try:
            _apply(state, entry)
        except (KeyError, TypeError, ValueError, InvalidNameError):
            state.bad_lines.append(number)
    return state


def has_entries(root: Path) -> bool:
    """Whether a journal exists that records any name (so an absent index means a lost one, not a new one).
    Every line but the first names one; a substring test keeps this cheap on a large journal."""
    try:
        return b'"name":' in journal_path(root).read_bytes()
    except OSError:
        return False
