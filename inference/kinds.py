"""The whole table of expert kinds, as the runtime and the command line see it.

The entries are :mod:`lora_experts.kinds` (``lora``, ``task_vector``, ``sparse``, ``mask``) and ``clsr``, which
:mod:`distill.clsr.kind` registers; importing this module makes sure every one is registered, so
:func:`expert_kind` here never misses a kind this package knows. How an expert bank attaches each routable kind
is :mod:`inference.attach` (``routing="batched"``: the bank's batched layers; ``"layers"``: a handler per kind).
See ``docs/concepts.md`` for the table of kinds x operations.
"""

from __future__ import annotations

from distill.clsr.kind import CLSR
from lora_experts.kinds import OPERATIONS, ExpertKind, expert_kind, registered_kinds

__all__ = ["CLSR", "OPERATIONS", "ExpertKind", "all_kinds", "expert_kind", "routable"]


def all_kinds() -> dict[str, ExpertKind]:
    """Name -> entry of every kind (registration order: ``lora``, ``task_vector``, ``sparse``, ``mask``,
    ``clsr``)."""
    return registered_kinds()


def routable() -> list[str]:
    """The kinds an expert bank routes, in table order."""
    return [name for name, kind in registered_kinds().items() if kind.supports("route")]
