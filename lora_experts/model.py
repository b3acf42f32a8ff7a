"""Attaching LoRA experts to a Whisper model, and reading them back as tensors.

Experts are injected with peft (``inject_adapter_in_model``), so the model stays a plain
``WhisperForConditionalGeneration``: ``generate`` and the project's decoding work unchanged. Several experts
can be attached under different adapter names; one is active at a time (:func:`set_active_expert`).

Expert tensors are keyed by Whisper module path plus ``lora_A`` / ``lora_B``:
``model.decoder.layers.0.self_attn.q_proj.lora_A`` has shape (rank, in_features) and ``...lora_B``
(out_features, rank); the update to that layer's weight is ``(alpha / rank) * lora_B @ lora_A``.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from lora_experts.config import LoraExpertConfig

DEFAULT_ADAPTER = "expert"


def check_adapter_name(name: str) -> str:
    """Adapter names become ``nn.ModuleDict`` keys: no dots, and not an ``nn.Module`` attribute (``train``...)."""
    if not name or "." in name or hasattr(torch.nn.Module, name):
        raise ValueError(f"invalid expert adapter name {name!r}: use letters, digits, '-' or '_' (no '.'), "
                         "and not a torch.nn.Module attribute such as 'train' or 'forward'")
    return name


def _lora_layers(model: torch.nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def add_trainable_expert(model: torch.nn.Module, config: LoraExpertConfig,
                         adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Freeze ``model`` and inject a fresh LoRA expert (B = 0, so the model's output is unchanged).

    Returns:
        The adapted module paths.
    """
    check_adapter_name(adapter_name)
    model.requires_grad_(False)
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=config.target_regex(), bias="none")
    inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    modules = []
    for name, layer in _lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].weight.requires_grad_(True)
            layer.lora_B[adapter_name].weight.requires_grad_(True)
            modules.append(name)
    if not modules:
        raise ValueError(f"LoRA config {config} matched no module of this model")
    set_active_expert(model, adapter_name)
    return modules


def expert_tensors(model: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The expert's LoRA matrices, keyed ``<module path>.lora_A`` / ``.lora_B`` (CPU float32 copies)."""
    out = {}
    for name, layer in _lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{name}.lora_A"] = layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32).clone()
            out[f"{name}.lora_B"] = layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32).clone()
    if not out:
        raise KeyError(f"no expert named {adapter_name!r} is attached")
    return out


def lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module path -> rank, from expert tensors (validates that every lora_A has its lora_B)."""
    ranks = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise ValueError(f"expert tensor {key!r} is not a LoRA matrix (expected <module>.lora_A / .lora_B)")
        if part == "lora_A":
            ranks[module] = t.shape[0]
    for module, rank in ranks.items():
        b = tensors.get(f"{module}.lora_B")
        if b is None or b.shape[1] != rank:
            raise ValueError(f"expert tensor {module}.lora_B missing or not of rank {rank}")
    if len(ranks) * 2 != len(tensors):
        raise ValueError("expert has lora_B matrices without their lora_A")
    return ranks


def attach_expert(model: torch.nn.Module, tensors: dict[str, torch.Tensor], hyperparameters: dict,
                  adapter_name: str = DEFAULT_ADAPTER, trainable: bool = False) -> list[str]:
    """Attach a stored LoRA expert to ``model`` under ``adapter_name`` and make it active.

    Args:
        tensors: ``<module>.lora_A`` / ``.lora_B`` matrices (any ranks, any subset of linear layers).
        hyperparameters: needs ``alpha`` (scaling alpha / rank per module), optionally ``dropout``.
        trainable: leave the expert's matrices trainable (warm start from another expert).
    """
    check_adapter_name(adapter_name)
    ranks = lora_modules(tensors)
    missing = [m for m in ranks if m not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"expert adapts modules this model does not have, e.g. {missing[0]}; "
                         "it was made for a different Whisper size")
    alpha = float(hyperparameters.get("alpha", hyperparameters.get("rank", 8)))
    rank_values = sorted(set(ranks.values()))
    peft_config = LoraConfig(
        r=rank_values[0], lora_alpha=alpha,
        lora_dropout=float(hyperparameters.get("dropout", 0.0)) if trainable else 0.0,
        target_modules=sorted(ranks), bias="none",
        # Different ranks per module keep the same alpha: scaling alpha / r_i (as when the expert was made).
        rank_pattern={m: r for m, r in ranks.items() if r != rank_values[0]},
        alpha_pattern=dict(hyperparameters.get("alpha_pattern", {})),
    )
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        # Several experts on one model is the point here, not an accident peft should warn about.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, rank in ranks.items():
            layer = modules[module]
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a.copy_(tensors[f"{module}.lora_A"].to(a.dtype))
            b.copy_(tensors[f"{module}.lora_B"].to(b.dtype))
            a.requires_grad_(trainable)
            b.requires_grad_(trainable)
    for n, p in model.named_parameters():  # injection must not unfreeze the base
        if n in was_trainable:
            p.requires_grad_(was_trainable[n])
    set_active_expert(model, adapter_name)
    return sorted(ranks)


def set_active_expert(model: torch.nn.Module, adapter_name: str | None) -> None:
    """Make one attached expert active everywhere (None: disable all experts, i.e. the base model)."""
    for _, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if adapter_name is None:
                module.enable_adapters(False)
            elif adapter_name in module.lora_A:
                module.enable_adapters(True)
                module.set_adapter(adapter_name)
            else:
                module.enable_adapters(False)


def remove_experts(model: torch.nn.Module) -> None:
    """Detach every expert: LoRA wrappers are replaced by their original layers (the base, bit-exact)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config  # peft's record of injected adapters; none are left
