"""Turning a Whisper into a CLSR Whisper and back, adding languages, and steering the routing.

:func:`convert_to_clsr` replaces ``fc1``/``fc2`` of every encoder and decoder layer (or of the layers the config's
``side`` / ``encoder_start`` choose: its *layout*) by a :class:`~distill.clsr.layer.ClsrFc1` /
:class:`~distill.clsr.layer.ClsrFc2` pair (in place). One layout per model: every language has a path and a gate in
every CLSR layer. The model stays a ``WhisperForConditionalGeneration``: its forward, ``generate`` and the
project's decoding work unchanged, and the routing is set beside them (:func:`set_language`,
:func:`set_noise_scale`). Parameter paths of a CLSR model:

``model.encoder.layers.0.fc1.shared.weight``          the pretrained fc1 (frozen; likewise ``fc2.shared``)
``model.encoder.layers.0.fc1.experts.uk.weight``      language uk's path on fc1 (``.lora_A``/``.lora_B`` if low-rank)
``model.encoder.layers.0.fc1.gates.uk.w1.weight``     language uk's gate (``w1.bias``, ``w2.weight``)
``model.encoder.layers.0.fc2.experts.uk.weight``      language uk's path on fc2
``model.encoder.layers.0.self_attn.q_proj.experts.uk.lora_A``   with ``attention``: uk's path on an attention
                                                      projection (its gate: ``...q_proj.gates.uk.*``)

Whisper's activation (GELU) must act elementwise: with soft gates both paths' hidden units pass through it
side by side.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator, Sequence

import torch
from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer, WhisperEncoderLayer

from distill.clsr.config import ClsrConfig, check_fraction, check_gate_mode
from distill.clsr.layer import ClsrFc1, ClsrFc2, ClsrGate, ClsrProj, new_language_paths, new_path
from distill.clsr.routing import ClsrRouting, GateRecorder, Handoff

TASKS = ("transcribe", "translate")
# The attention projections a layout with ``attention`` gates in each of its layers: those a LoRA expert adapts by
# default (cross-attention keys and values act on the encoder's frames, cached while decoding: left alone).
ATTENTION_SLOTS = {"encoder": (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),),
                   "decoder": (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
                               ("encoder_attn", ("q_proj", "out_proj")))}


def _whisper_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (WhisperEncoderLayer, WhisperDecoderLayer)):
            yield name, module


def _stack_and_index(name: str, layer: torch.nn.Module) -> tuple[str, int]:
    """``("encoder" | "decoder", layer index)`` of a Whisper layer at module path ``name``."""
    return ("encoder" if isinstance(layer, WhisperEncoderLayer) else "decoder"), int(name.rsplit(".", 1)[-1])


def clsr_layers(model: torch.nn.Module) -> list[tuple[str, ClsrFc1, ClsrFc2]]:
    """``(layer path, fc1, fc2)`` of every CLSR layer, encoder first (empty for a plain Whisper)."""
    return [(name, layer.fc1, layer.fc2) for name, layer in _whisper_layers(model) if isinstance(layer.fc1, ClsrFc1)]


def clsr_projections(model: torch.nn.Module) -> list[tuple[str, str, ClsrProj]]:
    """``(layer path, slot, projection)`` of every gated attention projection (slot: ``self_attn.q_proj`` ...), in
    layer order; empty unless the model's layout has ``attention``."""
    found = []
    for name, layer in _whisper_layers(model):
        for block, projections in ATTENTION_SLOTS[_stack_and_index(name, layer)[0]]:
            for proj in projections:
                module = getattr(getattr(layer, block), proj)
                if isinstance(module, ClsrProj):
                    found.append((name, f"{block}.{proj}", module))
    return found


def clsr_module_paths(model: torch.nn.Module) -> list[str]:
    """The module paths CLSR replaced by gated layers: fc1 and fc2 of each CLSR layer, and the gated attention
    projections (what no LoRA or sparse expert may adapt in the same model)."""
    return ([f"{layer}.{fc}" for layer, _, _ in clsr_layers(model) for fc in ("fc1", "fc2")]
            + [f"{layer}.{slot}" for layer, slot, _ in clsr_projections(model)])


def is_clsr(model: torch.nn.Module) -> bool:
    return bool(clsr_layers(model))


def clsr_routing(model: torch.nn.Module) -> ClsrRouting:
    """The routing state shared by the model's CLSR layers."""
    layers = clsr_layers(model)
    if not layers:
        raise ValueError("this model has no CLSR layers; convert it first with "
                         "distill.clsr.convert_to_clsr(model, languages)")
    return layers[0][1].routing


def clsr_languages(model: torch.nn.Module) -> list[str]:
    """Languages with a path and gate in the model, in the order they were added."""
    return list(clsr_layers(model)[0][1].experts) if is_clsr(model) else []


def require_language(model: torch.nn.Module, language: str | None) -> None:
    """Raise a ``KeyError`` naming the model's languages unless ``language`` is one of them."""
    known = clsr_languages(model)
    if language not in known:
        raise KeyError(f"no CLSR language {language!r} in the model (have: {', '.join(known) or 'none'}); "
                       "add it with add_language or load its expert")


