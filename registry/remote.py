"""Remote mirrors of a registry, through fsspec URLs (``file://``, ``memory://``, ``s3://``, ``gs://`` ...).

A mirror is a folder holding the same content-addressed objects as a local registry and a small JSON index::

    <url>/objects/<sha[:2]>/<sha256>.safetensors
    <url>/index.json    {"format_version": 1,
                         "experts": [{"name", "version", "sha256", "size", "kind", "languages", ...}, ...],
                         "tags": {"<name>": {"<tag>": <version>}}}

The mirror numbers versions itself, like a registry does: pushing ``uk-espeak@5`` from a laptop whose bytes the
mirror has not seen under that name makes it the mirror's next version of ``uk-espeak``; pulling adds it as the
local registry's next version. Content (sha256) is the identity; version numbers are per store.

Objects are uploaded before the index that names them, so a reader never sees an index entry for an object
that was not written; on a local (``file://``) mirror they are written atomically and never through a
symlink. Pull validates the whole index first (hashes, names, tags, versions: nothing in it becomes a path
unchecked), re-hashes every download, and adds them all in one transaction, or none. There is no lock on a mirror:
pushes to one mirror should not run concurrently (the last index written wins; objects are never lost, and
``push`` again repairs the index).

fsspec is imported lazily: the local registry works without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from registry.expert_file import ExpertFormatError, is_int
from registry.index_db import OBJECT_SUFFIX
from registry.journal import SHA256_PATTERN
from registry.records import (SHA_PREFIX_PATTERN, ExpertNotFoundError, ExpertRecord, InvalidNameError, validate_name,
                              validate_tag)

if TYPE_CHECKING:  # the store calls these functions; they only need its type
    from registry.store import Registry

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
# Record fields a mirror's index keeps (path is local; tags are kept per name).
ENTRY_FIELDS = ("name", "version", "sha256", "size", "kind", "languages", "base_name", "base_fingerprint",
                "tokenizer_fingerprint", "num_parameters", "metrics", "created")


def open_remote(url: str):
    """``(filesystem, root path)`` for an fsspec URL, with errors that say which package is missing."""
    try:
        import fsspec
    except ImportError as e:
        raise RuntimeError("remote registries need fsspec: pip install fsspec") from e
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as e:  # e.g. s3:// without s3fs
        raise RuntimeError(f"cannot open {url}: {e} (s3:// needs `pip install s3fs`, gs:// needs gcsfs)") from e
    except ValueError as e:
        raise ValueError(f"cannot open {url}: {e}; give an fsspec URL such as file:///srv/experts, "
                         "memory://mirror or s3://bucket/experts") from e
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def read_index(url: str) -> dict:
    """The mirror's index (an empty one if the mirror has none yet)."""
    fs, root = open_remote(url)
    return _read_index(fs, root, url)


def _read_index(fs, root: str, url: str) -> dict:
    path = f"{root}/{INDEX_NAME}"
    if not fs.exists(path):
        return {"format_version": INDEX_FORMAT, "experts": [], "tags": {}}
    try:
        index = json.loads(fs.cat_file(path))
    except ValueError as e:
        raise _damaged(url, f"it is not valid JSON ({e})") from e
    return check_index(index, url)


def _damaged(url: str, what: str) -> ExpertFormatError:
    return ExpertFormatError(f"{url}/{INDEX_NAME}: {what}; the mirror's index is damaged or was not written by "
                             f"whisper-experts. Nothing was copied: move {INDEX_NAME} aside and push again from a "
                             "registry that has the experts")


