"""One table of expert kinds: per kind, what its stored tensors can do, and why not where they cannot.

Code that treats experts by kind (eval and its matrix, teachers, fusion, exports, packs and the expert bank)
asks the kind's :class:`ExpertKind` entry (:func:`expert_kind`) instead of testing ``expert.kind``. Adding a
kind is one entry, registered with :func:`register_kind` when the module that implements it is imported, as
merge methods are (``lora_experts.merge_methods``). The entries here are this package's kinds: ``lora``,
``task_vector``, ``sparse``, and ``mask`` (known to the file format, used by nothing yet). Kinds implemented by
packages above this one register themselves when those are imported; a kind without an entry is refused by
every operation, saying so.

The operations (:data:`OPERATIONS`):

===============  ==========================================================================================
``apply``        put in place on one model, and taken out again bit-exactly: ``eval --expert``, the eval matrix
                 (``eval --experts``), a teacher's experts (``distill --teacher``)
``task_vector``  per-parameter weight deltas: fusion (``fuse``, the merge methods)
``merge``        merged into the base's weights: ``registry export --format hf / ct2`` (needs a task vector)
``route``        routed per sample in an expert bank: ``pack create``, ``load_pack``, ``transcribe``, ``serve``
``peft``         written as a PEFT adapter: ``registry export --format peft``
===============  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_experts.deltas import TaskVector, apply_task_vector, lora_task_vector
from lora_experts.model import DEFAULT_ADAPTER, attach_expert, remove_experts, set_active_expert
from lora_experts.peft_format import write_peft_adapter
from lora_experts.sparse import apply_sparse, remove_sparse, sparse_deltas, sparse_task_vector
from registry.expert_file import KINDS as FILE_KINDS
from registry.expert_file import Expert

# operation -> how a refusal reads after "<what> is a '<kind>' expert and ..."
OPERATIONS = {
    "apply": "cannot be applied to a model",
    "task_vector": "has no task vector",
    "merge": "cannot be merged into Whisper's weights",
    "route": "cannot be routed in an expert bank",
    "peft": "has no PEFT form",
}
# How an expert bank serves a routable kind: "batched": its deltas become slots of the bank's batched linear
# layers (LoRA matrices, sparse deltas); "layers": the kind's own layers route, through a handler the runtime
# supplies for that kind (a CLSR expert's gated paths).
ROUTINGS = ("batched", "layers")


def _nothing() -> None:
    return None


@dataclass
class Applied:
    """An expert put in place on one model by its kind's ``apply``.

    Attributes:
        undo: restores the model bit-exactly (None when applied with ``restorable=False``).
        activate: makes this expert the one in force again before a forward pass: needed where several experts
            of a ``switchable`` kind share the model, or where the kind routes by language (CLSR); a no-op for
            kinds that are always in force once applied.
    """

    undo: Callable[[], None] | None
    activate: Callable[[], None] = _nothing


@dataclass(frozen=True)
class ExpertKind:
    """What one kind of expert can do. An operation is supported where its field is set; where it is not,
    ``why_not[operation]`` says why and what to do instead (required: checked at construction).

    Attributes:
        name: the manifest's ``kind``.
        summary: what the expert's tensors hold, in a line.
        apply: ``apply(model, expert, *, name, restorable) -> Applied``: put the expert in place on a plain model
            (checked against its base by the caller). ``name``: the name it is attached under where the kind
            names what it adds (a LoRA adapter); ``restorable=False`` skips keeping what ``undo`` needs (the
            expert stays for the model's lifetime).
        task_vector: ``task_vector(expert, *, as_dense) -> TaskVector``: its per-parameter weight deltas.
        routing: how an expert bank routes it, one of :data:`ROUTINGS`, or None.
        modules: the module paths the expert changes, from its tensor names (routable kinds; a bank checks
            kinds that replace modules against kinds that adapt them).
        bank_tensors: what the bank's batched layers take for it (``routing="batched"``): ``<module>.lora_A`` /
            ``.lora_B`` tensors, or parameter name -> ``SparseDelta``.
        peft: ``peft(expert, out_dir, *, base_model_name_or_path) -> Path``: write it as a PEFT adapter.
        switchable: several experts of the kind can be applied to one model at once, one in force at a time
            (``Applied.activate``), as LoRA adapters are.
        why_not: operation -> why the kind does not support it, and what to do instead.
    """

    name: str
    summary: str
    apply: Callable[..., Applied] | None = None
    task_vector: Callable[..., TaskVector] | None = None
    routing: str | None = None
    modules: Callable[[Expert], list[str]] | None = None
    bank_tensors: Callable[[Expert], Mapping] | None = None
    peft: Callable[..., Path] | None = None
    switchable: bool = False
    why_not: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.routing not in (None, *ROUTINGS):
            raise ValueError(f"expert kind {self.name!r}: routing must be one of {', '.join(ROUTINGS)} or None, "
                             f"not {self.routing!r}")
        if self.routing is not None and self.modules is None:
            raise ValueError(f"expert kind {self.name!r} is routable but says no modules (modules=...)")
        if self.routing == "batched" and self.bank_tensors is None:
            raise ValueError(f"expert kind {self.name!r} is routed in batched layers but has no bank_tensors")
        unexplained = [op for op in OPERATIONS if not self.supports(op) and not self.reason(op)]
        if unexplained:
            raise ValueError(f"expert kind {self.name!r} refuses {', '.join(unexplained)} without saying why; give "
                             "why_not={operation: reason} for each")

    def supports(self, operation: str) -> bool:
        """Whether the kind supports ``operation`` (one of :data:`OPERATIONS`)."""
        if operation not in OPERATIONS:
            raise KeyError(f"unknown expert operation {operation!r}; known: {', '.join(OPERATIONS)}")
        return {"apply": self.apply, "task_vector": self.task_vector, "merge": self.task_vector,
                "route": self.routing, "peft": self.peft}[operation] is not None

    def reason(self, operation: str) -> str | None:
        """Why the kind does not support ``operation`` (None where it does). ``merge`` defaults to the reason
        there is no task vector."""
        if self.supports(operation):
            return None
        if operation == "merge":
            return self.why_not.get("merge") or self.why_not.get("task_vector")
        return self.why_not.get(operation)

    def require(self, operation: str, what: str, error: type[Exception] = ValueError) -> None:
        """Raise ``error`` unless the kind supports ``operation``: ``"<what> is a '<kind>' expert and has no PEFT
        form: <why, and what to do instead>"``."""
        if not self.supports(operation):
            raise error(f"{what} is a {self.name!r} expert and {OPERATIONS[operation]}: {self.reason(operation)}")

    @property
    def exports(self) -> tuple[str, ...]:
        """The formats it exports to: ``safetensors`` (the expert file), ``hf`` and ``ct2`` (merged), ``peft``."""
        merged = ("hf", "ct2") if self.supports("merge") else ()
        return ("safetensors", *merged, *(("peft",) if self.supports("peft") else ()))


_KINDS: dict[str, ExpertKind] = {}


def register_kind(kind: ExpertKind) -> ExpertKind:
    """Add ``kind`` to the table (at import of the module that implements it); returns it.

    Raises:
        ValueError: the expert file format does not know the name, or another entry has it already.
    """
    if kind.name not in FILE_KINDS:
        raise ValueError(f"expert kind {kind.name!r} is not a kind of the expert file format "
                         f"({', '.join(FILE_KINDS)}); add it to registry.expert_file.KINDS first")
    if _KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"expert kind {kind.name!r} is registered already; one entry per kind")
    _KINDS[kind.name] = kind
    return kind


