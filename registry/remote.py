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
that was not written; pull re-hashes every download before anything is added. There is no lock on a mirror:
pushes to one mirror should not run concurrently (the last index written wins; objects are never lost, and
``push`` again repairs the index).

fsspec is imported lazily: the local registry works without it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from registry.expert_file import ExpertFormatError
from registry.records import ExpertNotFoundError, ExpertRecord, InvalidNameError, validate_name
from registry.store import OBJECT_SUFFIX, SHA_PREFIX_PATTERN, Registry

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
        raise ExpertFormatError(f"{url}/{INDEX_NAME} is not valid JSON ({e}); the mirror's index is damaged: "
                                "push to it again to rewrite it") from e
    if index.get("format_version", 0) > INDEX_FORMAT:
        raise ExpertFormatError(f"{url}/{INDEX_NAME} has format {index['format_version']}, newer than this package "
                                f"understands ({INDEX_FORMAT}); upgrade whisper-experts")
    index.setdefault("experts", [])
    index.setdefault("tags", {})
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
        key = _object_key(root, rec.sha256)
        if not (fs.exists(key) and fs.size(key) == rec.size):
            fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(key, data)
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
    added = []
    for entry, data in downloads:
        tags = [t for t, v in index["tags"].get(entry["name"], {}).items() if v == entry["version"]]
        added.append(registry.add_bytes(data, entry["name"], tags, f"{url} {entry['name']}@{entry['version']}"))
    return added


def _resolve_remote(index: dict, spec: str, url: str) -> list[dict]:
    """Mirror entries a spec names (same forms as :meth:`Registry.resolve`, plus ``@all``)."""
    name, _, selector = spec.partition("@")
    entries = sorted((e for e in index["experts"] if e["name"] == name), key=lambda e: e["version"])
    if not entries:
        if not selector and SHA_PREFIX_PATTERN.match(name):
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
