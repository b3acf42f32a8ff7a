"""One language of a CLSR Whisper as an expert file (kind ``clsr``): its paths and gates, saved and loaded.

Tensor names are the Whisper module paths they attach to, without the language (the manifest names it, and an
expert can be loaded under another name):

``model.encoder.layers.0.fc1.expert.weight`` / ``.bias``     full path: the language's copy of fc1
``model.encoder.layers.0.fc1.expert.lora_A`` / ``.lora_B``   low-rank path: (rank, in) / (out, rank) delta on fc1
``model.encoder.layers.0.fc1.gate.w1.weight`` / ``.w1.bias`` / ``.w2.weight``   the gate
``model.encoder.layers.0.fc2.expert.*``                       the path on fc2
``model.decoder.layers.0.self_attn.q_proj.expert.*`` / ``.gate.*``   with ``attention``: the path and gate on
                                                              each gated attention projection

The manifest's hyperparameters are :meth:`ClsrConfig.hyperparameters` (``path``: full | lowrank, ``rank`` and
``alpha`` for low-rank, ``gate_hidden``, dropouts, ``gate_inference`` (how inference uses its gates: hard or
soft; every loader applies it; missing in older files: hard), and the layout: ``side``, ``encoder_start`` and
``attention``, which say which FFN blocks (and attention projections) the expert covers). An expert loads only into
a CLSR model of the same layout. Tensors keep the model's dtype.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from distill.clsr.config import ClsrConfig, recorded_gate_inference, recorded_layout
from distill.clsr.layer import LowRankPath
from distill.clsr.model import (ATTENTION_SLOTS, add_language, clsr_layers, clsr_projections, clsr_routing,
                                language_parameters, remove_language, require_language)
from registry.expert_file import Expert, ExpertFormatError, check_compatible, load_expert, new_manifest, save_expert

_NAME = re.compile(r"^(?P<layer>.+)\.(?P<slot>fc1\.expert|fc1\.gate|fc2\.expert"
                   r"|(?:self_attn|encoder_attn)\.[qkvout]+_proj\.(?:expert|gate))\.(?P<param>[^.]+(\.[^.]+)?)$")


def _language_modules(model: torch.nn.Module, language: str):
    """``(layer path, slot, module)`` of each piece of ``language`` in the model; slots as in tensor names."""
    require_language(model, language)
    for name, fc1, fc2 in clsr_layers(model):
        yield name, "fc1.expert", fc1.experts[language]
        yield name, "fc1.gate", fc1.gates[language]
        yield name, "fc2.expert", fc2.experts[language]
    for name, slot, proj in clsr_projections(model):
        yield name, f"{slot}.expert", proj.experts[language]
        yield name, f"{slot}.gate", proj.gates[language]


def clsr_expert_tensors(model: torch.nn.Module, language: str) -> dict[str, torch.Tensor]:
    """``language``'s path and gate tensors under their expert-file names (CPU copies, model dtype)."""
    return {f"{layer}.{slot}.{pname}": p.detach().to("cpu").clone()
            for layer, slot, module in _language_modules(model, language) for pname, p in module.named_parameters()}


def language_config(model: torch.nn.Module, language: str) -> ClsrConfig:
    """The CLSR config of one language's paths (path kind, rank, alpha and gate size read from its modules)."""
    require_language(model, language)
    _, fc1, _ = clsr_layers(model)[0]
    path, gate = fc1.experts[language], fc1.gates[language]
    routing = clsr_routing(model)
    cfg = replace(routing.config, gate_hidden=gate.w1.out_features, gate_inference=routing.gate_mode(language))
    if isinstance(path, LowRankPath):
        return replace(cfg, kind="lowrank", rank=path.rank, alpha=path.alpha)
    return replace(cfg, kind="full")


def make_clsr_expert(model: torch.nn.Module, language: str, base, **manifest_fields) -> Expert:
    """An in-memory ``clsr`` expert holding ``language``'s paths and gates.

    Args:
        base: the ``registry.bases.Base`` the CLSR model was converted from (or a dict with ``name``,
            ``fingerprint``, ``tokenizer_fingerprint``).
        manifest_fields: ``data``, ``metrics``, ``lineage`` ... for the manifest.
    """
    hyperparameters = language_config(model, language).hyperparameters()
    hyperparameters["layers"] = len(clsr_layers(model))
    return Expert(clsr_expert_tensors(model, language),
                  new_manifest("clsr", [language], base, hyperparameters, **manifest_fields))