def expert_kind(name: str) -> ExpertKind:
    """The entry of kind ``name``. A kind with no entry in this process gets one that refuses every operation,
    saying so."""
    kind = _KINDS.get(name)
    if kind is not None:
        return kind
    why = (f"no entry for expert kind {name!r} is registered in this process (registered: {', '.join(_KINDS)}); "
           "a kind implemented by a package above lora_experts registers when that package is imported")
    return ExpertKind(name, "(no entry registered)", why_not=dict.fromkeys(OPERATIONS, why))


def registered_kinds() -> dict[str, ExpertKind]:
    """Name -> entry of every registered kind, in registration order."""
    return dict(_KINDS)


# ------------------------------------------------------------------------------------------------ lora
def _apply_lora(model: torch.nn.Module, expert: Expert, *, name: str = DEFAULT_ADAPTER,
                restorable: bool = True) -> Applied:
    # peft wraps each adapted layer; removing the wrappers gives the original layers back (the base, bit-exact).
    attach_expert(model, expert.tensors, expert.manifest.get("hyperparameters", {}), name)
    return Applied(undo=lambda: remove_experts(model), activate=lambda: set_active_expert(model, name))


def _write_peft(expert: Expert, out_dir, *, base_model_name_or_path: str | None = None) -> Path:
    return write_peft_adapter(expert.tensors, expert.manifest.get("hyperparameters", {}), out_dir,
                              base_model_name_or_path=base_model_name_or_path)


