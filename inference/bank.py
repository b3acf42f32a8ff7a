"""An expert bank: many experts attached side by side to one Whisper, routed per sample.

Attaching wraps each adapted ``nn.Linear`` in a :class:`~inference.batched_layer.BatchedLoraLinear`; the
bank keeps the experts' names, languages and hyperparameters, and sets which expert serves which sample::

    bank = expert_bank(model)                      # created on first use, stored on the model
    bank.add_many({"uk": (tensors_uk, hyper_uk, ["uk"]), "pt": (tensors_pt, hyper_pt, ["pt"])})
    bank.add("nl", sparse_deltas(nl_expert), {}, ["nl"])   # a sparse expert: parameter -> SparseDelta
    with bank.route(["uk", "pt", None]):           # sample 0 -> uk, 1 -> pt, 2 -> base model only
        model.generate(features, language=["uk", "pt", "en"], num_beams=2)
    with bank.route(torch.tensor([[0, 1]] * 3), weights=torch.tensor([[0.7, 0.3]] * 3)):  # soft mixing
        model(input_features=features, decoder_input_ids=ids)
    bank.remove("uk"); bank.clear()                # clear() restores the base model bit-exactly

Every kind of expert shares one bank and one routing (expert ids, weights, :data:`BASE_ONLY`):

- ``lora``: LoRA matrices stacked per layer, each row's gathered and applied in two batched matmuls;
- ``sparse``: deltas on linear weights, each row's added by one block-diagonal sparse matmul per layer
  (:mod:`inference.batched_sparse`);
- kinds whose computation lives in the model's own layers (CLSR language paths and gates,
  :mod:`inference.clsr_bank`) join through a :class:`RoutedKind`: at every routing change the bank tells it
  which of its experts serves each sample. Such experts route hard (one per sample, at weight 1).

Outside a ``route`` block (or after ``set_routing(None)``) the model is the base model. This is the inference
path for mixed-language batches; peft-based :func:`lora_experts.model.attach_expert` stays the way to attach
one expert (training, PEFT interop). A model carries one or the other, not both at once.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from inference.batched_layer import BASE_ONLY, BatchedLoraLinear, Routing, RoutingState
from lora_experts.model import lora_modules
from lora_experts.sparse import SparseDelta
from lora_experts.task_vectors import lora_scale

BANK_ATTRIBUTE = "expert_bank"  # where a model keeps its bank
_versions = itertools.count(1)


@dataclass
class BankedExpert:
    """What the bank knows about one attached expert."""

    name: str
    languages: tuple[str, ...]
    hyperparameters: dict
    modules: dict[str, int] = field(default_factory=dict)  # module path -> rank (lora), entries (sparse), 0 (others)
    info: dict = field(default_factory=dict)  # free-form provenance (registry ref, sha256, manifest)
    kind: str = "lora"


class RoutedKind:
    """Interface: experts a bank routes but whose computation lives in the model's own layers (CLSR paths).

    The bank lists them beside its LoRA and sparse experts (names, languages, expert ids), so one routing serves
    every kind; it calls :meth:`route` at every routing change and :meth:`remove` when one is detached.

    Attributes:
        kind: the experts' kind (``clsr``).
    """

    kind: str = ""

    def route(self, names: str | list[str | None] | None) -> None:
        """Serve every sample with expert ``names`` (a str), sample n with ``names[n]`` (a list; None: no expert
        of this kind), or no sample with any (None)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Detach expert ``name`` from the model; after the last one the model's layers are its base layers again."""
        raise NotImplementedError