def check_index(index, url: str) -> dict:
    """Validate a mirror index read from ``url`` and return it (``experts`` and ``tags`` filled in).

    Everything in it is checked before use, because it decides paths and names here: each ``sha256`` must be
    64 hex digits (no ``../``), each name and tag must pass the local rules, versions must be positive
    integers, unique per name, and tags must point at listed versions.

    Raises:
        ExpertFormatError: the first thing wrong, naming the index and the fix.
    """
    if not isinstance(index, dict):
        raise _damaged(url, f"it holds a JSON {type(index).__name__}, not an object")
    version = index.get("format_version", INDEX_FORMAT)
    if not is_int(version) or version < 1:
        raise _damaged(url, f"format_version must be a positive integer, not {version!r}")
    if version > INDEX_FORMAT:
        raise ExpertFormatError(f"{url}/{INDEX_NAME} has format {version}, newer than this package "
                                f"understands ({INDEX_FORMAT}); upgrade whisper-experts")
    experts, tags = index.setdefault("experts", []), index.setdefault("tags", {})
    if not isinstance(experts, list):
        raise _damaged(url, f"'experts' must be a list, not {experts!r:.40}")
    if not isinstance(tags, dict):
        raise _damaged(url, f"'tags' must be an object, not {tags!r:.40}")
    seen = set()
    for entry in experts:
        where = f"entry {entry!r:.80}"
        if not isinstance(entry, dict):
            raise _damaged(url, f"{where} is not an object")
        try:
            validate_name(entry.get("name"))
        except InvalidNameError as e:
            raise _damaged(url, f"{where}: {e}") from None
        for key in ("version", "size"):
            if not is_int(entry.get(key)) or entry[key] < (1 if key == "version" else 0):
                raise _damaged(url, f"{where}: {key} must be a {'positive' if key == 'version' else 'non-negative'} "
                                    f"integer, not {entry.get(key)!r}")
        if not isinstance(entry.get("sha256"), str) or not SHA256_PATTERN.fullmatch(entry["sha256"]):
            raise _damaged(url, f"{where}: sha256 must be 64 lowercase hex digits, not {entry.get('sha256')!r:.80}")
        if not isinstance(entry.get("languages", []), list):
            raise _damaged(url, f"{where}: languages must be a list")
        if (entry["name"], entry["version"]) in seen:
            raise _damaged(url, f"{entry['name']}@{entry['version']} is listed twice")
        seen.add((entry["name"], entry["version"]))
    for name, by_tag in tags.items():
        if not isinstance(by_tag, dict):
            raise _damaged(url, f"tags of {name!r:.40} must be an object of tag -> version")
        for tag, version in by_tag.items():
            try:
                validate_name(name)
                validate_tag(tag)
            except InvalidNameError as e:
                raise _damaged(url, f"tag {tag!r} of {name!r}: {e}") from None
            if not is_int(version) or (name, version) not in seen:
                raise _damaged(url, f"tag {name}@{tag} points at {version!r}, which is not a listed version of {name}")
    return index


def _write_index(fs, root: str, index: dict) -> None:
    data = json.dumps(index, indent=1, sort_keys=True).encode()
    path = f"{root}/{INDEX_NAME}"
    fs.makedirs(root, exist_ok=True)
    if _is_local(fs):
        # A rename is atomic on a local disk; object stores (s3, gcs) replace a key atomically anyway.
        from registry.atomic import atomic_write_bytes

        atomic_write_bytes(path, data)
    else:
        fs.pipe_file(path, data)


def _object_key(root: str, sha: str) -> str:
    return f"{root}/objects/{sha[:2]}/{sha}{OBJECT_SUFFIX}"


def _put_object(fs, root: str, sha: str, data: bytes) -> None:
    """Upload one object unless the mirror has it. On a local mirror the object is written atomically
    (temporary file and rename) and nothing is written through a symlink: a symlink planted at the object's
    path is replaced, not followed, and a symlinked ``objects/`` directory is refused."""
    key = _object_key(root, sha)
    if not _is_local(fs):
        if not (fs.exists(key) and fs.size(key) == len(data)):
            fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(key, data)  # an object store replaces a key atomically
        return
    from registry.atomic import atomic_write_tagged, fsync_dir

    path = Path(key)
    for directory in (path.parent.parent, path.parent):
        directory.mkdir(parents=True, exist_ok=True)
        if directory.is_symlink() or not directory.is_dir():
            raise ExpertFormatError(f"{directory} in the mirror is a symlink or not a directory; refusing to "
                                    "write objects through it: replace it with a plain directory")
    try:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size == len(data):
            return
    except FileNotFoundError:
        pass
    atomic_write_tagged(path, data)
    fsync_dir(path.parent)


def list_remote(url: str) -> list[dict]:
    """The mirror's entries (dicts with the fields of ``ENTRY_FIELDS`` plus ``tags``), by name then version."""
    index = read_index(url)
    entries = sorted(index["experts"], key=lambda e: (e["name"], e["version"]))
    for e in entries:
        e["tags"] = sorted(t for t, v in index["tags"].get(e["name"], {}).items() if v == e["version"])
    return entries