LORA = register_kind(ExpertKind(
    "lora", "LoRA matrices per adapted linear layer (<module>.lora_A / .lora_B); delta alpha/rank * B @ A",
    apply=_apply_lora,
    task_vector=lambda expert, *, as_dense=False: lora_task_vector(
        expert.tensors, expert.manifest.get("hyperparameters", {}), as_dense=as_dense),
    routing="batched", modules=lambda expert: sorted({k.rsplit(".", 1)[0] for k in expert.tensors
                                                       if k.endswith(".lora_A")}),
    bank_tensors=lambda expert: expert.tensors, peft=_write_peft, switchable=True))


# ------------------------------------------------------------------------------------------------ task_vector
def _apply_dense(model: torch.nn.Module, expert: Expert, *, name: str = DEFAULT_ADAPTER,
                 restorable: bool = True) -> Applied:
    params = dict(model.named_parameters())
    # Copies of what the expert touches, written back by undo; unknown names are left for apply_task_vector.
    saved = {n: params[n].detach().clone() for n in expert.tensors if n in params} if restorable else {}

    def undo() -> None:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)

    try:
        apply_task_vector(model, expert.tensors)
    except BaseException:
        undo()
        raise
    return Applied(undo=undo if restorable else None)


TASK_VECTOR = register_kind(ExpertKind(
    "task_vector", "dense weight deltas named by the parameter they add to (a fine-tune, or a fusion that is not "
                   "low-rank)",
    apply=_apply_dense, task_vector=lambda expert, *, as_dense=False: dict(expert.tensors),
    why_not={"route": "its deltas are dense, with no per-sample form in the bank's batched layers. Add it to the "
                      "weights with lora_experts.task_vectors.apply_task_vector (eval --expert does), or fuse it "
                      "into a LoRA expert first (whisper-experts fuse --method svd --option rank=R)",
             "peft": "only LoRA experts have one, and its deltas are dense; export it merged (--format hf or ct2), "
                     "or fuse it into a LoRA expert first (whisper-experts fuse --method svd --option rank=R)"}))


# ------------------------------------------------------------------------------------------------ sparse
def _apply_sparse(model: torch.nn.Module, expert: Expert, *, name: str = DEFAULT_ADAPTER,
                  restorable: bool = True) -> Applied:
    restore = apply_sparse(model, expert)  # the original entries only: cheap to keep either way
    return Applied(undo=lambda: remove_sparse(model, restore))


SPARSE = register_kind(ExpertKind(
    "sparse", "new values for a masked set of weight entries (<param>.values, with .indices or .bitmap)",
    apply=_apply_sparse, task_vector=lambda expert, *, as_dense=False: sparse_task_vector(expert),
    routing="batched", modules=lambda expert: sorted({k.rsplit(".", 2)[0] for k in expert.tensors
                                                       if k.endswith(".values")}),
    bank_tensors=sparse_deltas,
    why_not={"peft": "only LoRA experts have one, and its deltas are single weight entries; export it merged "
                     "(--format hf or ct2)"}))


# ------------------------------------------------------------------------------------------------ mask
_MASK = ("a mask selects weight entries but changes none; train a sparse expert on it "
         "(whisper-experts train --kind sparse)")
MASK = register_kind(ExpertKind("mask", "which weight entries a sparse expert may change, without values",
                                why_not=dict.fromkeys(OPERATIONS, _MASK)))
