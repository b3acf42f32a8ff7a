"""An expert named by a file path or a registry spec: what every command taking ``--expert SPEC`` reads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from registry.expert_file import Expert, expert_from_bytes
from registry.store import Registry


def open_expert(spec: str | os.PathLike, registry: str | os.PathLike | None = None) -> tuple[Expert, dict]:
    """The expert named by ``spec``: an expert file if one is there, else a registry spec (``name``,
    ``name@3``, ``name@latest``, ``name@tag``, a content-hash prefix) in ``registry`` (default: the home's).

    Returns:
        (the expert, its identity: ``{"file", "sha256"}`` for a file, ``{"ref", "sha256"}`` for a stored one).

    Raises:
        ExpertNotFoundError: neither a file nor a known spec (the message lists near names).
        ExpertFormatError: the file or the stored object is not a valid expert.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        data = path.read_bytes()
        return expert_from_bytes(data, str(path)), {"file": str(path), "sha256": hashlib.sha256(data).hexdigest()}
    store = Registry(registry)
    record = store.resolve(str(spec))
    return expert_from_bytes(store.read_bytes(record), record.ref), {"ref": record.ref, "sha256": record.sha256}
