"""Checking and cleaning a registry directory: ``verify`` re-hashes every object and checks the index (and the
imported bases its experts name), ``gc`` deletes what no index row refers to.

Both work on a :class:`registry.store.Registry` (its methods of the same names call these). Neither changes a
committed expert: ``verify`` only reads, and ``gc`` deletes orphan objects under the registry's write lock (an
add re-checks its object under the same lock) and temporary files that no write in progress can own.

Both run safely beside writers: ``verify`` re-checks a missing object, or an unreferenced one, against the
index before reporting it (a concurrent remove or add explains it), so a healthy registry never fails.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from registry.atomic import writer_is_dead
from registry.expert_file import ExpertFormatError, manifest_from_file
from registry.home import bases_dir
from registry.index_db import DOCTOR_HINT, OBJECT_SUFFIX
from registry.records import ExpertRecord, Problem

if TYPE_CHECKING:  # the store calls these functions; they only need its type
    from registry.store import Registry


def _object_files(reg: Registry) -> list[Path]:
    """Every file under the registry's ``objects/`` (indexed or not, temporary files included)."""
    if not reg.objects_dir.is_dir():
        return []
    return sorted(p for p in reg.objects_dir.glob("*/*") if p.is_file())


def _object_problem(reg: Registry, sha: str, recs: list[ExpertRecord]) -> Problem | None:
    """What is wrong with one indexed object, or None: missing, wrong size, wrong hash, unreadable manifest."""
    path, names, size = reg.object_path(sha), tuple(r.ref for r in recs), recs[0].size
    try:
        f = open(path, "rb")  # once: a concurrent remove may unlink the name, never an open file's content
    except FileNotFoundError:
        return Problem("missing", path, names, "object file does not exist")
    with f:
        found_size = os.fstat(f.fileno()).st_size
        if found_size != size:
            return Problem("size", path, names, f"expected {size} bytes, found {found_size} (truncated or overwritten)")
        found = hashlib.file_digest(f, "sha256").hexdigest()
        if found != sha:
            return Problem("hash", path, names, f"expected sha256 {sha}, found {found} (corrupt)")
        try:
            manifest_from_file(f, str(path))
        except ExpertFormatError as e:
            return Problem("manifest", path, names, str(e))
    return None


def _still_indexed(reg: Registry, sha: str) -> list[ExpertRecord]:
    return reg._select("e.sha256 = ? ORDER BY e.name, e.version", (sha,))


def verify(reg: Registry, bases: bool = True) -> list[Problem]:
    """Re-hash every object and check the index; returns the problems (empty when all is well).

    Checks: SQLite integrity; each indexed object exists, has the recorded size and sha256, and parses as an
    expert; files under ``objects/`` that no row refers to (orphans, including temporary files left by an
    interrupted write) are reported too, though they are harmless. With ``bases``, each base the experts name
    that is imported under ``<home>/bases/<name>`` must still hash to the fingerprint recorded at import
    (:func:`registry.base_integrity.verify_base`).

    Raises:
        RegistryIndexError: the index cannot be opened at all (damaged, unreadable); the message says how to
            rebuild it.
    """
    problems: list[Problem] = []
    check = [r[0] for r in reg._query("PRAGMA integrity_check")]
    if check and check != ["ok"]:
        problems.append(Problem("index", reg.index_path, (), "; ".join(check)[:500] + f"; {DOCTOR_HINT}"))
    refs: dict[str, list[ExpertRecord]] = {}
    for rec in reg.records():
        refs.setdefault(rec.sha256, []).append(rec)
    for sha, recs in sorted(refs.items()):
        problem = _object_problem(reg, sha, recs)
        if problem is not None and problem.kind == "missing":
            # The list above is a snapshot: a concurrent remove may have deleted the row and then its object.
            recs = _still_indexed(reg, sha)
            problem = _object_problem(reg, sha, recs) if recs else None
        if problem is not None:
            problems.append(problem)
    for path in _object_files(reg):
        sha = path.name.removesuffix(OBJECT_SUFFIX)
        if sha in refs or (not path.name.startswith(".") and _still_indexed(reg, sha)):
            continue  # indexed, possibly by an add that committed after the snapshot
        what = "temporary file of an interrupted write" if path.name.startswith(".") else "unreferenced object"
        problems.append(Problem("orphan", path, (), f"{what}; harmless, `whisper-experts registry gc` removes it"))
    if bases:
        problems += base_problems(reg, [r for recs in refs.values() for r in recs])
    return problems


def base_problems(reg: Registry, records: list[ExpertRecord], home=None) -> list[Problem]:
    """Problems of the imported bases (``<home>/bases/<name>`` with a ``base.json``) that ``records`` name;
    bases named by a path or hub id, or not imported, are not checked here."""
    from registry.base_integrity import verify_base

    users: dict[str, list[str]] = {}
    for rec in records:
        name = rec.base_name
        if name and "/" not in name and "\\" not in name and name not in (".", ".."):  # a name, not a path
            users.setdefault(name, []).append(rec.ref)
    problems = []
    for name, refs in sorted(users.items()):
        directory = bases_dir(home) / name
        try:
            if not (directory / "base.json").is_file():
                continue
        except OSError:  # a home this user may not read: its bases are not this registry's problem
            continue
        shown = tuple(refs[:3]) + ((f"and {len(refs) - 3} more",) if len(refs) > 3 else ())
        problems += [Problem("base", directory, shown, detail) for detail in verify_base(directory)]
    return problems


@dataclass
class GcReport:
    """What :func:`gc` did: the files it deleted, and the temporary files it kept (a write may own them)."""

    removed: list[Path] = field(default_factory=list)
    kept_temporary: list[Path] = field(default_factory=list)


def gc(reg: Registry, temp_age: float = 3600.0) -> GcReport:
    """Delete orphan objects and the temporary files no write in progress can own: older than ``temp_age``
    seconds, or written by a process of this host that no longer runs (a killed writer). Younger temporary
    files of live or unknown writers are kept and listed (``temp_age=0`` deletes them too: only when no write is
    running)."""
    report = GcReport()
    if not reg.index_path.exists():
        return report
    used = {r[0] for r in reg._query("SELECT DISTINCT sha256 FROM experts")}
    orphans = set()
    now = time.time()
    for path in _object_files(reg):
        if path.name.startswith("."):
            try:
                if now - path.stat().st_mtime > temp_age or writer_is_dead(path):
                    path.unlink()
                    report.removed.append(path)
                else:
                    report.kept_temporary.append(path)
            except FileNotFoundError:
                pass  # its write finished (renamed it) meanwhile
        elif path.name.removesuffix(OBJECT_SUFFIX) not in used:
            orphans.add(path.name.removesuffix(OBJECT_SUFFIX))
    report.removed += reg._delete_unreferenced(orphans)
    return report
