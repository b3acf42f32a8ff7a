"""The expert registry: a local store of expert files with names, versions and tags.

Layout of a registry directory (default ``<home>/registry``, see :mod:`registry.home`)::

    <root>/objects/<sha[:2]>/<sha256>.safetensors   expert files, content-addressed by the sha256 of their bytes
    <root>/index.sqlite                             names, versions, tags and the manifest fields worth querying

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
* Concurrent writers (threads or processes) lose nothing: each insert runs under ``BEGIN IMMEDIATE`` (the
  database write lock) in WAL mode with a busy timeout, so version numbers are assigned one at a time.
* Version numbers are never reused: after ``uk-espeak@3`` is removed the next add is ``@4``, so a config that
  pins ``uk-espeak@3`` can never silently get other weights.
* Names are validated and never become paths (objects are named by hash), so no name can escape the root.
* Every read re-hashes the object: a corrupt or truncated file is refused on load, naming the file.
* Files are parsed as safetensors (a JSON header and raw tensor bytes); nothing is ever unpickled.

Remote mirrors (``push``/``pull`` through fsspec URLs) live in :mod:`registry.remote`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sqlite3
import time
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from registry.atomic import atomic_write_bytes, fsync_dir
from registry.expert_file import (
    Expert,
    ExpertFormatError,
    expert_bytes,
    expert_from_bytes,
)
from registry.home import ensure_writable, home_dir
from registry.records import (
    ExpertNotFoundError,
    ExpertRecord,
    InvalidNameError,
    Problem,
    sha256_file,
    validate_name,
    validate_tag,
)

SCHEMA_VERSION = 1
SHA_PREFIX_PATTERN = re.compile(r"^[0-9a-f]{8,64}$")
OBJECT_SUFFIX = ".safetensors"
LIST_HINT = "see `whisper-experts registry list`"
VERIFY_HINT = "run `whisper-experts registry verify`"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- last_version survives removals so that version numbers are never reused.
CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    languages TEXT NOT NULL,          -- JSON list
    base_name TEXT,
    base_fingerprint TEXT NOT NULL,
    tokenizer_fingerprint TEXT,
    metrics TEXT NOT NULL,            -- JSON object
    lineage TEXT NOT NULL,            -- JSON object
    hyperparameters TEXT NOT NULL,    -- JSON object
    size INTEGER NOT NULL,
    num_parameters INTEGER NOT NULL,
    created TEXT,                     -- from the manifest: when the expert was made
    added TEXT NOT NULL,              -- when it entered this registry
    PRIMARY KEY (name, version),
    UNIQUE (name, sha256)
);
CREATE INDEX IF NOT EXISTS experts_sha256 ON experts (sha256);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, tag)
);
"""


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
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ----------------------------------------------------------------------------------------- paths & SQL
    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite"

    def object_path(self, sha256: str) -> Path:
        """Where the object with this digest lives (whether or not it exists)."""
        return self.objects_dir / sha256[:2] / f"{sha256}{OBJECT_SUFFIX}"

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken before reading
        # the last version number (a deferred transaction could read, then fail to upgrade to a writer).
        con = sqlite3.connect(self.index_path, timeout=self.timeout, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        con.execute("PRAGMA synchronous = FULL")  # a committed expert survives power loss, not just a crash
        return con

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        ensure_writable(self.root, "the expert registry",
                        "choose another registry (--registry DIR, or --home / WHISPER_EXPERTS_HOME)")
        self.objects_dir.mkdir(exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with closing(self._connect()) as con:
                    # Switching to WAL needs a moment of exclusive access; when several processes create the
                    # registry at once the losers see "locked" and retry (the mode then persists in the file).
                    con.execute("PRAGMA journal_mode = WAL")
                    con.execute("BEGIN IMMEDIATE")
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    found = int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
                    con.execute("COMMIT")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if found > SCHEMA_VERSION:
            raise ExpertFormatError(f"{self.index_path}: registry schema {found} is newer than this package "
                                    f"understands ({SCHEMA_VERSION}); upgrade whisper-experts")
        self._schema_ready = True

    @contextmanager
    def _write(self):
        """A connection inside ``BEGIN IMMEDIATE``: committed on success, rolled back on any error."""
        self._ensure_schema()
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params=()) -> list[sqlite3.Row]:
        """Read rows; an absent registry reads as empty (reads never create the directory)."""
        if not self.index_path.exists():
            return []
        with closing(self._connect()) as con:
            return con.execute(sql, params).fetchall()

    def _records(self, rows, con_or_none=None) -> list[ExpertRecord]:
        if not rows:
            return []
        tag_rows = (con_or_none.execute("SELECT name, tag, version FROM tags").fetchall() if con_or_none
                    else self._query("SELECT name, tag, version FROM tags"))
        tags: dict[tuple[str, int], list[str]] = {}
        for t in tag_rows:
            tags.setdefault((t["name"], t["version"]), []).append(t["tag"])
        return [ExpertRecord(
            name=r["name"], version=r["version"], sha256=r["sha256"], kind=r["kind"],
            languages=tuple(json.loads(r["languages"])), base_name=r["base_name"],
            base_fingerprint=r["base_fingerprint"], tokenizer_fingerprint=r["tokenizer_fingerprint"],
            metrics=json.loads(r["metrics"]), lineage=json.loads(r["lineage"]),
            hyperparameters=json.loads(r["hyperparameters"]), size=r["size"], num_parameters=r["num_parameters"],
            created=r["created"], added=r["added"], tags=tuple(sorted(tags.get((r["name"], r["version"]), []))),
            path=self.object_path(r["sha256"]),
        ) for r in rows]

    # ----------------------------------------------------------------------------------------------- add
    def add(self, expert: Expert | str | os.PathLike, name: str, tags=()) -> ExpertRecord:
        """Store an expert under ``name`` as its next version.

        Args:
            expert: an :class:`~registry.expert_file.Expert`, or the path of an expert file (its bytes are
                stored as they are, so the registry's copy is bit-identical to the file).
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
            where = str(expert)
            try:
                data = Path(expert).read_bytes()
            except FileNotFoundError:
                raise ExpertFormatError(f"expert file {where} does not exist") from None
        return self.add_bytes(data, name, tags, where)

    def add_bytes(self, data: bytes, name: str, tags=(), where: str = "expert bytes") -> ExpertRecord:
        """Like :meth:`add`, for the content of an expert file already in memory (e.g. downloaded).

        Args:
            data: the whole file; it must parse as a valid expert (manifest and tensors) or nothing is written.
            where: the source, named in errors.
        """
        validate_name(name)
        parsed = expert_from_bytes(data, where)  # refuse anything that is not a complete, valid expert
        sha = hashlib.sha256(data).hexdigest()
        self._ensure_schema()
        self._write_object(sha, data)
        with self._write() as con:
            # Under the write lock: a concurrent remove/gc may have deleted this object between our write and
            # the lock (it saw no row using it); put it back so the row we insert never points at nothing.
            self._ensure_object(sha, data)
            row = con.execute("SELECT * FROM experts WHERE name = ? AND sha256 = ?", (name, sha)).fetchone()
            if row is None:
                version = self._insert_record(con, name, sha, parsed, len(data))
            else:
                version = row["version"]
            for tag in tags:
                con.execute("INSERT OR REPLACE INTO tags (name, tag, version) VALUES (?, ?, ?)", (name, tag, version))
            row = con.execute("SELECT * FROM experts WHERE name = ? AND version = ?", (name, version)).fetchone()
            return self._records([row], con)[0]

    def _insert_record(self, con: sqlite3.Connection, name: str, sha: str, expert: Expert, size: int) -> int:
        """Insert the index row for a new version of ``name``; returns the version (inside the caller's txn)."""
        last = con.execute("SELECT last_version FROM names WHERE name = ?", (name,)).fetchone()
        version = (last[0] if last else 0) + 1
        con.execute("INSERT OR REPLACE INTO names (name, last_version) VALUES (?, ?)", (name, version))
        m = expert.manifest
        base = m["base"]
        con.execute(
            "INSERT INTO experts (name, version, sha256, kind, languages, base_name, base_fingerprint, "
            "tokenizer_fingerprint, metrics, lineage, hyperparameters, size, num_parameters, created, added) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, sha, m["kind"], json.dumps(list(m["languages"])), base.get("name"), base["fingerprint"],
             base.get("tokenizer_fingerprint"), json.dumps(m.get("metrics") or {}, sort_keys=True),
             json.dumps(m.get("lineage") or {}, sort_keys=True),
             json.dumps(m.get("hyperparameters") or {}, sort_keys=True), size, expert.num_parameters,
             m.get("created"), _now()),
        )
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
            atomic_write_bytes(path, data)
            fsync_dir(path.parent)  # the rename must be durable before the index row that refers to it
        return path

    def _ensure_object(self, sha: str, data: bytes) -> None:
        path = self.object_path(sha)
        if not path.exists():
            self._write_object(sha, data)

    # ------------------------------------------------------------------------------------------- lookups
    def records(self) -> list[ExpertRecord]:
        """Every version of every expert, by name then version."""
        return self._records(self._query("SELECT * FROM experts ORDER BY name, version"))

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
        rows = self._query("SELECT * FROM experts WHERE name = ? ORDER BY version", (name,))
        if not rows:
            if not selector and SHA_PREFIX_PATTERN.match(name):
                hits = self._query("SELECT * FROM experts WHERE sha256 LIKE ? ORDER BY added DESC, name, version",
                                   (name + "%",))
                if len({h["sha256"] for h in hits}) > 1:
                    raise InvalidNameError(f"hash prefix {name!r} is ambiguous ({len(hits)} experts); give more digits")
                if hits:
                    return self._records(hits[:1])  # same bytes under several names: any one will do
            self._not_found(name)
        if selector in ("", "latest"):
            return self._records(rows[-1:])
        if selector == "all":
            return self._records(rows)
        if selector.isdigit():
            hit = [r for r in rows if r["version"] == int(selector)]
        else:
            tag = self._query("SELECT version FROM tags WHERE name = ? AND tag = ?", (name, selector))
            hit = [r for r in rows if tag and r["version"] == tag[0]["version"]]
        if not hit:
            tags = [t["tag"] for t in self._query("SELECT tag FROM tags WHERE name = ? ORDER BY tag", (name,))]
            raise ExpertNotFoundError(
                f"expert {name!r} has no version or tag {selector!r}; versions: "
                f"{', '.join(str(r['version']) for r in rows)}; tags: {', '.join(tags) or '(none)'}; {LIST_HINT}"
            )
        return self._records(hit)

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
        found = hashlib.sha256(data).hexdigest()
        if found != rec.sha256:
            raise ExpertFormatError(
                f"{rec.ref}: object file {path} is corrupt or truncated (expected sha256 {rec.sha256}, "
                f"{rec.size} bytes; found {found}, {len(data)} bytes); {VERIFY_HINT}, then re-add or pull the expert"
            )
        return data

    def get(self, spec: str) -> Expert:
        """Load an expert (tensors on CPU) by spec; the file's hash is checked first."""
        rec = self.resolve(spec)
        return expert_from_bytes(self.read_bytes(rec), str(rec.path))

    def find(self, language: str | None = None, base: str | None = None, kind: str | None = None,
             name: str | None = None, latest_only: bool = True) -> list[ExpertRecord]:
        """Records matching every filter given.

        Args:
            language: a Whisper code the expert serves.
            base: a base name (as recorded) or a prefix of its weight fingerprint.
            kind: ``lora``, ``clsr``, ...
            name: an exact expert name.
            latest_only: keep only the highest *matching* version of each name (so ``find(base=...)`` gives
                the newest expert usable on that base even if a later version moved to another base).
        """
        sql, params = "SELECT * FROM experts WHERE 1", []
        if kind:
            sql, params = sql + " AND kind = ?", params + [kind]
        if name:
            sql, params = sql + " AND name = ?", params + [name]
        if base:
            sql, params = sql + " AND (base_name = ? OR base_fingerprint LIKE ?)", params + [base, f"{base}%"]
        rows = self._query(sql + " ORDER BY name, version", params)
        if language:
            rows = [r for r in rows if language in json.loads(r["languages"])]
        if latest_only:
            newest = {r["name"]: r for r in rows}  # rows are in version order: the last one wins
            rows = [r for r in rows if newest[r["name"]] is r]
        return self._records(rows)

    # ------------------------------------------------------------------------------------------ changes
    def tag(self, spec: str, tag: str) -> ExpertRecord:
        """Point ``tag`` at the version ``spec`` names (moving it from another version of the same name)."""
        validate_tag(tag)
        rec = self.resolve(spec)
        with self._write() as con:
            if con.execute("SELECT 1 FROM experts WHERE name = ? AND version = ?", (rec.name, rec.version)).fetchone() is None:
                raise ExpertNotFoundError(f"{rec.ref} was removed meanwhile; {LIST_HINT}")
            con.execute("INSERT OR REPLACE INTO tags (name, tag, version) VALUES (?, ?, ?)", (rec.name, tag, rec.version))
        return self.resolve(f"{rec.name}@{rec.version}")

    def untag(self, name: str, tag: str) -> None:
        """Remove a tag (the version it pointed at stays)."""
        with self._write() as con:
            con.execute("DELETE FROM tags WHERE name = ? AND tag = ?", (name, tag))

    def remove(self, spec: str, all_versions: bool = False) -> list[ExpertRecord]:
        """Remove one version (or every version, with ``name@all`` or ``all_versions=True``).

        Object files no other version uses are deleted. Returns the removed records.
        """
        if all_versions and "@" not in spec:
            spec = f"{spec}@all"
        records = self.resolve_all(spec)
        with self._write() as con:
            for rec in records:
                con.execute("DELETE FROM experts WHERE name = ? AND version = ?", (rec.name, rec.version))
                con.execute("DELETE FROM tags WHERE name = ? AND version = ?", (rec.name, rec.version))
        self._delete_unreferenced({r.sha256 for r in records})
        return records

    def _delete_unreferenced(self, shas) -> list[Path]:
        """Delete objects among ``shas`` that no row uses, holding the write lock so that no add can index one
        of them meanwhile (an add re-checks its object under the same lock)."""
        removed = []
        with self._write() as con:
            for sha in shas:
                if con.execute("SELECT 1 FROM experts WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() is None:
                    path = self.object_path(sha)
                    try:
                        path.unlink()
                        removed.append(path)
                    except FileNotFoundError:
                        pass
        return removed

    # ------------------------------------------------------------------------------------ verify and gc
    def verify(self) -> list[Problem]:
        """Re-hash every object and check the index; returns the problems (empty when all is well). See
        :func:`registry.integrity.verify`."""
        from registry.integrity import verify

        return verify(self)

    def gc(self, temp_age: float = 3600.0) -> list[Path]:
        """Delete orphan objects, and temporary files older than ``temp_age`` seconds; see
        :func:`registry.integrity.gc`."""
        from registry.integrity import gc

        return gc(self, temp_age)

    # ----------------------------------------------------------------------------------------- mirrors
    def push(self, url: str, specs=None) -> list[dict]:
        """Copy experts to a remote mirror (an fsspec URL); see :func:`registry.remote.push`."""
        from registry.remote import push

        return push(self, url, specs)

    def pull(self, url: str, specs=None) -> list[ExpertRecord]:
        """Copy experts from a remote mirror, verifying hashes; see :func:`registry.remote.pull`."""
        from registry.remote import pull

        return pull(self, url, specs)
