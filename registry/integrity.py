"""Checking and cleaning a registry directory: ``verify`` re-hashes every object and checks the index, ``gc``
deletes what no index row refers to.

Both work on a :class:`registry.store.Registry` (its methods of the same names call these). Neither changes a
committed expert: ``verify`` only reads, and ``gc`` deletes orphan objects under the registry's write lock (an
add re-checks its object under the same lock) and temporary files old enough not to belong to a write in
progress.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

from registry.expert_file import ExpertFormatError, manifest_from_bytes
from registry.records import ExpertRecord, Problem, sha256_file
from registry.store import OBJECT_SUFFIX, Registry


def _object_files(reg: Registry) -> list[Path]:
    """Every file under the registry's ``objects/`` (indexed or not, temporary files included)."""
    if not reg.objects_dir.is_dir():
        return []
    return sorted(p for p in reg.objects_dir.glob("*/*") if p.is_file())


def _object_problem(reg: Registry, sha: str, recs: list[ExpertRecord]) -> Problem | None:
    """What is wrong with one indexed object, or None: missing, wrong size, wrong hash, unreadable manifest."""
    path, names, size = reg.object_path(sha), tuple(r.ref for r in recs), recs[0].size
    if not path.is_file():
        return Problem("missing", path, names, "object file does not exist")
    found_size = path.stat().st_size
    if found_size != size:
        return Problem("size", path, names, f"expected {size} bytes, found {found_size} (truncated or overwritten)")
    found = sha256_file(path)
    if found != sha:
        return Problem("hash", path, names, f"expected sha256 {sha}, found {found} (corrupt)")
    try:
        manifest_from_bytes(path.read_bytes(), str(path))
    except ExpertFormatError as e:
        return Problem("manifest", path, names, str(e))
    return None


def verify(reg: Registry) -> list[Problem]:
    """Re-hash every object and check the index; returns the problems (empty when all is well).

    Checks: SQLite integrity; each indexed object exists, has the recorded size and sha256, and parses as an
    expert; files under ``objects/`` that no row refers to (orphans, including temporary files left by an
    interrupted write) are reported too, though they are harmless.
    """
    problems: list[Problem] = []
    if not reg.index_path.exists():
        return problems
    with closing(reg._connect()) as con:
        check = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
    if check != ["ok"]:
        problems.append(Problem("index", reg.index_path, (), "; ".join(check)[:500]))
    refs: dict[str, list[ExpertRecord]] = {}
    for rec in reg.records():
        refs.setdefault(rec.sha256, []).append(rec)
    for sha, recs in sorted(refs.items()):
        problem = _object_problem(reg, sha, recs)
        if problem is not None:
            problems.append(problem)
    for path in _object_files(reg):
        if path.name.removesuffix(OBJECT_SUFFIX) not in refs:
            what = "temporary file of an interrupted write" if path.name.startswith(".") else "unreferenced object"
            problems.append(Problem("orphan", path, (), f"{what}; harmless, `whisper-experts registry gc` removes it"))
    return problems


def gc(reg: Registry, temp_age: float = 3600.0) -> list[Path]:
    """Delete orphan objects, and temporary files older than ``temp_age`` seconds (younger ones may belong to
    a write in progress). Returns the deleted paths."""
    if not reg.index_path.exists():
        return []
    removed = []
    used = {r[0] for r in reg._query("SELECT DISTINCT sha256 FROM experts")}
    orphans = set()
    for path in _object_files(reg):
        if path.name.startswith("."):
            try:
                if time.time() - path.stat().st_mtime > temp_age:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass
        elif path.name.removesuffix(OBJECT_SUFFIX) not in used:
            orphans.add(path.name.removesuffix(OBJECT_SUFFIX))
    return removed + reg._delete_unreferenced(orphans)