class ExpertBank:
    """Experts attached to ``model`` for per-sample routing (see the module docstring).

    Args:
        model: a ``WhisperForConditionalGeneration`` (any module with ``nn.Linear`` layers works).

    Attributes:
        experts: attached experts in index order (index i is expert id i in a routing).
        base: identity of the base the experts were checked against (``name``, ``fingerprint``,
            ``tokenizer_fingerprint``), set by whoever checked compatibility (``registry.packs``); None if unknown.
    """

    def __init__(self, model: nn.Module):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError("this model has peft experts attached (lora_experts.model.attach_expert); detach them "
                             "with remove_experts(model) before attaching an expert bank")
        self.model = model
        self.state = RoutingState()
        self.experts: list[BankedExpert] = []
        self.base: dict | None = None
        self.routed: dict[str, RoutedKind] = {}  # kind -> the handler of experts of that kind

    def __repr__(self) -> str:
        return f"ExpertBank({', '.join(self.names) or 'empty'})"

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def index(self, name: str) -> int:
        """The expert id of ``name``."""
        for i, e in enumerate(self.experts):
            if e.name == name:
                return i
        raise KeyError(f"no expert named {name!r} in this bank (attached: {', '.join(self.names) or 'none'})")

    def expert_for_language(self) -> dict[str, int]:
        """Language code -> expert id: the first attached expert that serves the language."""
        out: dict[str, int] = {}
        for i, e in enumerate(self.experts):
            for lang in e.languages:
                out.setdefault(lang, i)
        return out

    def layers(self) -> dict[str, BatchedLoraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, BatchedLoraLinear)}

    # ---------------------------------------------------------------------------------------- add / remove
    def add(self, name: str, tensors: Mapping[str, torch.Tensor], hyperparameters: Mapping,
            languages: Sequence[str] = (), info: dict | None = None) -> int:
        """Attach one LoRA or sparse expert; returns its expert id. See :meth:`add_many`."""
        self.add_many({name: (tensors, hyperparameters, languages)}, {name: info or {}})
        return self.index(name)

    def add_many(self, experts: Mapping[str, tuple], info: Mapping[str, dict] | None = None) -> list[int]:
        """Attach several LoRA and/or sparse experts at once (each layer's stacks are rebuilt once).

        Args:
            experts: name -> ``(tensors, hyperparameters, languages)``. LoRA: tensors keyed ``<module>.lora_A``
                (rank, in) / ``.lora_B`` (out, rank); hyperparameters give ``alpha`` (and optional
                ``alpha_pattern``), the scaling being ``alpha / rank`` per module exactly as peft applies it.
                Sparse: parameter name (``<linear module>.weight``) -> :class:`~lora_experts.sparse.SparseDelta`
                (``lora_experts.sparse.sparse_deltas`` of a stored expert), added at scale 1.
            info: optional name -> provenance dict kept in :attr:`BankedExpert.info`.

        Returns:
            The new experts' ids, in order.
        """
        new: list[BankedExpert] = []
        tensors_of: dict[str, dict] = {}
        modules = dict(self.model.named_modules())
        for name, (tensors, hyper, languages) in experts.items():
            self._check_new_name(name, tensors_of)
            tensors = dict(tensors)
            sparse = bool(tensors) and all(isinstance(t, SparseDelta) for t in tensors.values())
            if sparse:
                adapted = self._sparse_modules(name, tensors, modules)
                tensors = {module: tensors[f"{module}.weight"] for module in adapted}
            else:
                adapted = lora_modules(tensors)
                for module in adapted:
                    self._check_linear(name, module, modules.get(module))
            new.append(BankedExpert(name, tuple(languages), dict(hyper), adapted, dict((info or {}).get(name) or {}),
                                    "sparse" if sparse else "lora"))
            tensors_of[name] = tensors
        return self._attach(new, tensors_of)

    def add_routed(self, handler: RoutedKind, experts: Mapping[str, tuple],
                   info: Mapping[str, dict] | None = None) -> list[int]:
        """List experts that ``handler`` has attached to the model itself (see :class:`RoutedKind`).

        Args:
            experts: name -> ``(languages, modules, hyperparameters)``; ``modules``: the module paths the expert
                changes (so callers can tell whether it touches the encoder).

        Returns:
            The new experts' ids, in order.
        """
        if self.routed.get(handler.kind, handler) is not handler:
            raise ValueError(f"this bank already routes {handler.kind} experts through another handler")
        new, pending = [], {}
        for name, (languages, modules, hyper) in experts.items():
            self._check_new_name(name, pending)
            pending[name] = None
            new.append(BankedExpert(name, tuple(languages), dict(hyper), {m: 0 for m in modules},
                                    dict((info or {}).get(name) or {}), handler.kind))
        self.routed[handler.kind] = handler
        return self._attach(new, {})

    def _check_new_name(self, name, pending) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"invalid expert name {name!r}")
        if name in self.names or name in pending:
            raise ValueError(f"an expert named {name!r} is already attached; remove it first or rename it")

    @staticmethod
    def _check_linear(name: str, module: str, layer) -> None:
        if layer is None:
            raise ValueError(f"expert {name!r} adapts {module}, which this model does not have; it was made for a "
                             "different Whisper size")
        if not isinstance(layer, (nn.Linear, BatchedLoraLinear)):
            raise ValueError(f"expert {name!r} adapts {module}, which is a {type(layer).__name__} here, not a linear "
                             "layer (another kind of expert replaced it); load the two into separate models")

    def _sparse_modules(self, name: str, deltas: Mapping[str, SparseDelta], modules) -> dict[str, int]:
        """Module path -> entries of a sparse expert, after checking that every delta is on a linear weight."""
        out = {}
        for param, d in deltas.items():
            module, _, attr = param.rpartition(".")
            layer = modules.get(module)
            if attr != "weight" or not isinstance(layer, (nn.Linear, BatchedLoraLinear)):
                raise ValueError(f"sparse expert {name!r} changes {param}, which is not the weight of a linear layer "
                                 "of this model; the bank routes sparse deltas on linear weights only (apply this "
                                 "expert to the whole model with lora_experts.sparse.apply_sparse instead)")
            if tuple(d.shape) != tuple(layer.weight.shape):
                raise ValueError(f"sparse expert {name!r}: {param} has shape {tuple(d.shape)}, the model's is "
                                 f"{tuple(layer.weight.shape)}; it was made for a different Whisper size")
            out[module] = d.indices.numel()
        return out

    def _attach(self, new: list[BankedExpert], tensors_of: Mapping[str, dict]) -> list[int]:
        """Append ``new`` as expert slots of every batched layer (wrapping the layers they adapt first)."""
        layers = self.layers()
        for module in sorted({m for e in new if e.kind not in self.routed for m in e.modules}):  # batched kinds
            if module not in layers:
                layers[module] = self._wrap(module)
        count = len(self.experts)
        for path, layer in layers.items():
            pad = count - layer.num_experts
            lora = layer.slots() + [(None, None, 0.0)] * pad
            sparse = layer.sparse_slots() + [None] * pad
            for e in new:
                if e.kind == "lora" and path in e.modules:
                    t = tensors_of[e.name]
                    lora.append((t[f"{path}.lora_A"], t[f"{path}.lora_B"],
                                 lora_scale(e.hyperparameters, path, e.modules[path])))
                else:
                    lora.append((None, None, 0.0))
                sparse.append(tensors_of[e.name][path] if e.kind == "sparse" and path in e.modules else None)
            layer.set_slots(lora)
            layer.set_sparse_slots(sparse)
        self.experts.extend(new)
        self.set_routing(None)  # ids may have a new meaning; start from the base model
        return list(range(count, len(self.experts)))

    def remove(self, name: str) -> None:
        """Detach one expert; ids of later experts shift down by one. Layers no expert adapts any more are
        unwrapped, so removing the last expert restores the base model bit-exactly."""
        i = self.index(name)
        kind = self.experts[i].kind
        if kind in self.routed:
            self.routed[kind].remove(name)
        del self.experts[i]
        if kind in self.routed and not any(e.kind == kind for e in self.experts):
            del self.routed[kind]
        for path, layer in self.layers().items():
            lora, sparse = layer.slots(), layer.sparse_slots()
            del lora[i], sparse[i]
            if any(a is not None for a, _, _ in lora) or any(d is not None for d in sparse):
                layer.set_slots(lora)
                layer.set_sparse_slots(sparse)
            else:
                self._unwrap(path, layer)
        self.set_routing(None)
        if not self.experts:
            self.clear()

    def clear(self) -> None:
        """Detach every expert and the bank itself: the model is its base again (same modules, bit-exact)."""
        for e in reversed(self.experts):
            if e.kind in self.routed:
                self.routed[e.kind].remove(e.name)
        self.routed.clear()
        for path, layer in self.layers().items():
            self._unwrap(path, layer)
        self.experts.clear()
        self.state.routing = None
        if getattr(self.model, BANK_ATTRIBUTE, None) is self:
            delattr(self.model, BANK_ATTRIBUTE)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """An attached LoRA expert's matrices as stored (``<module>.lora_A`` / ``.lora_B``, CPU copies)."""
        i = self.index(name)
        if self.experts[i].kind != "lora":
            raise ValueError(f"expert {name!r} is a {self.experts[i].kind} expert, without LoRA matrices"
                             + ("; its deltas are bank.deltas(name)" if self.experts[i].kind == "sparse" else ""))
        out = {}
        for path, layer in self.layers().items():
            a, b, _ = layer.slots()[i]
            if a is not None:
                out[f"{path}.lora_A"] = a.detach().to("cpu").clone()
                out[f"{path}.lora_B"] = b.detach().to("cpu").clone()
        return out

    def deltas(self, name: str) -> dict[str, SparseDelta]:
        """An attached sparse expert's deltas: parameter name -> :class:`SparseDelta` (CPU copies)."""
        i = self.index(name)
        if self.experts[i].kind != "sparse":
            raise ValueError(f"expert {name!r} is a {self.experts[i].kind} expert, not a sparse one")
        return {f"{path}.weight": layer.sparse_slots()[i] for path, layer in self.layers().items()
                if path in self.experts[i].modules}

    def _wrap(self, path: str) -> BatchedLoraLinear:
        parent, _, child = path.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        layer = BatchedLoraLinear(getattr(owner, child), self.state)
        setattr(owner, child, layer)
        return layer

    def _unwrap(self, path: str, layer: BatchedLoraLinear) -> None:
        parent, _, child = path.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        setattr(owner, child, layer.base_layer)

    # -------------------------------------------------------------------------------------------- routing
    @property
    def routing(self) -> Routing | None:
        return self.state.routing

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _expert_id(self, item) -> int:
        if item is None:
            return BASE_ONLY
        if isinstance(item, str):
            return self.index(item)
        i = int(item)
        if not BASE_ONLY <= i < len(self.experts):
            raise IndexError(f"expert id {i} out of range: this bank has {len(self.experts)} expert(s) "
                             f"(ids 0..{len(self.experts) - 1}, {BASE_ONLY} for the base model)")
        return i

    def make_routing(self, experts=None, weights=None) -> Routing | None:
        """Build a :class:`Routing` from any accepted form (see :meth:`set_routing`)."""
        if experts is None:
            return None
        if hasattr(experts, "experts") and hasattr(experts, "weights") and weights is None:
            experts, weights = experts.experts, experts.weights  # a routing policy's decision
        if isinstance(experts, (str, int)):
            return Routing(None, None, uniform=self._expert_id(experts), version=next(_versions))
        if isinstance(experts, torch.Tensor):
            ids = experts.reshape(len(experts), -1).to("cpu", torch.long)
            table = [[self._expert_id(i) for i in row] for row in ids.tolist()]
        else:
            table = [[self._expert_id(i) for i in (row if isinstance(row, (list, tuple)) else [row])]
                     for row in experts]
        if not table or len({len(row) for row in table}) != 1:
            raise ValueError("routing needs the same number of experts (k >= 1) for every sample of a non-empty "
                             "batch; pad with None (the base model) and weight 0")
        device = self._device()
        ids = torch.tensor(table, dtype=torch.long, device=device)
        if weights is None:
            weights = torch.ones(ids.shape, device=device)
        else:
            weights = torch.as_tensor(weights, device=device).reshape(ids.shape)
            if not torch.is_floating_point(weights):
                weights = weights.float()
        # One expert for all at weight 1: the layers take their single-expert fast path.
        uniform = None
        if ids.shape[1] == 1 and len({row[0] for row in table}) == 1 and not weights.requires_grad \
                and bool((weights == 1).all()):
            uniform = table[0][0]
        return Routing(ids, weights, uniform=uniform, version=next(_versions))

    def set_routing(self, experts=None, weights=None) -> Routing | None:
        """Choose, for the next forward passes, which expert(s) serve each sample.

        Args:
            experts: None (base model for all); one name or id for every sample of any batch; a sequence with
                one entry per sample (name, id or None), or one list of k entries per sample; a long tensor
                (batch,) or (batch, k) of ids (-1: base); or a routing policy's decision (``experts`` and
                ``weights`` attributes).
            weights: (batch, k) mixing weights (default 1); e.g. the language posterior of the top-k experts.

        Returns:
            The :class:`Routing` now in force.
        """
        routing = self.make_routing(experts, weights)
        self._install(routing)
        return routing

    @contextlib.contextmanager
    def route(self, experts=None, weights=None) -> Iterator[Routing | None]:
        """:meth:`set_routing` for the duration of a ``with`` block; the previous routing is restored after."""
        previous = self.state.routing
        try:
            yield self.set_routing(experts, weights)
        finally:
            self._install(previous)

    def _install(self, routing: Routing | None) -> None:
        """Put ``routing`` in force for the layers and for every :class:`RoutedKind`."""
        names = {kind: self._routed_names(routing, kind) for kind in self.routed}  # may refuse: change nothing yet
        self.state.routing = routing
        for layer in self.layers().values():
            layer.clear_cache()
        for kind, handler in self.routed.items():
            handler.route(names[kind])

    def _routed_names(self, routing: Routing | None, kind: str):
        """What :meth:`RoutedKind.route` gets for ``routing``: one name, one per sample, or None."""
        if routing is None:
            return None
        members = {i for i, e in enumerate(self.experts) if e.kind == kind}
        if routing.uniform is not None:
            return self.experts[routing.uniform].name if routing.uniform in members else None
        names = []
        for n, (ids, ws) in enumerate(zip(routing.experts.tolist(), routing.weights.detach().tolist())):
            taken = [(i, w) for i, w in zip(ids, ws) if i in members and w != 0]
            if len(taken) > 1 or (taken and taken[0][1] != 1):
                raise ValueError(
                    f"sample {n} is routed to {kind} expert(s) {', '.join(self.experts[i].name for i, _ in taken)} "
                    f"with weight(s) {', '.join(f'{w:g}' for _, w in taken)}: {kind} experts route hard, one per "
                    "sample at weight 1 (soft mixing is for LoRA and sparse experts)")
            names.append(self.experts[taken[0][0]].name if taken else None)
        return names


def expert_bank(model: nn.Module, create: bool = True) -> ExpertBank | None:
    """The bank attached to ``model``; a new empty one if it has none and ``create`` (else None)."""
    bank = getattr(model, BANK_ATTRIBUTE, None)
    if bank is None and create:
        bank = ExpertBank(model)
        # A plain attribute (not a submodule): the bank holds no parameters of its own.
        object.__setattr__(model, BANK_ATTRIBUTE, bank)
    return bank