def save_clsr_expert(model: torch.nn.Module, language: str, path: Path | str, base, **manifest_fields) -> Path:
    """Write ``language``'s ``clsr`` expert file (atomically); returns its path."""
    return save_expert(make_clsr_expert(model, language, base, **manifest_fields), path)


def _parse(expert: Expert, where: str) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """layer -> slot (``fc1.expert``, ``fc1.gate``, ``fc2.expert``, ``self_attn.q_proj.expert`` ...) -> parameter
    -> tensor."""
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in expert.tensors.items():
        m = _NAME.match(key)
        if not m:
            raise ExpertFormatError(f"{where}: tensor {key!r} is not a CLSR path or gate tensor "
                                    "(expected <layer>.fc1.expert.*, <layer>.fc1.gate.*, <layer>.fc2.expert.*, "
                                    "or <layer>.self_attn.q_proj.expert.* / .gate.* and the like)")
        layers.setdefault(m["layer"], {}).setdefault(m["slot"], {})[m["param"]] = tensor
    return layers


def clsr_modules(expert: Expert) -> list[str]:
    """The module paths a ``clsr`` expert replaces by gated layers (fc1 / fc2, and attention projections when its
    layout has them), from its tensor names alone."""
    matches = [m for m in map(_NAME.match, expert.tensors) if m]
    layers = {m["layer"] for m in matches}
    projections = {f"{m['layer']}.{m['slot'].rsplit('.', 1)[0]}" for m in matches if "_attn." in m["slot"]}
    return [f"{layer}.{fc}" for layer in sorted(layers) for fc in ("fc1", "fc2")] + sorted(projections)


def attach_clsr_expert(model: torch.nn.Module, expert: Expert, base, *, language: str | None = None,
                       force: bool = False, trainable: bool = False, where: str = "CLSR expert") -> str:
    """Add a stored ``clsr`` expert to a CLSR Whisper as a language.

    Args:
        expert: a ``clsr`` expert (see the module docstring).
        base: the base the model was converted from (``registry.bases.Base`` or anything with ``name``,
            ``fingerprint``, ``tokenizer_fingerprint``); an expert trained on another base is refused.
        language: name to add it under (default: the manifest's language).
        force: load it even if the base weights differ (the tokenizer must still match).
        trainable: leave its tensors trainable (to go on training it).

    Returns:
        The language name it was added under.
    """
    if expert.kind != "clsr":
        raise ExpertFormatError(f"{where} is a {expert.kind!r} expert, not a 'clsr' expert")
    check_compatible(expert.manifest, base, force=force, what=where)
    language = language or (expert.languages[0] if expert.languages else None)
    if not language:
        raise ExpertFormatError(f"{where}: manifest names no language; pass language=")
    layout = recorded_layout(expert.manifest.get("hyperparameters", {}))
    model_layout = clsr_routing(model).config.layout
    if layout != model_layout:
        raise ValueError(f"{where} covers the FFN blocks of layout {_describe(layout)}, but the CLSR model was "
                         f"converted with layout {_describe(model_layout)}: load it into a model converted with "
                         f"convert_to_clsr(model, side={layout['side']!r}, encoder_start={layout['encoder_start']}"
                         f"{', attention=True' if layout['attention'] else ''})")
    layers = _parse(expert, where)
    want = [name for name, _, _ in clsr_layers(model)]
    if sorted(layers) != sorted(want):
        missing, extra = sorted(set(want) - set(layers)), sorted(set(layers) - set(want))
        raise ValueError(f"{where} does not fit this model: " + "; ".join(
            s for s in (f"no tensors for layers {', '.join(missing)}" if missing else "",
                        f"tensors for layers the model lacks: {', '.join(extra)}" if extra else "") if s)
            + " (it was made for another Whisper size)")
    first = layers[want[0]]
    path = "lowrank" if "lora_A" in first.get("fc1.expert", {}) else "full"
    hp = expert.manifest.get("hyperparameters", {})
    if hp.get("path", path) != path:
        raise ExpertFormatError(f"{where}: manifest says path {hp['path']!r} but its tensors hold a {path} path")
    options = {"kind": path, "gate_hidden": first["fc1.gate"]["w1.weight"].shape[0],
               "gate_inference": recorded_gate_inference(hp)}
    if path == "lowrank":
        alpha = float(hp.get("alpha", clsr_routing(model).config.alpha))
        options.update(rank=first["fc1.expert"]["lora_A"].shape[0], alpha=alpha)
    add_language(model, language, **options)
    try:
        for layer, slot, module in _language_modules(model, language):
            prefix, given = f"{layer}.{slot}", layers[layer].get(slot, {})
            own = dict(module.named_parameters())
            if set(given) != set(own):
                raise ExpertFormatError(f"{where}: {prefix} has tensors {sorted(given)}, expected {sorted(own)}")
            for pname, p in own.items():
                if tuple(given[pname].shape) != tuple(p.shape):
                    raise ValueError(f"{where}: {prefix}.{pname} has shape {tuple(given[pname].shape)}, the model "
                                     f"needs {tuple(p.shape)} (made for another Whisper size)")
                with torch.no_grad():
                    p.copy_(given[pname])
        seen = {(layer, slot) for layer, slot, _ in _language_modules(model, language)}
        if extra := sorted(f"{layer}.{slot}" for layer, slots in layers.items() for slot in slots
                           if (layer, slot) not in seen):
            raise ExpertFormatError(f"{where}: tensors for modules outside its recorded layout ({_describe(layout)}): "
                                    f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}; the manifest and "
                                    "the tensors disagree (the file was edited or damaged)")
    except BaseException:
        remove_language(model, language)
        raise
    for p in language_parameters(model, language).values():
        p.requires_grad_(trainable)
    return language


