"""Attach a pack's experts to a live Whisper: :func:`load_pack` (a whole pack, or some of its experts) and
:func:`add_expert` (one more expert), both checked against the base as single experts are
(:func:`registry.expert_file.check_compatible`). ``lora``, ``sparse`` and ``clsr`` experts go into the model's
:class:`~inference.bank.ExpertBank` for per-sample routing, each as :mod:`inference.attach` describes.

The file format itself (writing, inspecting, reading tensors) is :mod:`registry.packs`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

from inference.attach import attach_experts, check_routable
from inference.bank import ExpertBank, expert_bank
from inference.batched_layer import BatchedLoraLinear
from registry.expert_file import Expert, check_compatible
from registry.packs import inspect_pack, read_tensors, select_names


def _model_and_identity(base_or_model, pack_base: dict):
    """(model, bank or None, identity to check against, description of what was checked)."""
    if hasattr(base_or_model, "model") and hasattr(base_or_model, "fingerprint"):  # a registry.bases.Base
        model = base_or_model.model
        identity = SimpleNamespace(name=base_or_model.name, fingerprint=base_or_model.fingerprint,
                                   tokenizer_fingerprint=base_or_model.tokenizer_fingerprint)
        return model, expert_bank(model, create=False), identity
    model = base_or_model
    bank = expert_bank(model, create=False)
    if bank is not None and bank.base is not None:
        return model, bank, SimpleNamespace(**bank.base)
    from distill.clsr.model import is_clsr

    if any(isinstance(m, BatchedLoraLinear) for m in model.modules()) or is_clsr(model):
        raise ValueError("this model carries experts whose base is unknown; pass the registry.bases.Base it was "
                         "loaded as, so the pack can be checked against it")
    from registry.fingerprint import weight_fingerprint

    # A bare model does not know its tokenizer: only its weights are checked.
    identity = SimpleNamespace(name="the given model", fingerprint=weight_fingerprint(model),
                               tokenizer_fingerprint=pack_base.get("tokenizer_fingerprint"))
    return model, bank, identity


def load_pack(base_or_model, path: Path | str, *, names: Iterable[str] | None = None, force: bool = False,
              verify: bool = True) -> ExpertBank:
    """Attach a pack's experts (``lora``, ``sparse``, ``clsr``) to a Whisper in memory, in one call, for
    per-sample routing (see :mod:`inference.attach`).

    Args:
        base_or_model: a ``registry.bases.Base`` (its fingerprints are checked), or a bare
            ``WhisperForConditionalGeneration`` (its weight fingerprint is computed; its tokenizer is unknown).
        path: the pack file (read memory-mapped).
        names: load only these experts of the pack (default: all, in pack order).
        force: attach even if the experts were trained on other weights (the tokenizer must still match).
        verify: check each expert's tensor digest (catches bit rot that the safetensors header cannot).

    Returns:
        The model's :class:`~inference.bank.ExpertBank` (created, or the existing one extended); expert ids
        follow the pack's order after experts already attached.

    Raises:
        PackFormatError: missing, truncated or corrupt pack.
        ExpertMismatchError: the pack's experts were made for another base (``force`` skips the weight check).
        ValueError: an expert of a kind the bank cannot route, a name already attached, modules this model does
            not have, or CLSR experts beside LoRA / sparse experts on fc1/fc2.
    """
    path = Path(path)
    info = inspect_pack(path)
    names = select_names(info, names)
    model, bank, identity = _model_and_identity(base_or_model, info.base)
    check_compatible({"base": info.base}, identity, force=force, what=f"pack {path}")
    for name in names:
        entry = info.entry(name)
        check_routable(name, entry.kind, f"pack {path}")
        check_compatible(entry.manifest, identity, force=force, what=f"expert {name} in pack {path}")
        if bank is not None and name in bank:
            raise ValueError(f"pack {path}: an expert named {name} is already attached; remove it first")
    tensors = read_tensors(path, info, names, verify)
    bank = attach_experts(model, {n: Expert(tensors[n], info.entry(n).manifest) for n in names}, identity,
                          force=force, where=f"pack {path}",
                          info={n: {"pack": str(path), "ref": info.entry(n).ref, "sha256": info.entry(n).sha256}
                                for n in names})
    if bank.base is None:
        bank.base = {"name": identity.name, "fingerprint": identity.fingerprint,
                     "tokenizer_fingerprint": identity.tokenizer_fingerprint}
    return bank


def add_expert(base_or_model, expert: Expert, name: str, *, force: bool = False) -> int:
    """Attach one more expert (``lora``, ``sparse`` or ``clsr``) to a live model's bank, checked like a pack's;
    returns its expert id.

    Remove one with ``expert_bank(model).remove(name)``; removing the last restores the base bit-exactly.
    """
    check_routable(name, expert.kind, "add_expert")
    model, bank, identity = _model_and_identity(base_or_model, expert.manifest["base"])
    check_compatible(expert.manifest, identity, force=force, what=f"expert {name}")
    bank = attach_experts(model, {name: expert}, identity, force=force, where=f"expert {name}")
    index = bank.index(name)
    if bank.base is None:
        bank.base = vars(identity).copy()
    return index
