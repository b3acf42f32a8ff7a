"""The expert registry: a local store of expert files with names, versions and tags.

Layout of a registry directory (default ``<home>/registry``, see :mod:`registry.home`)::

    <root>/objects/<sha[:2]>/<sha256>.safetensors   expert files, content-addressed by the sha256 of their bytes
    <root>/index.sqlite                             names, versions, tags and the manifest fields worth querying
    <root>/journal.jsonl                            every change to names, versions and tags (registry.journal)

An expert is referred to by a *spec*:

==================  ==============================================================================
``uk-espeak``       the highest version of that name (same as ``uk-espeak@latest``)
``uk-espeak@3``     version 3
``uk-espeak@best``  the version the tag ``best`` points at
``3f9a61c0``        the expert whose file's sha256 starts with these hex digits (at least 8);
                    a name always wins over a hash prefix that reads the same
``uk-espeak@all``   every version (only :meth:`Registry.remove` and remote push/pull accept it)
==================  ==============================================================================

Safety, which is the point of having a registry rather than a folder of files:

* Writes are atomic and ordered: the object file is written to a temporary file in its final directory,
  fsynced and renamed, the directory fsynced, and only then is the index row inserted, in one SQLite
  transaction. A crash at any point leaves every committed expert readable; the worst leftover is an
  unreferenced object, which :meth:`Registry.verify` reports and :meth:`Registry.gc` deletes.
* A lost or damaged index loses no expert: each transaction appends its names, versions and tags to the
  journal before it commits, and ``registry doctor`` rebuilds the index from the journal and the objects'
  own manifests (:mod:`registry.doctor`).
* Concurrent writers (threads or processes) lose nothing: each insert runs under ``BEGIN IMMEDIATE`` (the
  database write lock) in WAL mode with a busy timeout, so version numbers are assigned one at a time.
* Version numbers are never reused: after ``uk-espeak@3`` is removed the next add is ``@4``, so a config that
  pins ``uk-espeak@3`` can never silently get other weights.
* Names are validated and never become paths (objects are named by hash), so no name can escape the root.
* Every read re-hashes the object: a corrupt or truncated file is refused on load, naming the file.
* Files are parsed as safetensors (a JSON header and raw tensor bytes); nothing is ever unpickled.
* A registry this user cannot write is read read-only (:mod:`registry.index_db`), and says so; database
  failures (damaged file, full disk, read-only, locked) are :class:`RegistryIndexError` s naming the file and
  the fix, and leave the index as it was.

Remote mirrors (``push``/``pull`` through fsspec URLs) live in :mod:`registry.remote`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from registry.atomic import atomic_write_tagged, fsync_dir
from registry.expert_file import Expert, ExpertFormatError, expert_bytes, expert_from_bytes, read_expert_file
from registry.home import home_dir
from registry.index_db import (OBJECT_SUFFIX, RECORD_COLUMNS, SCHEMA_VERSION, Index, RegistryIndexError, insert_row,
                               object_path, rows_to_records, storage_error)
from registry.records import (SHA_PREFIX_PATTERN, ExpertNotFoundError, ExpertRecord, InvalidNameError, Problem,
                              sha256_file, validate_name, validate_tag)

__all__ = ["Registry", "RegistryIndexError", "OBJECT_SUFFIX", "SCHEMA_VERSION", "SHA_PREFIX_PATTERN", "Problem"]

LIST_HINT = "see `whisper-experts registry list`"
VERIFY_HINT = "run `whisper-experts registry verify`"
SMALL_BATCH = 4  # up to this many new objects are fsynced one by one; more are made durable by one os.sync


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")  # orders adds within a second


class Registry:
    """A local expert store: content-addressed ``.safetensors`` objects plus a SQLite index.

    Args:
        root: the registry directory (created on the first write). Default ``<home>/registry``, where home
            follows ``WHISPER_EXPERTS_HOME`` / ``--home`` (see :func:`registry.home.home_dir`).
        timeout: seconds a writer waits for another process's write lock before giving up.

    Example::

        reg = Registry()
        rec = reg.add(expert, "uk-espeak", tags=["best"])     # -> uk-espeak@1
        expert = reg.get("uk-espeak@latest")
        reg.find(language="uk", base="whisper-base")
    """

    def __init__(self, root: str | os.PathLike | None = None, *, timeout: float = 60.0):
        self.root = Path(root).expanduser() if root is not None else home_dir() / "registry"
        self.timeout = timeout
        self.index = Index(self.root, timeout)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ----------------------------------------------------------------------------------------- paths & SQL
    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @property
    def index_path(self) -> Path:
        return self.index.path

    @property
    def journal_path(self) -> Path:
        return self.index.journal_path

    @property
    def read_only(self) -> bool:
        """Whether reads had to open the index read-only (this user cannot write it, or the disk is full)."""
        return self.index.read_only

    def object_path(self, sha256: str) -> Path:
        """Where the object with this digest lives (whether or not it exists)."""
        return object_path(self.objects_dir, sha256)

    def _connect(self) -> sqlite3.Connection:
        return self.index.connect()

    def _ensure_schema(self) -> None:
        self.index.ensure_schema()

    def _write(self):
        """A write transaction (:meth:`registry.index_db.Index.write`)."""
        return self.index.write()

    def _query(self, sql: str, params=()) -> list[sqlite3.Row]:
        """Read rows; an absent registry reads as empty (reads never create the directory)."""
        return self.index.query(sql, params)

    def _select(self, where: str, params=(), con=None) -> list[ExpertRecord]:
        """Records of ``SELECT ... FROM experts e WHERE <where>`` (``where`` may end in ORDER BY / LIMIT)."""
        sql = f"SELECT {RECORD_COLUMNS} FROM experts e WHERE {where}"
        rows = con.execute(sql, params).fetchall() if con is not None else self._query(sql, params)
        return rows_to_records(rows, self.objects_dir)

    # ----------------------------------------------------------------------------------------------- add
    def add(self, expert: Expert | str | os.PathLike, name: str, tags=()) -> ExpertRecord:
        """Store an expert under ``name`` as its next version.

        Args:
            expert: an :class:`~registry.expert_file.Expert`, or the path of an expert file (its bytes are
                stored as they are, so the registry's copy is bit-identical to the file; its header is checked
                before the rest is read).
            name: see :func:`validate_name`.
            tags: tags to point at this version (moved from older versions that had them).

        Returns:
            The record. Adding content that is already a version of ``name`` (same bytes) creates no new
            version: the existing record is returned (with ``tags`` applied to it).
        """
        validate_name(name)
        tags = [validate_tag(t) for t in tags]
        if isinstance(expert, Expert):
            data, where = expert_bytes(expert), f"expert {name!r}"
        else:
            data, where = read_expert_file(expert), str(expert)
        return self.add_bytes(data, name, tags, where)

    def add_bytes(self, data: bytes, name: str, tags=(), where: str = "expert bytes") -> ExpertRecord:
        """Like :meth:`add`, for the content of an expert file already in memory (e.g. downloaded).

        Args:
            data: the whole file; it must parse as a valid expert (manifest and tensors) or nothing is written.
            where: the source, named in errors.
        """
        return self.add_many([(data, name, tags, where)])[0]

    def add_many(self, items) -> list[ExpertRecord]:
        """Add several experts in one transaction: all are added, or (on any error) none.

        Args:
            items: ``(data, name, tags, where)`` tuples, as :meth:`add_bytes` takes; added in this order (the
                same name twice gives two versions).

        Returns:
            The records, in the order of ``items``. A large batch's object files are made durable by one
            ``os.sync`` rather than one fsync each, before the index refers to them.
        """
        prepared = []
        for data, name, tags, where in items:
            validate_name(name)
            tags = [validate_tag(t) for t in tags]
            parsed = expert_from_bytes(data, where)  # refuse anything that is not a complete, valid expert
            prepared.append((hashlib.sha256(data).hexdigest(), data, name, tags, parsed))
        if not prepared:
            return []
        self._ensure_schema()
        self._write_objects([(sha, data) for sha, data, *_ in prepared])
        added = []
        with self._write() as txn:
            for sha, data, name, tags, parsed in prepared:
                # Under the write lock: a concurrent remove/gc may have deleted this object between our write
                # and the lock (it saw no row using it); put it back so the row we insert never points at nothing.
                self._ensure_object(sha, data)
                row = txn.execute("SELECT version FROM experts WHERE name = ? AND sha256 = ?", (name, sha)).fetchone()
                new = row is None
                version = self._insert_record(txn.con, name, sha, parsed, len(data)) if new else row[0]
                for tag in tags:
                    txn.execute("INSERT OR REPLACE INTO tags (name, tag, version) VALUES (?, ?, ?)",
                                (name, tag, version))
                rec = self._select("e.name = ? AND e.version = ?", (name, version), txn.con)[0]
                if new:
                    txn.log("add", name=name, version=version, sha256=sha, size=rec.size,
                            params=rec.num_parameters, added=rec.added, tags=tags)
                else:
                    for tag in tags:
                        txn.log("tag", name=name, tag=tag, version=version)
                added.append(rec)
        return added

    def _insert_record(self, con: sqlite3.Connection, name: str, sha: str, expert: Expert, size: int) -> int:
        """Insert the index row for a new version of ``name``; returns the version (inside the caller's txn)."""
        last = con.execute("SELECT last_version FROM names WHERE name = ?", (name,)).fetchone()
        version = (last[0] if last else 0) + 1
        con.execute("INSERT OR REPLACE INTO names (name, last_version) VALUES (?, ?)", (name, version))
        insert_row(con, name, version, sha, expert.manifest, size, expert.num_parameters, _now())
        return version

    def _object_ok(self, path: Path, sha: str, size: int) -> bool:
        try:
            return path.stat().st_size == size and sha256_file(path) == sha
        except OSError:
            return False

    def _write_object(self, sha: str, data: bytes) -> Path:
        """Write an object unless an intact copy exists (identical content deduplicates; a damaged copy is
        replaced, so re-adding an expert repairs what ``verify`` reported)."""
        path = self.object_path(sha)
        if not self._object_ok(path, sha, len(data)):
            try:
                atomic_write_tagged(path, data)
                fsync_dir(path.parent)  # the rename must be durable before the index row that refers to it
            except OSError as e:
                raise storage_error(e, path, "the expert object") from e
        return path

    def _write_objects(self, pairs: list[tuple[str, bytes]]) -> None:
        if len(pairs) <= SMALL_BATCH or not hasattr(os, "sync"):
            for sha, data in pairs:
                self._write_object(sha, data)
            return
        for sha, data in pairs:
            path = self.object_path(sha)
            if not self._object_ok(path, sha, len(data)):
                try:
                    atomic_write_tagged(path, data, fsync=False)
                except OSError as e:
                    raise storage_error(e, path, "the expert object") from e
        os.sync()  # every file and rename of the batch durable before the index refers to them

    def _ensure_object(self, sha: str, data: bytes) -> None:
        path = self.object_path(sha)
        if not path.exists():
            self._write_object(sha, data)

    # ------------------------------------------------------------------------------------------- lookups
    def records(self) -> list[ExpertRecord]:
        """Every version of every expert, by name then version."""
        return self._select("1 ORDER BY e.name, e.version")

    def names(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT name FROM experts ORDER BY name")]

    def resolve(self, spec: str) -> ExpertRecord:
        """The record a spec names (see the module docstring for spec forms).

        Raises:
            ExpertNotFoundError: nothing matches (the message suggests close names).
            InvalidNameError: the spec is malformed, or ``@all`` where one version is needed.
        """
        records = self.resolve_all(spec)
        if len(records) != 1:
            raise InvalidNameError(f"{spec!r} names {len(records)} versions; name one version (e.g. "
                                   f"{records[0].name}@latest)")
        return records[0]

    def resolve_all(self, spec: str) -> list[ExpertRecord]:
        """Every record a spec names: one, or all versions for ``name@all``."""
        if not isinstance(spec, str) or not spec:
            raise InvalidNameError(f"empty expert spec; {LIST_HINT}")
        name, _, selector = spec.partition("@")
        # One indexed lookup per form, so resolving stays fast however many versions and names there are.
        if selector in ("", "latest"):
            hit = self._select("e.name = ? ORDER BY e.version DESC LIMIT 1", (name,))
        elif selector == "all":
            hit = self._select("e.name = ? ORDER BY e.version", (name,))
        elif selector.isascii() and selector.isdigit():
            hit = self._select("e.name = ? AND e.version = ?", (name, int(selector)))
        else:
            hit = self._select("e.name = ? AND e.version = (SELECT version FROM tags WHERE name = ? AND tag = ?)",
                               (name, name, selector))
        if hit:
            return hit
        versions = [r[0] for r in self._query("SELECT version FROM experts WHERE name = ? ORDER BY version", (name,))]
        if not versions:
            if not selector and SHA_PREFIX_PATTERN.fullmatch(name):
                # Hex digits sort below "g": the range is exactly the digests starting with the prefix.
                hits = self._select("e.sha256 >= ? AND e.sha256 < ? ORDER BY e.added DESC, e.name, e.version",
                                    (name, name + "g"))
                if len({h.sha256 for h in hits}) > 1:
                    raise InvalidNameError(f"hash prefix {name!r} is ambiguous ({len(hits)} experts); give more digits")
                if hits:
                    return hits[:1]  # same bytes under several names: any one will do
            self._not_found(name)
        tags = [t[0] for t in self._query("SELECT tag FROM tags WHERE name = ? ORDER BY tag", (name,))]
        raise ExpertNotFoundError(
            f"expert {name!r} has no version or tag {selector!r}; versions: "
            f"{', '.join(map(str, versions))}; tags: {', '.join(tags) or '(none)'}; {LIST_HINT}"
        )

    def _not_found(self, name: str):
        validate_name(name, "expert name")  # a malformed spec gets the naming rule, not "not found"
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ExpertNotFoundError(f"no expert named {name!r} in the registry at {self.root}{hint} ({LIST_HINT})")

    def read_bytes(self, spec_or_record: str | ExpertRecord) -> bytes:
        """The object file's bytes, after checking they hash to the recorded sha256.

        Raises:
            ExpertFormatError: the file is missing, truncated or corrupt (names the file and the fix).
        """
        rec = spec_or_record if isinstance(spec_or_record, ExpertRecord) else self.resolve(spec_or_record)
        path = self.object_path(rec.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ExpertFormatError(f"{rec.ref}: object file {path} is missing; {VERIFY_HINT}, then re-add or "
                                    "pull the expert") from None
        self._check_digest(rec, path, hashlib.sha256(data).hexdigest(), len(data))
        return data

    def _check_digest(self, rec: ExpertRecord, path: Path, found: str, size: int) -> None:
        if found != rec.sha256:
            raise ExpertFormatError(
                f"{rec.ref}: object file {path} is corrupt or truncated (expected sha256 {rec.sha256}, "
                f"{rec.size} bytes; found {found}, {size} bytes); {VERIFY_HINT}, then re-add or pull the expert"
            )

    def read_manifest(self, spec_or_record: str | ExpertRecord) -> dict:
        """An expert's manifest from its object's header, after checking the whole file's sha256 (streamed,
        so a large expert is never held in memory)."""
        from registry.expert_file import manifest_from_file

        rec = spec_or_record if isinstance(spec_or_record, ExpertRecord) else self.resolve(spec_or_record)
        path = self.object_path(rec.sha256)
        try:
            with open(path, "rb") as f:
                found = hashlib.file_digest(f, "sha256").hexdigest()
                self._check_digest(rec, path, found, f.tell())
                f.seek(0)
                return manifest_from_file(f, str(path))
        except FileNotFoundError:
            raise ExpertFormatError(f"{rec.ref}: object file {path} is missing; {VERIFY_HINT}, then re-add or "
                                    "pull the expert") from None

    def get(self, spec: str) -> Expert:
        """Load an expert (tensors on CPU) by spec; the file's hash is checked first."""
        rec = self.resolve(spec)
        return expert_from_bytes(self.read_bytes(rec), str(rec.path))

    def find(self, language: str | None = None, base: str | None = None, kind: str | None = None,
             name: str | None = None, latest_only: bool = True) -> list[ExpertRecord]:
        """Records matching every filter given (compared exactly: no wildcards).

        Args:
            language: a Whisper code the expert serves.
            base: a base name (as recorded) or a prefix of its weight fingerprint.
            kind: ``lora``, ``clsr``, ...
            name: an exact expert name.
            latest_only: keep only the highest *matching* version of each name (so ``find(base=...)`` gives
                the newest expert usable on that base even if a later version moved to another base).
        """
        clauses, params = [], []
        if kind:
            clauses, params = clauses + ["e.kind = ?"], params + [kind]
        if name:
            clauses, params = clauses + ["e.name = ?"], params + [name]
        if base:  # substr, not LIKE: '%' and '_' in a base name are characters, not wildcards
            clauses.append("(e.base_name = ? OR substr(e.base_fingerprint, 1, ?) = ?)")
            params += [base, len(base), base]
        if language:
            clauses.append("EXISTS (SELECT 1 FROM json_each(e.languages) WHERE json_each.value = ?)")
            params.append(language)
        where = " AND ".join(clauses) or "1"
        # Filtering on columns the (name, version) key does not hold: one pass over the table and a sort beats
        # walking the key in order with a table lookup per row, which SQLite otherwise picks (3-4x slower at
        # 10,000 experts).
        table = "experts e NOT INDEXED" if (base or language) and not name else "experts e"
        if not latest_only:
            sql = f"SELECT {RECORD_COLUMNS} FROM {table} WHERE {where} ORDER BY e.name, e.version"
            return rows_to_records(self._query(sql, params), self.objects_dir)
        # The newest matching version per name first, then records (and their tags) for those rows only.
        sql = (f"WITH newest AS (SELECT e.name AS name, MAX(e.version) AS version FROM {table} WHERE {where} "
               f"GROUP BY e.name) SELECT {RECORD_COLUMNS} FROM newest n JOIN experts e ON e.name = n.name AND "
               "e.version = n.version ORDER BY e.name")
        return rows_to_records(self._query(sql, params), self.objects_dir)

    # ------------------------------------------------------------------------------------------ changes
    def tag(self, spec: str, tag: str) -> ExpertRecord:
        """Point ``tag`` at the version ``spec`` names (moving it from another version of the same name)."""
        validate_tag(tag)
        rec = self.resolve(spec)
        with self._write() as txn:
            if txn.execute("SELECT 1 FROM experts WHERE name = ? AND version = ?",
                           (rec.name, rec.version)).fetchone() is None:
                raise ExpertNotFoundError(f"{rec.ref} was removed meanwhile; {LIST_HINT}")
            txn.execute("INSERT OR REPLACE INTO tags (name, tag, version) VALUES (?, ?, ?)",
                        (rec.name, tag, rec.version))
            txn.log("tag", name=rec.name, tag=tag, version=rec.version)
        return self.resolve(f"{rec.name}@{rec.version}")

    def untag(self, name: str, tag: str) -> None:
        """Remove a tag (the version it pointed at stays)."""
        validate_name(name)
        validate_tag(tag)
        with self._write() as txn:
            if txn.execute("DELETE FROM tags WHERE name = ? AND tag = ?", (name, tag)).rowcount:
                txn.log("untag", name=name, tag=tag)

    def remove(self, spec: str, all_versions: bool = False) -> list[ExpertRecord]:
        """Remove one version (or every version, with ``name@all`` or ``all_versions=True``).

        Object files no other version uses are deleted. Returns the removed records.
        """
        if all_versions and "@" not in spec:
            spec = f"{spec}@all"
        records = self.resolve_all(spec)
        with self._write() as txn:
            for rec in records:
                if txn.execute("DELETE FROM experts WHERE name = ? AND version = ?", (rec.name, rec.version)).rowcount:
                    txn.log("remove", name=rec.name, version=rec.version)
                txn.execute("DELETE FROM tags WHERE name = ? AND version = ?", (rec.name, rec.version))
        self._delete_unreferenced({r.sha256 for r in records})
        return records

    def _delete_unreferenced(self, shas) -> list[Path]:
        """Delete objects among ``shas`` that no row uses, holding the write lock so that no add can index one
        of them meanwhile (an add re-checks its object under the same lock)."""
        removed = []
        with self._write() as txn:
            for sha in shas:
                if txn.execute("SELECT 1 FROM experts WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() is None:
                    path = self.object_path(sha)
                    try:
                        path.unlink()
                        removed.append(path)
                    except FileNotFoundError:
                        pass
        return removed

    # --------------------------------------------------------------------------- verify, gc and repair
    def verify(self, bases: bool = True) -> list[Problem]:
        """Re-hash every object and check the index (and, with ``bases``, the imported bases the experts
        name); returns the problems (empty when all is well). See :func:`registry.integrity.verify`."""
        from registry.integrity import verify

        return verify(self, bases=bases)

    def gc(self, temp_age: float = 3600.0) -> list[Path]:
        """Delete orphan objects, and temporary files older than ``temp_age`` seconds or whose writer died;
        see :func:`registry.integrity.gc`."""
        from registry.integrity import gc

        return gc(self, temp_age).removed

    def doctor(self, rebuild: bool = False, check: bool = False):
        """Check the index against the journal and repair whichever is behind; see
        :func:`registry.doctor.doctor`."""
        from registry.doctor import doctor

        return doctor(self, rebuild=rebuild, check=check)

    # ----------------------------------------------------------------------------------------- mirrors
    def push(self, url: str, specs=None) -> list[dict]:
        """Copy experts to a remote mirror (an fsspec URL); see :func:`registry.remote.push`."""
        from registry.remote import push

        return push(self, url, specs)

    def pull(self, url: str, specs=None) -> list[ExpertRecord]:
        """Copy experts from a remote mirror, verifying hashes; see :func:`registry.remote.pull`."""
        from registry.remote import pull

        return pull(self, url, specs)

