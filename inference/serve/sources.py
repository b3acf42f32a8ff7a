"""Where served files come from: a local path, or an fsspec URL downloaded afresh on every load.

A pack (or router) named by a URL with a scheme fsspec knows (``file://``, ``memory://``, ``https://``,
``s3://`` with s3fs, ``gs://`` with gcsfs...) is copied into ``<home>/downloads/packs/`` before it is loaded,
and copied again on every reload (SIGHUP, ``POST /admin/packs``). A replica therefore holds nothing that a
fresh machine would not fetch again: N replicas can serve the packs of one bucket, and a reload picks up what
the bucket holds now. The copy is written to a temporary file beside its target and renamed over it
(``os.replace``): nobody sees half a pack, a symlink planted at the target is replaced and never written
through, and a generation already serving keeps the file it opened. The pack format checks each expert's
digest when it loads (:mod:`registry.packs`), so a damaged download is refused there and the current
generation keeps serving. Plain paths are used where they are.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from registry.atomic import atomic_write_stream, clean_stale_temps, fsync_dir
from registry.home import ensure_writable, home_dir

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
CHUNK = 8 * 1024 * 1024  # bytes copied at a time (a pack is never held in memory whole)


class PackSourceError(OSError):
    """A pack or router URL that could not be downloaded (the message names the URL and the cause)."""


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(source, str) and _URL.match(source) is not None


def download_path(url: str, home: str | os.PathLike | None = None) -> Path:
    """Where :func:`download` puts ``url``: ``<home>/downloads/packs/<url hash>-<file name>``.

    The hash keeps apart URLs that end in the same file name; the name keeps the folder readable.
    """
    name = _UNSAFE.sub("_", url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]).lstrip("._") or "pack"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return home_dir(home) / "downloads" / "packs" / f"{digest}-{name[:100]}"


def download(url: str, home: str | os.PathLike | None = None) -> Path:
    """Copy the file at ``url`` to :func:`download_path` (atomically, replacing an older copy); returns it.

    Raises:
        PackSourceError: the URL names no filesystem fsspec knows (or one whose package is missing), does not
            exist, cannot be read, or the copy cannot be written.
    """
    from registry.remote import open_remote

    target = download_path(url, home)
    try:
        fs, path = open_remote(url)
    except (RuntimeError, ValueError) as e:
        raise PackSourceError(f"cannot download {url}: {e}") from e
    ensure_writable(target.parent, "downloaded packs")
    clean_stale_temps(target)  # temporaries that killed downloads of this URL left behind
    try:
        with fs.open(path, "rb") as src:
            atomic_write_stream(target, lambda out: shutil.copyfileobj(src, out, CHUNK))
    except Exception as e:
        raise PackSourceError(f"cannot download {url}: {type(e).__name__}: {e}; check that it exists and "
                              "can be read from here (credentials for s3:// or gs://), or give a local path") from e
    fsync_dir(target.parent)
    return target


def local_copy(source: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """A local file for ``source``: a URL is downloaded (every call, see :func:`download`), a path is itself."""
    return download(source, home) if is_url(source) else Path(source)