def check_language_name(language: str) -> str:
    """Languages become ``nn.ModuleDict`` keys: no dots, and not an ``nn.Module`` attribute name."""
    if not isinstance(language, str) or not language or "." in language or hasattr(torch.nn.Module, language):
        raise ValueError(f"invalid CLSR language name {language!r}: use a Whisper code such as 'uk' or a name of "
                         "letters, digits, '-' or '_' (no '.', not a torch.nn.Module attribute like 'train')")
    return language


def convert_to_clsr(model: torch.nn.Module, languages: Sequence[str] = (), config: ClsrConfig | None = None,
                    **options) -> torch.nn.Module:
    """Make the feed-forward blocks of a Whisper CLSR blocks (in place): every encoder and decoder FFN by default
    (the paper), or those of the config's layout (``side``, ``encoder_start``; with ``attention``, the attention
    projections of the same layers too, each with its own gate). Other layers stay untouched.

    The whole model is frozen; the language paths and gates added here (and by :func:`add_language`) are the
    only trainable parameters. At gate init the model computes exactly what the base computes.

    Args:
        model: a ``WhisperForConditionalGeneration`` (or ``WhisperModel``), not already converted.
        languages: languages to add right away.
        config: CLSR options (default :class:`ClsrConfig`).
        options: :class:`ClsrConfig` fields overriding ``config``, e.g. ``kind="lowrank", rank=16`` or
            ``side="decoder"``.

    Returns:
        ``model``, converted.
    """
    if is_clsr(model):
        raise ValueError("the model is already a CLSR Whisper; add languages with add_language")
    every = list(_whisper_layers(model))
    if not every:
        raise ValueError(f"{type(model).__name__} has no Whisper encoder/decoder layers to convert")
    encoder_layers = sum(isinstance(layer, WhisperEncoderLayer) for _, layer in every)
    config = replace(config or ClsrConfig(), **options).for_encoder(encoder_layers)
    routing = ClsrRouting(config, base_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    layers = [(name, layer) for name, layer in every if config.covers(*_stack_and_index(name, layer))]
    model.requires_grad_(False)
    for name, layer in layers:
        handoff = Handoff()
        layer.fc1 = ClsrFc1(layer.fc1, routing, handoff, name).train(layer.training)
        layer.fc2 = ClsrFc2(layer.fc2, routing, handoff, name).train(layer.training)
        if config.attention:
            for block, projections in ATTENTION_SLOTS[_stack_and_index(name, layer)[0]]:
                attn = getattr(layer, block)
                for proj in projections:
                    gated = ClsrProj(getattr(attn, proj), routing, f"{name}.{block}.{proj}")
                    setattr(attn, proj, gated.train(layer.training))
    for language in languages:
        add_language(model, language)
    return model


def add_language(model: torch.nn.Module, language: str, **options) -> None:
    """Give every CLSR layer a path and a gate for ``language``; the model's output does not change (G = 0).

    Args:
        language: a Whisper code (or any name without '.').
        options: :class:`ClsrConfig` fields for this language's path: ``kind``, ``rank``, ``alpha``,
            ``gate_hidden``, and how inference uses its gates, ``gate_inference`` (default: the model's CLSR
            config). The layout (``side``, ``encoder_start``, ``attention``) is the model's, fixed at conversion.
    """
    check_language_name(language)
    routing = clsr_routing(model)
    layout = {k: options.pop(k) for k in ("side", "encoder_start", "attention") if k in options}
    if layout and replace(routing.config, **layout).layout != routing.config.layout:
        raise ValueError(f"CLSR layout {layout} differs from the model's {routing.config.layout}: a model has one "
                         "layout, chosen by convert_to_clsr")
    if language in clsr_languages(model):
        raise ValueError(f"CLSR language {language!r} exists already; remove_language(model, {language!r}) first")
    cfg = replace(routing.config, **options)
    for _, fc1, fc2 in clsr_layers(model):
        path1, path2 = new_language_paths(fc1, fc2, cfg.kind, cfg.rank, cfg.alpha)
        gate = ClsrGate(fc1.in_features, cfg.gate_hidden, routing.config.gate_dropout).to(
            device=fc1.shared.weight.device, dtype=fc1.shared.weight.dtype)
        fc1.experts[language] = path1.train(fc1.training).requires_grad_(True)
        fc2.experts[language] = path2.train(fc2.training).requires_grad_(True)
        fc1.gates[language] = gate.train(fc1.training).requires_grad_(True)
    for _, _, proj in clsr_projections(model):
        path = new_path(proj.shared, cfg.kind, cfg.rank, cfg.alpha)
        gate = ClsrGate(proj.in_features, cfg.gate_hidden, routing.config.gate_dropout).to(
            device=proj.shared.weight.device, dtype=proj.shared.weight.dtype)
        proj.experts[language] = path.train(proj.training).requires_grad_(True)
        proj.gates[language] = gate.train(proj.training).requires_grad_(True)
    routing.gate_modes[language] = cfg.gate_inference


def remove_language(model: torch.nn.Module, language: str) -> None:
    """Drop ``language``'s paths and gates from every CLSR layer."""
    require_language(model, language)
    routing = clsr_routing(model)
    for _, fc1, fc2 in clsr_layers(model):
        del fc1.experts[language], fc1.gates[language], fc2.experts[language]
    for _, _, proj in clsr_projections(model):
        del proj.experts[language], proj.gates[language]
    routing.gate_modes.pop(language, None)
    active = [routing.languages] if isinstance(routing.languages, str) else list(routing.languages or ())
    if language in active:
        routing.set_languages(None)


def language_parameters(model: torch.nn.Module, language: str) -> dict[str, torch.nn.Parameter]:
    """``language``'s path and gate parameters by their path in the model (what an optimizer of it trains)."""
    require_language(model, language)
    marks = (f".experts.{language}.", f".gates.{language}.")
    return {n: p for n, p in model.named_parameters() if any(m in n for m in marks)}


def set_language(model: torch.nn.Module, language: str | Sequence[str | None] | None, task: str = "transcribe") -> None:
    """Choose which language path and gate the next forward passes use.

    Args:
        language: one language for the whole batch; a list with one language per sample (a mixed batch, each
            sample routed by its own language's gate and path; ``None`` entries use the shared path only); or
            ``None`` for the shared path only (the base model). ``generate``'s beam expansion of a per-sample
            list is handled (sample i owns rows i*k .. i*k+k-1).
        task: ``translate`` runs the shared path only (the language paths are trained on transcription).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    routing = clsr_routing(model)
    wanted = [language] if language is None or isinstance(language, str) else list(language)
    for lang in wanted:
        if lang is not None:
            require_language(model, lang)
    routing.set_languages(language)
    routing.translate = task == "translate"


def set_noise_scale(model: torch.nn.Module, scale: float) -> None:
    """Set ``a`` in the training gate ``sigmoid(G + a * noise)``; see :func:`distill.clsr.config.noise_scale_at`."""
    if scale < 0:
        raise ValueError(f"gate noise scale must be >= 0, got {scale}")
    clsr_routing(model).noise_scale = float(scale)


def set_warmup(model: torch.nn.Module, gate_floor: float = 0.0, path_dropout_scale: float = 1.0) -> None:
    """Set the training gates' floor (1: every gate held open, 0: as learned) and the scale of the language paths'
    dropout (0: none, 1: the configured ``path_dropout``); see :func:`distill.clsr.config.ramp_at`. Inference
    (eval mode, hard gates) ignores both."""
    check_fraction("gate floor", gate_floor)
    check_fraction("path dropout scale", path_dropout_scale)
    routing = clsr_routing(model)
    routing.gate_floor, routing.path_dropout_scale = float(gate_floor), float(path_dropout_scale)


def set_gate_mode(model: torch.nn.Module, mode: str, languages: str | Sequence[str] | None = None) -> None:
    """How inference uses the gates of ``languages`` (default: every language of the model, and those added
    later): ``hard`` (DistilWhisper's: each token takes the path its gate picks, ``1[G >= 0]``) or ``soft`` (every
    token mixes both paths by ``sigmoid(G)``, as training does without the noise). Hard gates make a low-rank
    path's delta count in full wherever ``G >= 0``, while training, with ``G`` near 0, mixed in about half of it;
    soft gates keep training's scale. A language's mode starts as its config's (``ClsrConfig.gate_inference``) or
    its expert's recorded one; training ignores it. A mixed batch may mix modes."""
    check_gate_mode(mode)
    routing = clsr_routing(model)
    if languages is None:
        routing.config = replace(routing.config, gate_inference=mode)
        languages = clsr_languages(model)
    for language in [languages] if isinstance(languages, str) else languages:
        require_language(model, language)
        routing.gate_modes[language] = mode


@contextlib.contextmanager
def collect_gates(model: torch.nn.Module) -> Iterator[GateRecorder]:
    """Collect the gate values of every CLSR layer call made inside the ``with`` block.

    Example::

        with collect_gates(model) as gates:
            logits = model(input_features=x, decoder_input_ids=ids).logits
        loss = gate_budget_loss(gates.values, budget=0.5)
    """
    with clsr_routing(model).recording() as recorder:
        yield recorder


def convert_from_clsr(model: torch.nn.Module) -> torch.nn.Module:
    """Back to a plain Whisper (in place): the shared fc1/fc2 (and projections) return, every language is dropped.

    The pretrained weights were never modified, so the result is the base model bit for bit; parameters get back
    the ``requires_grad`` they had before :func:`convert_to_clsr`.
    """
    routing = clsr_routing(model)
    for name, slot, proj in clsr_projections(model):
        block, attribute = slot.split(".")
        setattr(getattr(model.get_submodule(name), block), attribute, proj.shared)
    for _, layer in _whisper_layers(model):
        if isinstance(layer.fc1, ClsrFc1):
            layer.fc1, layer.fc2 = layer.fc1.shared, layer.fc2.shared
    for name, p in model.named_parameters():
        p.requires_grad_(routing.base_requires_grad.get(name, p.requires_grad))
    return model
