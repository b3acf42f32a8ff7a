"""Decoded test rows kept on disk, so that a benchmark run again with one row changed decodes only that row.

A row is one expert (or none: the base) decoded on one set of utterances. Its key (:func:`score_key`) is what
its result depends on: the base, the expert's tensors and recipe, the utterances (ids, texts and audio) and the
decoding options; anything else changed gives another key, so a stale row is never read back.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path


def score_key(base, expert, utterances, options=None) -> str:
    """Hex digest of what a decoded row depends on: ``base`` (name and fingerprint), ``expert`` (tensors, kind and
    hyperparameters; None: the base alone), ``utterances`` (ids, languages, texts and audio samples) and the
    decoding ``options`` (their repr; None leaves them out, as the rows cached before they were added)."""
    import numpy as np

    from registry.packs import tensor_digest

    h = hashlib.sha256(f"{base.name}|{getattr(base, 'fingerprint', '')}".encode())
    if expert is not None:
        h.update(tensor_digest(expert.tensors).encode())
        h.update(json.dumps([expert.kind, expert.manifest.get("hyperparameters")], sort_keys=True,
                            default=str).encode())
    for u in utterances:
        h.update(f"{u.id}|{u.language}|{u.text}|".encode())
        h.update(np.ascontiguousarray(u.audio).view(np.uint8))
    if options is not None:
        h.update(repr(options).encode())
    return h.hexdigest()[:16]


def cached_report(base, expert, utterances, options, cache: Path | str | None, progress: bool = False):
    """The :class:`~inference.evaluation.EvalReport` of ``base`` with ``expert`` applied (None: alone) on
    ``utterances``: read back from ``<cache>/<key>.report.json`` when that row was decoded before, else decoded
    and written there (``cache`` None: always decoded, nothing written). The file is written whole or not at all.
    """
    from inference.evaluation import EvalReport, evaluate
    from inference.language_matrix import expert_applied

    path = Path(cache) / f"{score_key(base, expert, utterances, options)}.report.json" if cache else None
    if path is not None and path.is_file():
        return EvalReport.from_dict(json.loads(path.read_text()))
    with expert_applied(base.model, expert) if expert is not None else contextlib.nullcontext():
        report = evaluate(base.model, base.processor, utterances, options, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report.as_dict()))
        tmp.replace(path)
    return report