def push(registry: Registry, url: str, specs=None) -> list[dict]:
    """Copy experts to the mirror at ``url``.

    Args:
        registry: the local registry.
        url: fsspec URL of the mirror (created if needed).
        specs: expert specs to push (``name`` pushes the latest version, ``name@all`` every version);
            None or empty pushes every version of every expert.

    Returns:
        The mirror's index entries for the pushed experts (with the mirror's version numbers).
    """
    fs, root = open_remote(url)
    records = registry.records() if not specs else _dedupe(r for s in specs for r in registry.resolve_all(s))
    index = _read_index(fs, root, url)
    pushed = []
    for rec in records:
        data = registry.read_bytes(rec)  # re-hashed: a corrupt local copy is never spread
        _put_object(fs, root, rec.sha256, data)
        entry = next((e for e in index["experts"] if e["name"] == rec.name and e["sha256"] == rec.sha256), None)
        if entry is None:
            versions = [e["version"] for e in index["experts"] if e["name"] == rec.name]
            entry = {f: getattr(rec, f) for f in ENTRY_FIELDS}
            entry.update(languages=list(rec.languages), version=max(versions, default=0) + 1,
                         pushed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            index["experts"].append(entry)
        for tag in rec.tags:
            index["tags"].setdefault(rec.name, {})[tag] = entry["version"]
        pushed.append(entry)
    _write_index(fs, root, index)  # after every object is in place
    return pushed


def pull(registry: Registry, url: str, specs=None) -> list[ExpertRecord]:
    """Copy experts from the mirror at ``url`` into ``registry``.

    Every download is checked against the index's size and sha256 before anything is added, so a damaged
    mirror adds nothing. Tags the mirror has on a pulled version are applied locally.

    Args:
        specs: specs resolved against the mirror's index (same forms as locally); None pulls everything.

    Returns:
        The local records (already-present content is not duplicated; see :meth:`Registry.add`).
    """
    fs, root = open_remote(url)
    index = _read_index(fs, root, url)
    entries = index["experts"] if not specs else _dedupe(e for s in specs for e in _resolve_remote(index, s, url))
    downloads = []
    for entry in sorted(entries, key=lambda e: (e["name"], e["version"])):
        key = _object_key(root, entry["sha256"])
        if not fs.exists(key):
            raise ExpertFormatError(f"{url}: object for {entry['name']}@{entry['version']} ({key}) is missing; "
                                    "push it again from a registry that has it")
        data = fs.cat_file(key)
        found = hashlib.sha256(data).hexdigest()
        if found != entry["sha256"] or len(data) != entry["size"]:
            raise ExpertFormatError(
                f"{url}: object for {entry['name']}@{entry['version']} ({key}) is corrupt or truncated (expected "
                f"sha256 {entry['sha256']}, {entry['size']} bytes; found {found}, {len(data)} bytes); nothing was "
                "pulled; push it again from a registry that has a good copy"
            )
        downloads.append((entry, data))
    items = []
    for entry, data in downloads:
        tags = [t for t, v in index["tags"].get(entry["name"], {}).items() if v == entry["version"]]
        items.append((data, entry["name"], tags, f"{url} {entry['name']}@{entry['version']}"))
    return registry.add_many(items)  # one transaction: all of them or, on any error, none


def _resolve_remote(index: dict, spec: str, url: str) -> list[dict]:
    """Mirror entries a spec names (same forms as :meth:`Registry.resolve`, plus ``@all``)."""
    name, _, selector = spec.partition("@")
    entries = sorted((e for e in index["experts"] if e["name"] == name), key=lambda e: e["version"])
    if not entries:
        if not selector and SHA_PREFIX_PATTERN.fullmatch(name):
            hits = [e for e in index["experts"] if e["sha256"].startswith(name)]
            if len({h["sha256"] for h in hits}) > 1:
                raise InvalidNameError(f"hash prefix {name!r} is ambiguous on {url}; give more digits")
            if hits:
                return hits[:1]
        validate_name(name)
        raise ExpertNotFoundError(f"no expert named {name!r} on the mirror {url} "
                                  f"(see `whisper-experts registry --registry {url} list`)")
    if selector in ("", "latest"):
        return entries[-1:]
    if selector == "all":
        return entries
    version = int(selector) if selector.isdigit() else index["tags"].get(name, {}).get(selector)
    hit = [e for e in entries if e["version"] == version]
    if not hit:
        raise ExpertNotFoundError(f"{name!r} on {url} has no version or tag {selector!r}; versions: "
                                  f"{', '.join(str(e['version']) for e in entries)}")
    return hit


def _dedupe(items) -> list:
    seen, out = set(), []
    for item in items:
        key = (item.name, item.version) if isinstance(item, ExpertRecord) else (item["name"], item["version"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
