"""Random LoRA experts for fusion tests, on a tiny Whisper's module shapes or on made-up ones."""

from __future__ import annotations

import torch

from registry.expert_file import Expert, new_manifest

BASE = {"name": "tiny-whisper", "fingerprint": "f" * 16, "tokenizer_fingerprint": "t" * 16}

# Made-up (out, in) shapes under real Whisper module names: fast tests that need no model.
SHAPES = {
    "model.decoder.layers.0.self_attn.q_proj": (16, 16),
    "model.decoder.layers.0.fc1": (32, 16),
    "model.decoder.layers.1.fc2": (16, 32),
    "model.encoder.layers.0.fc1": (32, 16),
}


def linear_shapes(model: torch.nn.Module, contains: tuple[str, ...] = ("q_proj", "v_proj", "fc1")) -> dict:
    """(out, in) of the model's linear layers whose path contains one of ``contains``."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(c in name for c in contains) and ".layers." in name}


def random_lora(shapes: dict, rank: int, seed: int, scale: float = 0.1, dtype=torch.float32) -> dict:
    """``<module>.lora_A`` (rank, in) / ``.lora_B`` (out, rank) with random entries (B nonzero, unlike a fresh LoRA)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (o, i) in shapes.items():
        out[f"{module}.lora_A"] = (scale * torch.randn(rank, i, generator=g)).to(dtype)
        out[f"{module}.lora_B"] = (scale * torch.randn(o, rank, generator=g)).to(dtype)
    return out


def lora_expert(shapes: dict, rank: int, alpha: float, seed: int, languages=("uk",), base=BASE,
                dtype=torch.float32) -> Expert:
    """A stored-form LoRA expert with a valid manifest."""
    hyper = {"rank": rank, "alpha": alpha, "dropout": 0.0, "target_modules": ["fc1"], "side": "decoder"}
    return Expert(random_lora(shapes, rank, seed, dtype=dtype), new_manifest("lora", languages, base, hyper))


def expert_alone(base: torch.nn.Module, experts: dict, name: str | None) -> torch.nn.Module:
    """The reference for routing tests: a copy of ``base`` with the single expert ``name`` of ``experts`` (name ->
    (tensors, hyperparameters, languages)): a sparse one added into the weights, a LoRA one attached by peft;
    ``None``: the base itself."""
    import copy

    from lora_experts.model import attach_expert
    from lora_experts.sparse import SparseDelta, apply_sparse

    ref = copy.deepcopy(base)
    if name is not None:
        tensors, hyper, _ = experts[name]
        if isinstance(next(iter(tensors.values())), SparseDelta):
            apply_sparse(ref, tensors)
        else:
            attach_expert(ref, tensors, hyper)
    return ref


def peft_random_expert(model, config=None, seed: int = 1) -> tuple[dict, dict]:
    """(tensors, hyperparameters) of a LoRA expert made through peft on ``model`` (left without it) with random
    A and B (so it changes the output), as training would leave one."""
    from lora_experts.config import LoraExpertConfig
    from lora_experts.model import add_trainable_expert, expert_tensors, remove_experts

    config = config or LoraExpertConfig(rank=4, alpha=8, side="both")
    add_trainable_expert(model, config, "tmp")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [p for n, p in model.named_parameters() if "lora_" in n]:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    tensors = expert_tensors(model, "tmp")
    remove_experts(model)
    return tensors, config.hyperparameters()

