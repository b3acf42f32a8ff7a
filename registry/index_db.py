"""The registry's SQLite index: schema, connections and the errors a user can act on.

Three ways to open the index, tried in this order by readers (:func:`open_reader`):

``rw``         the normal connection (WAL mode, busy timeout, ``synchronous = FULL``);
``ro``         ``file:...?mode=ro``: for a registry this user may read but not write (a shared, read-only
               directory); SQLite still takes its shared locks, so a concurrent writer is seen consistently;
``immutable``  ``mode=ro&immutable=1``: when even the lock files cannot be created (a read-only directory with
               no ``-shm`` file, a full disk). Used only when there is no uncommitted write-ahead log to miss,
               since an immutable reader does not read it.

Every ``sqlite3.Error`` leaves this package as a :class:`RegistryIndexError` whose message names the file and
the fix (a damaged file, a read-only registry, a full disk, a lock held too long); it is still an
``sqlite3.OperationalError``, and a ``RuntimeError``, which the command line prints as one ``error:`` line.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from urllib.parse import quote

from registry.records import ExpertRecord

SCHEMA_VERSION = 1
OBJECT_SUFFIX = ".safetensors"
DOCTOR_HINT = "run `whisper-experts registry doctor` to rebuild it from the journal and the objects"
READ_MODES = ("rw", "ro", "immutable")

SCHEMA = """
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
-- find(base=..., kind=...) on a large registry; languages are matched in SQL with json_each.
CREATE INDEX IF NOT EXISTS experts_base_name ON experts (base_name);
CREATE INDEX IF NOT EXISTS experts_base_fingerprint ON experts (base_fingerprint);
CREATE INDEX IF NOT EXISTS experts_kind ON experts (kind);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, tag)
);
CREATE INDEX IF NOT EXISTS tags_version ON tags (name, version);
"""

# Every record query selects this: the row plus its tags, so a record costs one indexed lookup, not a read of
# every tag in the registry. Tags never contain spaces (see registry.records.validate_tag).
RECORD_COLUMNS = ("e.*, (SELECT group_concat(t.tag, ' ') FROM tags t WHERE t.name = e.name "
                  "AND t.version = e.version) AS tag_list")


class RegistryIndexError(sqlite3.OperationalError, RuntimeError):
    """The index cannot be opened, read or written: damaged, read-only, disk full, locked. The message names
    the file and what to do; a failed write changed nothing in the index (its transaction rolled back)."""


def _damaged(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return isinstance(e, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text
                                                     or "encrypted" in text or "corrupt" in text)


def _unopenable(e: sqlite3.Error) -> bool:
    """Errors a read-only or immutable connection may avoid: the ones about writing lock or log files."""
    text = str(e).lower()
    return any(s in text for s in ("unable to open", "readonly", "read-only", "disk i/o error", "disk is full"))


def index_error(e: sqlite3.Error, path: Path, *, writing: bool) -> RegistryIndexError:
    """A :class:`RegistryIndexError` for ``e``, whose message says what happened to ``path`` and the fix."""
    if isinstance(e, RegistryIndexError):
        return e
    msg, text = str(e), str(e).lower()
    unchanged = " The index was not changed." if writing else ""
    if _damaged(e):
        return RegistryIndexError(f"the registry index {path} is damaged ({msg}); {DOCTOR_HINT}")
    if "disk is full" in text or "disk i/o error" in text:
        return RegistryIndexError(
            f"cannot {'write' if writing else 'read'} the registry index {path} ({msg}): the disk is full or "
            f"failing, or a file-size limit (ulimit -f) was hit; free space on {path.parent} and retry.{unchanged}")
    if "readonly" in text or "read-only" in text:
        return RegistryIndexError(
            f"the registry index {path} is read-only for this user ({msg}); this action changes the registry: "
            "run it as the registry's owner, or pull the experts into a registry you can write "
            f"(--registry DIR).{unchanged}")
    if "unable to open" in text:
        return RegistryIndexError(
            f"cannot open the registry index {path} ({msg}): check that {path.parent} exists and this user may "
            "read it (and write it, for changes), or choose another registry with --registry DIR")
    if "locked" in text or "busy" in text:
        return RegistryIndexError(f"the registry index {path} is locked by another process ({msg}); retry when "
                                  f"that process has finished.{unchanged}")
    return RegistryIndexError(f"registry index {path}: {msg}.{unchanged}")


def connect(path: Path, timeout: float, mode: str = "rw") -> sqlite3.Connection:
    """A connection to the index in one of :data:`READ_MODES` (autocommit: callers issue BEGIN themselves)."""
    if mode == "rw":
        con = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    else:
        uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if mode == "immutable" else "")
        con = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    if mode == "rw":
        con.execute("PRAGMA synchronous = FULL")  # a committed expert survives power loss, not just a crash
    return con


def _has_wal(path: Path) -> bool:
    wal = path.with_name(path.name + "-wal")
    try:
        return wal.stat().st_size > 0
    except OSError:
        return False


def open_reader(path: Path, timeout: float, start: str = "rw") -> tuple[sqlite3.Connection, str, str | None]:
    """Open the index for reading, falling back from ``rw`` to ``ro`` to ``immutable`` (from ``start`` on).

    Returns:
        ``(connection, mode, why)``: ``why`` is the error that made a read-write connection fail (None in
        ``rw`` mode), for telling the user the registry was opened read-only.

    Raises:
        RegistryIndexError: damaged (no fallback can help), or no mode could read it.
    """
    first: sqlite3.Error | None = None
    for mode in READ_MODES[READ_MODES.index(start):]:
        if mode == "immutable" and _has_wal(path):
            break  # an immutable reader would miss committed transactions still in the log
        con = None
        try:
            con = connect(path, timeout, mode)
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the file and its WAL index
            return con, mode, None if mode == "rw" else str(first)
        except sqlite3.Error as e:
            if con is not None:
                con.close()
            if _damaged(e) or not _unopenable(e):
                raise index_error(e, path, writing=False) from e
            first = first or e
    assert first is not None
    raise index_error(first, path, writing=False) from first


def create_schema(con: sqlite3.Connection) -> int:
    """Create missing tables and indexes (inside the caller's transaction); returns the stored schema version."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])


def object_path(objects_dir: Path, sha256: str) -> Path:
    """Where the object with this digest lives: ``objects/<sha[:2]>/<sha>.safetensors``."""
    return objects_dir / sha256[:2] / f"{sha256}{OBJECT_SUFFIX}"


def row_to_record(row: sqlite3.Row, objects_dir: Path) -> ExpertRecord:
    """An :class:`ExpertRecord` from a row selected with :data:`RECORD_COLUMNS`."""
    return ExpertRecord(
        name=row["name"], version=row["version"], sha256=row["sha256"], kind=row["kind"],
        languages=tuple(json.loads(row["languages"])), base_name=row["base_name"],
        base_fingerprint=row["base_fingerprint"], tokenizer_fingerprint=row["tokenizer_fingerprint"],
        metrics=json.loads(row["metrics"]), lineage=json.loads(row["lineage"]),
        hyperparameters=json.loads(row["hyperparameters"]), size=row["size"], num_parameters=row["num_parameters"],
        created=row["created"], added=row["added"], tags=tuple(sorted((row["tag_list"] or "").split())),
        path=object_path(objects_dir, row["sha256"]),
    )


def insert_row(con: sqlite3.Connection, name: str, version: int, sha: str, manifest: dict, size: int,
               num_parameters: int, added: str) -> None:
    """Insert one expert row (the manifest's queryable fields); the caller holds the write transaction."""
    base = manifest["base"]
    con.execute(
        "INSERT INTO experts (name, version, sha256, kind, languages, base_name, base_fingerprint, "
        "tokenizer_fingerprint, metrics, lineage, hyperparameters, size, num_parameters, created, added) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (name, version, sha, manifest["kind"], json.dumps(list(manifest["languages"])), base.get("name"),
         base["fingerprint"], base.get("tokenizer_fingerprint"),
         json.dumps(manifest.get("metrics") or {}, sort_keys=True),
         json.dumps(manifest.get("lineage") or {}, sort_keys=True),
         json.dumps(manifest.get("hyperparameters") or {}, sort_keys=True), size, num_parameters,
         manifest.get("created"), added),
    )
