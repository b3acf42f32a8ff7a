"""CLSR experts in an expert bank: the bank's one routing also picks each sample's CLSR language.

A ``clsr`` expert is one language's path and gate in every CLSR fc1/fc2 pair, and in every gated attention
projection when its layout has ``attention`` (:mod:`distill.clsr.expert`).
:func:`add_clsr_experts` converts the model to CLSR once (unless it is already), adds each expert as a CLSR
language named after the expert, and lists it in the model's :class:`~inference.bank.ExpertBank` through
:class:`ClsrExperts`. The bank's routing then serves LoRA, sparse and CLSR experts alike::

    bank = expert_bank(model)
    add_clsr_experts(bank, {"uk-clsr": uk_expert, "pt-clsr": pt_expert}, base)
    with bank.route(["uk-clsr", None, "pt-clsr"]):    # set_language(model, ["uk-clsr", None, "pt-clsr"])
        model.generate(features, language=["uk", "en", "pt"], num_beams=2)

A sample routed to a CLSR expert runs that language's gates and paths; any other sample (served by another kind
of expert, or :data:`~inference.batched_layer.BASE_ONLY`) runs the shared path, which is the base FFN
exactly. Inside each CLSR layer a mixed batch is grouped by language (``ClsrRouting.groups``, beams included).
CLSR experts route hard: one per sample, at weight 1 (their gates already choose a path per token).

The model is converted with the experts' layout (``side``, ``encoder_start``, ``attention`` in their manifests:
every encoder and decoder FFN, or the decoder's only, ...); experts of different layouts cannot share one model.
A model holding CLSR experts has CLSR pairs for the fc1/fc2 of those layers (and gated attention projections with
``attention``), so LoRA or sparse experts cannot adapt those at the same time (and the other way round; modules
outside the layout stay free): :func:`check_clsr_free` refuses it with the modules named. Removing the last CLSR
expert converts the model back, bit-exactly, if this module converted it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from distill.clsr.config import recorded_layout
from distill.clsr.expert import attach_clsr_expert, clsr_modules
from distill.clsr.model import (check_language_name, clsr_languages, clsr_module_paths, convert_from_clsr,
                                convert_to_clsr, is_clsr, remove_language, set_language)
from inference.bank import ExpertBank, RoutedKind
from registry.expert_file import Expert

class ClsrExperts(RoutedKind):
    """The bank's handler of CLSR experts on one model (see the module docstring).

    Args:
        model: the CLSR Whisper.
        converted: whether it was converted for these experts (then the last removal converts it back).

    Attributes:
        languages: expert name -> its CLSR language key in the model's layers.
    """

    kind = "clsr"

    def __init__(self, model: torch.nn.Module, converted: bool):
        self.model, self.converted = model, converted
        self.languages: dict[str, str] = {}

    def route(self, names) -> None:
        if names is None or isinstance(names, str):
            set_language(self.model, None if names is None else self.languages[names])
        else:
            set_language(self.model, [None if n is None else self.languages[n] for n in names])

    def remove(self, name: str) -> None:
        remove_language(self.model, self.languages.pop(name))
        if self.converted and not self.languages and not clsr_languages(self.model):
            convert_from_clsr(self.model)


def check_clsr_free(clsr: Mapping[str, list[str]], others: Mapping[str, list[str]], where: str = "") -> None:
    """Refuse CLSR experts together with LoRA / sparse experts that adapt a module the CLSR experts replace (an
    fc1 or fc2, or a gated attention projection).

    Args:
        clsr: name -> the module paths it replaces (:func:`clsr_modules`), for the CLSR experts present
            (attached or about to be); nothing to check if empty.
        others: LoRA / sparse expert name -> the module paths it adapts.
    """
    if not clsr:
        return
    replaced = {m for modules in clsr.values() for m in modules}
    clash = {name: [m for m in modules if m in replaced] for name, modules in others.items()}
    clash = {name: modules for name, modules in clash.items() if modules}
    if clash:
        described = "; ".join(f"{name} adapts {', '.join(modules[:2])}{' ...' if len(modules) > 2 else ''}"
                              for name, modules in clash.items())
        raise ValueError(f"{where}CLSR experts ({', '.join(clsr)}) replace every fc1/fc2 of their layers (and, with "
                         "attention, the projections) by gated layers, so LoRA or sparse experts cannot adapt those "
                         f"in the same model: {described}. Load them into separate models, or leave one group out "
                         "(names=...)")


def clsr_key(name: str) -> str:
    """The CLSR language key an expert is added under: its name, '.' replaced by '_' (keys cannot hold dots)."""
    try:
        return check_language_name(name.replace(".", "_"))
    except ValueError as e:
        raise ValueError(f"CLSR expert {name!r} cannot be added under that name ({e}); rename it") from None


def add_clsr_experts(bank: ExpertBank, experts: Mapping[str, Expert], base, *, force: bool = False,
                     info: Mapping[str, dict] | None = None) -> list[int]:
    """Add ``clsr`` experts to ``bank``'s model (converted to CLSR if needed) and list them in the bank.

    Args:
        experts: name -> ``clsr`` expert; each becomes the CLSR language :func:`clsr_key` (name) of the model.
        base: what the experts are checked against (``name``, ``fingerprint``, ``tokenizer_fingerprint``).
        force: accept experts trained on other weights (the tokenizer must still match).
        info: name -> provenance kept in the bank.

    Returns:
        Their expert ids, in order. On any error nothing is added (and the model is not left converted).
    """
    model = bank.model
    clsr = {name: clsr_modules(e) for name, e in experts.items()}
    clsr.update({e.name: list(e.modules) for e in bank.experts if e.kind == ClsrExperts.kind})
    # Experts in the bank's batched layers (every kind no handler routes) adapt modules in place.
    check_clsr_free(clsr, {e.name: list(e.modules) for e in bank.experts if e.kind not in bank.routed})
    layouts = {name: recorded_layout(e.manifest.get("hyperparameters", {})) for name, e in experts.items()}
    if len({tuple(layout.items()) for layout in layouts.values()}) > 1:
        described = "; ".join(f"{name}: {layout}" for name, layout in layouts.items())
        raise ValueError(f"CLSR experts of different layouts cannot share one model ({described}); load them into "
                         "separate models")
    for name in experts:
        if name in bank:
            raise ValueError(f"an expert named {name!r} is already attached; remove it first or rename it")
    handler = bank.routed.get(ClsrExperts.kind)
    if handler is None:
        converted = not is_clsr(model)
        if converted:
            convert_to_clsr(model, **next(iter(layouts.values()), {}))
        handler = ClsrExperts(model, converted)
    added = []
    try:
        for name, expert in experts.items():
            key = clsr_key(name)
            if key in clsr_languages(model):
                raise ValueError(f"the model already has a CLSR language {key!r}; CLSR expert {name!r} cannot be "
                                 "added under that name (rename it, or remove the other first)")
            attach_clsr_expert(model, expert, base, language=key, force=force, where=f"CLSR expert {name}")
            handler.languages[name] = key
            added.append(name)
        modules = clsr_module_paths(model)
        return bank.add_routed(handler, {name: (expert.languages, modules, expert.manifest.get("hyperparameters", {}))
                                         for name, expert in experts.items()}, info)
    except BaseException:
        for name in added:
            handler.remove(name)
        if handler.converted and not handler.languages and is_clsr(model):
            convert_from_clsr(model)
        raise
