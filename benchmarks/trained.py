"""Experts and students trained by the benchmarks, kept on disk by their configuration.

:func:`tag` names a training configuration; :func:`cached` returns the expert stored under such a name, or
trains and stores it. A configuration is its non-default fields (:func:`config_knobs`) and the digests of the
files it learns from (:func:`file_digest`), so retraining a teacher in place, or changing a knob, trains again,
while a later version adding a field at its default does not.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path


def tag(**knobs) -> str:
    """A short name for a training configuration (cached experts are reused only for the same one)."""
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]


def config_knobs(config) -> dict:
    """A dataclass config's fields that differ from their defaults, for :func:`tag`: the key stays the same when
    a later version adds a field at its default (``repr(config)`` would change, and a cached run be redone)."""
    import dataclasses

    knobs = {}
    for f in dataclasses.fields(config):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(config, f.name)
        if value != default:
            knobs[f.name] = list(value) if isinstance(value, tuple) else value
    return knobs


def file_digest(path) -> str:
    """SHA-256 of a file's bytes: a cache key part that changes when a teacher file is retrained in place."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached(path: Path, train):
    """``(expert, training seconds)`` from ``path`` (+ its ``.json`` timing), or from ``train()`` then stored."""
    from registry.expert_file import load_expert, save_expert

    timing = path.with_suffix(".json")
    if path.is_file() and timing.is_file():
        return load_expert(path), json.loads(timing.read_text())["seconds"]
    t0 = time.time()
    expert = train()
    seconds = round(time.time() - t0, 1)
    save_expert(expert, path)
    timing.write_text(json.dumps({"seconds": seconds}))
    return expert, seconds
