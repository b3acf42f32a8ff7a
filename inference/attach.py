"""Attaching stored experts of every routable kind to a live Whisper's expert bank (what ``load_pack`` and
``add_expert`` do once the experts are checked against the base).

=========  =============================================================  ===========================================
kind       how it joins the model's :class:`~inference.bank.ExpertBank`  how the bank's routing serves a sample
=========  =============================================================  ===========================================
``lora``   A/B stacked in each adapted layer's ``BatchedLoraLinear``       its rows gather their expert's A and B:
                                                                          two batched matmuls per layer
``sparse`` its deltas on linear weights, in the same batched layers        one block-diagonal sparse matmul per layer
                                                                          (``inference.batched_sparse``)
``clsr``   a language path and gate in every fc1/fc2 (the model is         the sample's CLSR language (its expert's),
           converted to CLSR once; ``inference.clsr_bank``)                  or the shared path: hard routing only
=========  =============================================================  ===========================================

All kinds share expert ids and one routing; a mixed batch (and ``generate`` with beams) runs in one forward pass.
CLSR experts and LoRA / sparse experts on fc1/fc2 cannot share a model (those layers become CLSR pairs): refused.
"""

from __future__ import annotations

from typing import Mapping

from inference.bank import ExpertBank, expert_bank
from lora_experts.sparse import sparse_deltas
from registry.expert_file import Expert

ROUTABLE = ("lora", "sparse", "clsr")  # kinds an expert bank routes


def check_routable(name: str, kind: str, where: str) -> None:
    """Refuse a kind the bank cannot route, saying what to do with it instead."""
    if kind in ROUTABLE:
        return
    hint = {"task_vector": " Add it to the weights with lora_experts.task_vectors.apply_task_vector, or fuse it into "
                           "a LoRA expert first.",
            "mask": " A mask alone changes no weights; train a sparse expert on it (whisper-experts train --kind "
                    "sparse)."}
    raise ValueError(f"{where}: expert {name} is a {kind!r} expert; an expert bank routes "
                     f"{', '.join(ROUTABLE)} experts (leave it out with names=...).{hint.get(kind, '')}")


def adapted_modules(expert: Expert) -> list[str]:
    """The module paths a LoRA or sparse expert adapts, from its tensor names alone."""
    if expert.kind == "lora":
        return sorted({k.rsplit(".", 1)[0] for k in expert.tensors if k.endswith(".lora_A")})
    if expert.kind == "sparse":  # <module>.weight.values / .indices / .bitmap
        return sorted({k.rsplit(".", 2)[0] for k in expert.tensors if k.endswith(".values")})
    return []


def attach_experts(model, experts: Mapping[str, Expert], base, *, force: bool = False,
                   info: Mapping[str, dict] | None = None, where: str = "experts") -> ExpertBank:
    """Attach checked experts to ``model``'s bank, in order (their expert ids follow that order).

    Args:
        experts: name -> expert of a routable kind, already checked against the base by the caller.
        base: the base identity (``name``, ``fingerprint``, ``tokenizer_fingerprint``) CLSR experts are checked
            against again when they are added.
        force: accept experts trained on other weights of the same architecture and tokenizer.
        info: name -> provenance kept in the bank.
        where: names the source in errors (``pack packs/eu3.safetensors``).

    Returns:
        The model's bank. On error nothing of ``experts`` stays attached.
    """
    from inference.clsr_bank import add_clsr_experts, check_ffn_free, clsr_modules

    for name, expert in experts.items():
        check_routable(name, expert.kind, where)
    existing = expert_bank(model, create=False)
    clsr = {n: clsr_modules(e) for n, e in experts.items() if e.kind == "clsr"}
    if existing is not None:
        clsr.update({e.name: list(e.modules) for e in existing.experts if e.kind == "clsr"})
    others = {n: adapted_modules(e) for n, e in experts.items() if e.kind in ("lora", "sparse")}
    if existing is not None:
        others.update({e.name: list(e.modules) for e in existing.experts if e.kind in ("lora", "sparse")})
    check_ffn_free(clsr, others, f"{where}: ")
    bank = existing or expert_bank(model)
    before = set(bank.names)
    names = list(experts)
    try:
        start = 0
        while start < len(names):  # consecutive runs of CLSR / other experts keep the given order as expert ids
            is_clsr = experts[names[start]].kind == "clsr"
            end = start
            while end < len(names) and (experts[names[end]].kind == "clsr") == is_clsr:
                end += 1
            run = {n: experts[n] for n in names[start:end]}
            if is_clsr:
                add_clsr_experts(bank, run, base, force=force, info=info)
            else:
                bank.add_many({n: (sparse_deltas(e) if e.kind == "sparse" else e.tensors,
                                   e.manifest.get("hyperparameters", {}), e.languages) for n, e in run.items()}, info)
            start = end
    except BaseException:
        for name in [n for n in reversed(bank.names) if n not in before]:
            bank.remove(name)
        if not bank.experts:
            bank.clear()
        raise
    return bank
