"""Experts out of the project: the base with an expert merged in, as a plain transformers model directory
or as a CTranslate2 (faster-whisper) model.

``lora``, ``task_vector`` and ``sparse`` experts are weight deltas: added to the base's weights they give an
ordinary Whisper that any runtime loads. Which kinds merge is the table of kinds (:mod:`lora_experts.kinds`:
the kinds with a task vector); the others are refused with their entry's reason (a ``clsr`` expert adds gated
language paths beside every feed-forward layer, which plain Whisper has no place for: serve it from a pack).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from registry.atomic import atomic_write_text, staged_directory
from registry.bases import Base, load_base
from registry.ct2_export import ExportError, export_ct2
from registry.expert_file import Expert, check_compatible
from lora_experts.kinds import expert_kind
from lora_experts.task_vectors import apply_task_vector, task_vector

EXPERT_RECORD = "expert.json"  # the merged expert's manifest, kept beside the weights for provenance


def check_mergeable(expert: Expert, name: str) -> None:
    """Refuse an expert whose kind has no weight-delta form (its entry in :mod:`lora_experts.kinds`), saying why
    and what to do instead."""
    expert_kind(expert.kind).require("merge", name, ExportError)


def merged_model(expert: Expert, name: str = "expert", *, base: Base | None = None, force: bool = False) -> Base:
    """The expert's base (loaded in float32 on the CPU) with the expert's delta added to its weights."""
    check_mergeable(expert, name)
    base = base or load_base(expert.manifest["base"].get("name") or "whisper-base", device="cpu")
    check_compatible(expert.manifest, base, force=force, what=name)
    apply_task_vector(base.model, task_vector(expert))
    return base


def export_hf(expert: Expert, out_dir: str | os.PathLike, name: str = "expert", *, base: Base | None = None,
              force: bool = False) -> Path:
    """Write the base with ``expert`` merged in as a transformers model directory.

    ``WhisperForConditionalGeneration.from_pretrained(out_dir)`` and ``pipeline("automatic-speech-recognition",
    model=out_dir)`` load it with no extra arguments (float32 weights, processor and generation config
    included). An expert of one language makes that language the generation default, as a fine-tuned
    single-language Whisper would have it; callers can still pass ``language=``.

    Args:
        expert: a ``lora``, ``task_vector`` or ``sparse`` expert.
        out_dir: the directory to write (replaced atomically if it exists).
        name: how the expert is named in messages and in ``expert.json``.
        base: the loaded base to merge into (default: load the base the manifest names); it is changed.
        force: merge even if the base's weight fingerprint differs from the expert's.
    """
    merged = merged_model(expert, name, base=base, force=force)
    model = merged.model.to(torch.float32)
    if len(expert.languages) == 1 and getattr(model.generation_config, "is_multilingual", False):
        model.generation_config.language = expert.languages[0]
        model.generation_config.task = "transcribe"
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        merged.processor.save_pretrained(staging)
        # transformers 5 folds this into processor_config.json; faster-whisper and older loaders read this file
        merged.processor.feature_extractor.save_pretrained(staging)
        atomic_write_text(staging / EXPERT_RECORD, json.dumps(
            {"expert": name, "merged_into": merged.name, "manifest": expert.manifest}, indent=2, ensure_ascii=False))
    return out_dir


def expert_label(identity: dict | None) -> str:
    """How an expert is named in messages and records: its registry ref, else its file, else ``expert``
    (``identity`` as ``registry.lookup.open_expert`` returns it)."""
    return (identity or {}).get("ref") or (identity or {}).get("file") or "expert"


def merge_into_base(expert: Expert, name: str, *, identity: dict | None = None, base: Base | None = None,
                    home=None, overwrite: bool = False, force: bool = False, progress=print) -> Path:
    """Register the expert's base with the expert merged in as a new base ``name``: a student whose shared weights
    were distilled (``distill --kind full`` stores them as a ``task_vector`` of the cut base) becomes a base that
    language experts train and load on. Unlike :func:`export_hf`, no language becomes the generation default.

    Args:
        expert: a ``lora``, ``task_vector`` or ``sparse`` expert.
        name: the new base's name.
        identity: how the expert was named (``registry.lookup.open_expert``'s second value), kept in the base's
            record (``base.json``, ``merged``) with the base it was merged into.
        base: the loaded base to merge into (default: the one the manifest names); it is changed.
        overwrite: replace an existing base of that name.
        force: merge even if the base's weight fingerprint differs from the expert's.

    Returns:
        The registered directory.
    """
    from registry.bases import register_model
    from registry.home import bases_dir

    if (bases_dir(home) / name).exists() and not overwrite:  # refused before any work, naming both ways out
        raise FileExistsError(f"a base named {name} exists ({bases_dir(home) / name}): choose another --name, or "
                              "pass --overwrite to replace it")
    what = expert_label(identity)
    check_mergeable(expert, what)
    base = base or load_base(expert.manifest["base"].get("name") or "whisper-base", home=home, device="cpu")
    merged = merged_model(expert, what, base=base, force=force)
    lineage = {"into": merged.name, "fingerprint": merged.fingerprint, "expert": identity or {},
               "kind": expert.kind, "languages": list(expert.languages)}
    return register_model(merged.model.to(torch.float32), merged.processor, name, home=home, overwrite=overwrite,
                          progress=progress, record_extra={"merged": lineage})


def export_ct2_expert(expert: Expert, out_dir: str | os.PathLike, name: str = "expert", *,
                      quantization: str = "int8", base: Base | None = None, force: bool = False) -> Path:
    """Write the base with ``expert`` merged in as a CTranslate2 model directory that faster-whisper's
    ``WhisperModel(out_dir)`` loads (converted by CTranslate2's own converter from :func:`export_hf`'s output).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # the intermediate transformers copy sits beside the output (same filesystem) and is not kept
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.hf-") as tmp:
        hf_dir = export_hf(expert, Path(tmp) / "model", name, base=base, force=force)
        export_ct2(hf_dir, out_dir, quantization)
        atomic_write_text(out_dir / EXPERT_RECORD, (hf_dir / EXPERT_RECORD).read_text())
    return out_dir