def _describe(layout: dict) -> str:
    start = f", encoder_start {layout['encoder_start']}" if layout["side"] != "decoder" else ""
    return f"side {layout['side']}{start}" + (", attention projections" if layout.get("attention") else "")


def load_clsr_expert(model: torch.nn.Module, path: Path | str, base, **kwargs) -> str:
    """Read a ``clsr`` expert file and attach it (see :func:`attach_clsr_expert`); returns the language."""
    return attach_clsr_expert(model, load_expert(path), base, where=f"CLSR expert {path}", **kwargs)


def parameters_per_language(whisper_config, config: ClsrConfig = ClsrConfig()) -> int:
    """Parameters one language adds (and its expert file stores), from a ``WhisperConfig``'s shapes.

    Per layer: the path (full: fc1 + fc2 with biases; low-rank: ``rank * (d_model + ffn_dim)`` for each of fc1
    and fc2) plus the gate (``d_model * hidden + hidden + hidden``), over the layers of the config's layout (all
    encoder and decoder layers by default); with ``attention``, each gated projection's path (full: weight and
    bias; low-rank: ``2 * rank * d_model``) and gate too.
    """
    d, h = whisper_config.d_model, config.gate_hidden
    total = 0
    for layers, ffn, projections in _covered(whisper_config, config):
        path = (d * ffn + ffn + ffn * d + d) if config.kind == "full" else 2 * config.rank * (d + ffn)
        # each gated projection (d -> d): its path (full: weight and bias; low-rank: 2 * rank * d) and its gate
        projection = (d * d + d) if config.kind == "full" else 2 * config.rank * d
        total += layers * (path + d * h + 2 * h + projections * (projection + d * h + 2 * h))
    return total


def parameters_active_per_token(whisper_config, config: ClsrConfig = ClsrConfig()) -> int:
    """Parameters a token's forward uses beyond the base's, at most (every gate open), from a ``WhisperConfig``.

    A hard gate sends each token through one path: a full path replaces the shared FFN (same size, so only the
    gate adds parameters); a low-rank path adds its delta to the shared FFN. So: the gates of every CLSR layer,
    plus the low-rank deltas for ``kind="lowrank"``. Add the base's parameter count for the total.
    """
    d, h = whisper_config.d_model, config.gate_hidden
    lowrank = config.kind == "lowrank"
    total = 0
    for layers, ffn, projections in _covered(whisper_config, config):
        total += layers * (d * h + 2 * h + (2 * config.rank * (d + ffn) if lowrank else 0))
        total += layers * projections * (d * h + 2 * h + (2 * config.rank * d if lowrank else 0))
    return total


def _covered(whisper_config, config: ClsrConfig) -> list[tuple[int, int, int]]:
    """``(number of CLSR layers, ffn_dim, gated attention projections per layer)`` of the encoder and the decoder
    under the config's layout."""
    config = config.for_encoder(whisper_config.encoder_layers)  # a negative start counts from the top
    encoder = whisper_config.encoder_layers - config.encoder_start if config.touches_encoder else 0
    decoder = whisper_config.decoder_layers if config.side in ("decoder", "both") else 0

    def projections(stack: str) -> int:
        return sum(len(p) for _, p in ATTENTION_SLOTS[stack]) if config.attention else 0

    return [(encoder, whisper_config.encoder_ffn_dim, projections("encoder")),
            (decoder, whisper_config.decoder_ffn_dim, projections("decoder"))]
