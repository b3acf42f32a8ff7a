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
CLSR experts and LoRA / sparse experts on the modules CLSR replaces (fc1/fc2, gated projections) cannot share a
model: refused.

Which kinds a bank routes, and how, is each kind's entry in the table of kinds (:mod:`inference.kinds`):
``routing="batched"`` kinds give the bank's batched layers their ``bank_tensors``; a ``routing="layers"`` kind
is attached by its handler in :data:`LAYER_ROUTERS`. Other kinds are refused with their entry's reason.
"""

from __future__ import annotations

from typing import Callable, Mapping

from inference.bank import ExpertBank, expert_bank
from inference.clsr_bank import add_clsr_experts, check_clsr_free
from inference.kinds import expert_kind, routable
from registry.expert_file import Expert

# kind -> attaches experts of a kind whose own layers route (routing="layers"):
# handler(bank, {name: expert}, base, force=..., info=...) -> expert ids
LAYER_ROUTERS: dict[str, Callable[..., list[int]]] = {"clsr": add_clsr_experts}


def check_routable(name: str, kind: str, where: str, leave_out: str = "with names=...") -> None:
    """Refuse a kind the bank cannot route, saying why and what to do with it instead.

    Args:
        leave_out: how the caller leaves an expert out, for the message.
    """
    entry = expert_kind(kind)
    if entry.routing == "batched" or (entry.routing == "layers" and kind in LAYER_ROUTERS):
        return
    why = entry.reason("route") or f"this runtime has no handler for {kind} experts' own layers"
    raise ValueError(f"{where}: expert {name} is a {kind!r} expert; an expert bank routes "
                     f"{', '.join(routable())} experts (leave it out {leave_out}): {why}")


def adapted_modules(expert: Expert) -> list[str]:
    """The module paths a routable expert changes, from its tensor names alone (its kind's ``modules``)."""
    modules = expert_kind(expert.kind).modules
    return modules(expert) if modules is not None else []


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
    for name, expert in experts.items():
        check_routable(name, expert.kind, where)
    # How each is attached: "batched" (the bank's batched layers), or the kind whose layers-handler adds it.
    how = {n: e.kind if expert_kind(e.kind).routing == "layers" else "batched" for n, e in experts.items()}
    existing = expert_bank(model, create=False)
    # Kinds whose own layers replace modules (CLSR's gated layers), against kinds that adapt modules in place.
    replacing = {n: adapted_modules(e) for n, e in experts.items() if how[n] != "batched"}
    adapting = {n: adapted_modules(e) for n, e in experts.items() if how[n] == "batched"}
    if existing is not None:
        for e in existing.experts:
            (replacing if e.kind in existing.routed else adapting)[e.name] = list(e.modules)
    check_clsr_free(replacing, adapting, f"{where}: ")
    bank = existing or expert_bank(model)
    before = set(bank.names)
    names = list(experts)
    try:
        start = 0
        while start < len(names):  # consecutive runs attached one way keep the given order as expert ids
            end = start
            while end < len(names) and how[names[end]] == how[names[start]]:
                end += 1
            run = {n: experts[n] for n in names[start:end]}
            if how[names[start]] == "batched":
                bank.add_many({n: (expert_kind(e.kind).bank_tensors(e), e.manifest.get("hyperparameters", {}),
                                   e.languages) for n, e in run.items()}, info)
            else:
                LAYER_ROUTERS[how[names[start]]](bank, run, base, force=force, info=info)
            start = end
    except BaseException:
        for name in [n for n in reversed(bank.names) if n not in before]:
            bank.remove(name)
        if not bank.experts:
            bank.clear()
        raise
    return bank
