"""Atomic writes: a reader sees the old content or the new, never a half-written file or directory.

Files go through a temporary sibling, fsync and rename. Directories are built in a temporary sibling
(:func:`new_staging_dir`) and swapped into place (:func:`move_into_place`); an existing directory is moved
aside first and restored if the swap fails. Everything that writes artefacts (expert files, the registry,
converted bases, corpora, reports) uses these. Writers that may be killed mid-write and whose leftovers someone
cleans up later (registry objects, packs) name their temporaries after themselves (:func:`atomic_write_tagged`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only be read by
    setting it, which races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, then rename.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask), not mkstemp's 0600,
    so a shared registry or a server running as another user can read it. The temporary file names its
    writer (:func:`atomic_write_tagged`), so a killed writer's leftover can be cleaned.
    """
    return atomic_write_tagged(path, data, fsync=True)


def fsync_dir(directory: Path | str) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def new_staging_dir(target: Path | str) -> Path:
    """An empty temporary sibling of ``target`` (hidden name) with the usual directory permissions."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    # mkdtemp makes a private (0700) directory; the result should get the permissions of any new directory.
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing an existing ``target`` so that a failure restores it."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()
        target.rename(old)
        try:
            staging.rename(target)
        except OSError:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


@contextlib.contextmanager
def staged_directory(target: Path | str) -> Iterator[Path]:
    """Yield a staging directory to fill; on success it replaces ``target``, on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(target)
    try:
        yield staging
        move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------- writer-tagged temporaries
# A temporary file's name can record who writes it (``.<target>.w<pid>-<host>.<random>.tmp``), so that a
# killed writer's leftover can be told from a write in progress: on the same host, a temporary whose pid no
# longer runs belongs to nobody. Untagged names (older versions) can only be judged by age.
_TAGGED_TEMP = re.compile(r"^\.(?P<target>.+)\.w(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]*)\.[A-Za-z0-9_]+\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63]


def atomic_write_tagged(path: Path | str, data: bytes, *, fsync: bool = True) -> Path:
    """:func:`atomic_write_bytes` whose temporary file names its writer (pid and host), so that
    :func:`is_stale_temp` can tell a killed writer's leftover from a write in progress.

    Args:
        fsync: flush the file before the rename. Batch writers pass False and make the whole batch durable at
            once (``os.sync``) before anything refers to the files.
    """
    return atomic_write_stream(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_stream(path: Path | str, write, *, fsync: bool = True) -> Path:
    """:func:`atomic_write_tagged` whose content ``write(file)`` writes (e.g. a copy streamed from elsewhere,
    never held in memory whole); nothing appears at ``path`` unless ``write`` returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.w{os.getpid()}-{_host()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symlink planted at ``path`` itself, never writes through it
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def temp_writer(path: Path | str) -> tuple[int, str] | None:
    """``(pid, host)`` recorded in a temporary file's name by :func:`atomic_write_tagged`, else None."""
    m = _TAGGED_TEMP.match(Path(path).name)
    return (int(m["pid"]), m["host"]) if m else None


def writer_is_dead(path: Path | str) -> bool:
    """True when the temporary file's writer is known to be gone: tagged by this host, and its pid no longer
    runs. Untagged names, other hosts' writers and live pids (even a reused one) are not known to be dead."""
    writer = temp_writer(path)
    if writer is None or writer[1] != _host():
        return False
    try:
        os.kill(writer[0], 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: the pid runs under another user
        return False
    return False


def is_stale_temp(path: Path | str, max_age: float = 3600.0, now: float | None = None) -> bool:
    """A temporary file older than ``max_age`` seconds whose writer is dead (or unrecorded: names from
    :func:`atomic_write_bytes`, which only age can judge). Missing files are not stale."""
    try:
        age = (time.time() if now is None else now) - os.lstat(path).st_mtime
    except OSError:
        return False
    return age > max_age and (temp_writer(path) is None or writer_is_dead(path))


def clean_stale_temps(target: Path | str, max_age: float = 3600.0) -> list[Path]:
    """Delete stale temporary siblings of ``target`` (left by killed writers of it); returns them.

    Only names this module gives temporaries of ``target`` are considered (``.<name>.*.tmp``).
    """
    target = Path(target)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if entry.name.startswith(f".{target.name}.") and entry.name.endswith(".tmp") and \
                    entry.is_file(follow_symlinks=False) and is_stale_temp(entry.path, max_age):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def write_replacing_stale(path: Path | str, data: bytes, max_age: float = 3600.0) -> Path:
    """Write ``path`` atomically (:func:`atomic_write_tagged`), first deleting temporaries that killed
    writers of the same path left beside it (:func:`clean_stale_temps`)."""
    clean_stale_temps(path, max_age)
    return atomic_write_tagged(path, data)
