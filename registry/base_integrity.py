"""Checking an imported base against the fingerprints recorded when it was imported.

``<home>/bases/<name>/base.json`` records the weight fingerprint (and tokenizer fingerprint) of the files
beside it. Loading a base trusts that record, so a flipped byte in ``model.safetensors`` would otherwise pass
every load and every expert compatibility check. :func:`verify_base` recomputes both fingerprints from the
files; ``registry verify`` runs it for every imported base its experts name.

torch and transformers are imported when a base is checked, not when this module is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from registry.home import bases_dir

BASE_RECORD = "base.json"  # the same file registry.bases writes at import


def base_directory(name_or_dir: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """The directory of an imported base: ``name_or_dir`` itself if it is a directory holding a base.json,
    else ``<home>/bases/<name>``."""
    path = Path(name_or_dir).expanduser()
    if (path / BASE_RECORD).is_file():
        return path
    return bases_dir(home) / str(name_or_dir)


def verify_base(name_or_dir: str | os.PathLike, home: str | os.PathLike | None = None) -> list[str]:
    """Recompute an imported base's fingerprints from its files and compare them with its ``base.json``.

    Args:
        name_or_dir: a name imported under ``<home>/bases/`` (``whisper-base``) or such a directory.
        home: the project home (default: ``WHISPER_EXPERTS_HOME`` or the user cache).

    Returns:
        Problems, one sentence each naming the directory and the fix; empty when the files match the record.
    """
    directory = base_directory(name_or_dir, home)
    record_path = directory / BASE_RECORD
    reimport = f"re-import it (`whisper-experts base import {directory.name} --overwrite`)"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{directory}: no {BASE_RECORD}; not an imported base (import it with `whisper-experts base import`)"]
    except (OSError, ValueError) as e:
        return [f"{record_path} is unreadable ({e}); {reimport}"]
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str) or not record["fingerprint"]:
        return [f"{record_path} records no weight fingerprint; {reimport}"]

    from transformers import WhisperProcessor

    from registry.bases import whisper_model
    from registry.fingerprint import tokenizer_fingerprint, weight_fingerprint

    problems = []
    want = record["fingerprint"]
    try:
        model = whisper_model(directory)
    except Exception as e:  # transformers/safetensors raise many types for truncated or corrupt files
        return [f"{directory}: the weights cannot be loaded ({type(e).__name__}: {str(e)[:200]}); {reimport}"]
    found = weight_fingerprint(model, length=max(16, len(want)))[:len(want)]
    if found != want:
        problems.append(f"{directory}: the weights changed since import: {BASE_RECORD} records fingerprint {want}, "
                        f"the files hash to {found} (a damaged or replaced file); experts checked against this "
                        f"base would be checked against other weights; {reimport}")
    want_tok = record.get("tokenizer_fingerprint")
    if isinstance(want_tok, str) and want_tok:
        try:
            processor = WhisperProcessor.from_pretrained(directory)
            found_tok = tokenizer_fingerprint(processor.tokenizer, processor.feature_extractor)[:len(want_tok)]
        except Exception as e:
            return problems + [f"{directory}: the tokenizer cannot be loaded ({type(e).__name__}: "
                               f"{str(e)[:200]}); {reimport}"]
        if found_tok != want_tok:
            problems.append(f"{directory}: the tokenizer changed since import: {BASE_RECORD} records {want_tok}, "
                            f"the files give {found_tok}; {reimport}")
    return problems
