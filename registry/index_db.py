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

import contextlib
import gc
import json
import logging
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import quote

from registry import journal
from registry.home import ensure_writable
from registry.records import OBJECT_SUFFIX, ExpertRecord

SCHEMA_VERSION = 1
DOCTOR_HINT = "run `whisper-experts registry doctor` to rebuild it from the journal and the objects"
READ_MODES = ("rw", "ro", "immutable")
log = logging.getLogger("registry")

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
-- find(base=..., kind=...) on a large registry (languages are matched in SQL with json_each).
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


def open_reader(path: Path, timeout: float, start: str = "rw") -> tuple[sqlite3.Connection, str, str | None, bool]:
    """Open the index for reading, falling back from ``rw`` to ``ro`` to ``immutable`` (from ``start`` on).

    Returns:
        ``(connection, mode, why, has_tables)``: ``why`` is the error that made a read-write connection fail
        (None in ``rw`` mode), for telling the user the registry was opened read-only; ``has_tables`` is False
        for a database without the registry's tables (just created, or emptied).

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
            # Reading the schema opens the file and its WAL index, where a read-only user or full disk fails.
            tables = con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'experts'").fetchone()[0]
            return con, mode, None if mode == "rw" else str(first), bool(tables)
        except sqlite3.Error as e:
            if con is not None:
                con.close()
            if _damaged(e) or not _unopenable(e):
                raise index_error(e, path, writing=False) from e
            first = first or e
    if first is None:  # remembered immutable mode, and now a writer's log exists
        raise RegistryIndexError(f"cannot read the registry index {path} now: another process is writing it, and "
                                 "this user cannot open its lock files to read alongside; retry when it has finished")
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


def rows_to_records(rows: list[sqlite3.Row], objects_dir: Path) -> list[ExpertRecord]:
    """:class:`ExpertRecord` s from rows selected with :data:`RECORD_COLUMNS`.

    A listing builds thousands of records, so the per-record work is kept small: every row's JSON columns are
    decoded in one ``json.loads`` (they are JSON this package wrote), and paths are built only when used.
    """
    if not rows:
        return []
    # Thousands of new dicts would trigger the cyclic garbage collector over and over, and each full pass
    # walks every object of the process (torch's included): tens of ms per listing. Records hold no cycles.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _records(rows, objects_dir)
    finally:
        if collecting:
            gc.enable()


def _records(rows: list[sqlite3.Row], objects_dir: Path) -> list[ExpertRecord]:
    try:
        decoded = json.loads("[" + ",".join(f'[{r["languages"]},{r["metrics"]},{r["lineage"]},{r["hyperparameters"]}]'
                                            for r in rows) + "]")
    except (ValueError, TypeError) as e:
        raise RegistryIndexError(f"the registry index in {objects_dir.parent} holds unreadable JSON ({e}); "
                                 f"{DOCTOR_HINT}") from e
    records = []
    new = object.__new__
    for row, (languages, metrics, lineage, hyperparameters) in zip(rows, decoded):
        # The frozen dataclass's __init__ sets each of its 17 fields through object.__setattr__; filling the
        # instance dict at once makes the same record (equal, hashable, frozen) at half the cost.
        record = new(ExpertRecord)
        record.__dict__.update(
            name=row["name"], version=row["version"], sha256=row["sha256"], kind=row["kind"],
            languages=tuple(languages), base_name=row["base_name"], base_fingerprint=row["base_fingerprint"],
            tokenizer_fingerprint=row["tokenizer_fingerprint"], metrics=metrics, lineage=lineage,
            hyperparameters=hyperparameters, size=row["size"], num_parameters=row["num_parameters"],
            created=row["created"], added=row["added"], tags=tuple(sorted((row["tag_list"] or "").split())),
            objects_dir=objects_dir,
        )
        records.append(record)
    return records


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


def storage_error(e: OSError, path: Path, what: str) -> OSError:
    """The same kind of OSError, saying which file could not be written and what to do."""
    return type(e)(f"cannot write {what} {path} ({e.strerror or e}): free space on {path.parent} (or raise the "
                   "file-size limit, ulimit -f) or fix its permissions, then retry; the registry index was not "
                   "changed")


class Txn:
    """A write transaction: its connection, and the journal lines it appends before committing."""

    def __init__(self, con: sqlite3.Connection):
        self.con, self.id, self.entries, self.journaled = con, journal.new_txn(), [], False

    def execute(self, sql: str, params=()):
        return self.con.execute(sql, params)

    def log(self, op: str, **fields) -> None:
        """Record a change for the journal (see :mod:`registry.journal` for the ops)."""
        self.entries.append({"op": op, "txn": self.id, **fields})


class Index:
    """The index of one registry directory: schema, read connections that fall back to read-only, and write
    transactions that append to the journal before they commit.

    Args:
        root: the registry directory.
        timeout: seconds a writer waits for another's write lock.
    """

    def __init__(self, root: Path, timeout: float):
        self.root, self.timeout = Path(root), timeout
        self.path = self.root / "index.sqlite"
        self.journal_path = journal.journal_path(self.root)
        self.read_mode = "rw"  # becomes "ro" / "immutable" once a read-write open fails
        self._schema_ready = False

    @property
    def read_only(self) -> bool:
        return self.read_mode != "rw"

    def connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken before reading
        # the last version number (a deferred transaction could read, then fail to upgrade to a writer).
        return connect(self.path, self.timeout)

    def lost(self) -> RegistryIndexError:
        return RegistryIndexError(f"the registry index {self.path} is missing or empty, but {self.journal_path} "
                                  f"records experts; {DOCTOR_HINT}")

    def ensure_schema(self) -> None:
        """Create the directory, its objects/ and the index if needed (once per instance); checks it can be
        written first."""
        if self._schema_ready and self.path.exists():
            return
        ensure_writable(self.root, "the expert registry",
                        "choose another registry (--registry DIR, or --home / WHISPER_EXPERTS_HOME)")
        (self.root / "objects").mkdir(exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                # The journal first: another process appends to it only after its schema has committed, so
                # entries seen now mean tables exist now, unless the index was lost. (Tables first would race:
                # none yet, then another process creates them and journals an add, and ours looks lost.)
                if journal.has_entries(self.root) and not self._has_tables():
                    raise self.lost()  # a fresh index would hand out the lost one's version numbers again
                with closing(self.connect()) as con:
                    # Switching to WAL needs a moment of exclusive access; when several processes create the
                    # registry at once the losers see "locked" and retry (the mode then persists in the file).
                    con.execute("PRAGMA journal_mode = WAL")
                    con.execute("BEGIN IMMEDIATE")
                    found = create_schema(con)
                    con.execute("COMMIT")
                break
            except sqlite3.Error as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise index_error(e, self.path, writing=True) from e
                time.sleep(0.05)
        if found > SCHEMA_VERSION:
            from registry.expert_file import ExpertFormatError

            raise ExpertFormatError(f"{self.path}: registry schema {found} is newer than this package "
                                    f"understands ({SCHEMA_VERSION}); upgrade whisper-experts")
        self._schema_ready = True

    def _has_tables(self) -> bool:
        if not self.path.exists():
            return False
        with closing(self.connect()) as con:
            return bool(con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'experts'").fetchone()[0])

    def _journal_io(self, write) -> None:
        try:
            write()
        except OSError as e:
            raise storage_error(e, self.journal_path, "the registry journal") from e

    @contextmanager
    def write(self):
        """A :class:`Txn` inside ``BEGIN IMMEDIATE``: its journal lines are appended, then it commits; on any
        error it rolls back (and its journal lines are cancelled). SQLite errors become
        :class:`RegistryIndexError`."""
        self.ensure_schema()
        try:
            with closing(self.connect()) as con:
                con.execute("BEGIN IMMEDIATE")
                txn = Txn(con)
                try:
                    if not self.journal_path.exists():  # a registry older than the journal, or a deleted one
                        self._journal_io(lambda: journal.write_snapshot(self.root, con))
                    yield txn
                    if txn.entries:
                        self._journal_io(lambda: journal.append(self.root, txn.entries))
                        txn.journaled = True
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # closing the connection rolls back too
                            con.execute("ROLLBACK")
                    if txn.journaled:
                        journal.abort(self.root, txn.id)
                    raise
        except sqlite3.Error as e:
            raise index_error(e, self.path, writing=True) from e

    @contextmanager
    def reading(self):
        """A connection for reads (None when there is no registry yet); never creates or changes anything."""
        opened = self._open_reader()
        if opened is None and journal.has_entries(self.root):
            # Look again: another process may have created the index and journaled an add since our first
            # look. Its journal lines follow its schema's commit, so what we just read is covered by now.
            opened = self._open_reader()
            if opened is None:
                raise self.lost()
        if opened is None:
            yield None
            return
        con, mode, why = opened
        if mode != self.read_mode:
            how = " and without locks (immutable: its lock files cannot be created)" if mode == "immutable" else ""
            log.warning("opened the registry index %s read-only%s, as it could not be opened for writing (%s); "
                        "reading works, changes will be refused", self.path, how, why)
            self.read_mode = mode
        try:
            with closing(con):
                yield con
        except sqlite3.Error as e:
            raise index_error(e, self.path, writing=False) from e

    def _open_reader(self):
        """``(connection, mode, why)`` on an index with tables, or None when it is absent or has none."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RegistryIndexError(f"cannot read the registry at {self.root} ({e.strerror or e}); check that "
                                     "this user may read it, or choose another with --registry DIR") from e
        con, mode, why, has_tables = open_reader(self.path, self.timeout, self.read_mode)
        if not has_tables:  # created but never written (or emptied)
            con.close()
            return None
        return con, mode, why

    def query(self, sql: str, params=()) -> list[sqlite3.Row]:
        """Rows of a read; an absent registry reads as empty."""
        with self.reading() as con:
            return [] if con is None else con.execute(sql, params).fetchall()
