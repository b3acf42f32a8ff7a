"""Shared inputs and helpers for CLSR tests on the tiny Whisper."""

from __future__ import annotations

import torch

from distill.clsr import clsr_layers, clsr_projections, language_parameters
from distill.clsr.layer import LowRankPath

# Three utterances of 100 mel frames (the ``short_whisper`` fixture's window) for mixed-language batches;
# most tests use the first two.
FEATS3 = torch.randn(3, 80, 100, generator=torch.Generator().manual_seed(0))
IDS3 = torch.tensor([[50258, 50280, 50359, 50363, 400, 500],
                     [50258, 50261, 50359, 50363, 600, 700],
                     [50258, 50262, 50359, 50363, 800, 900]])
FEATS, IDS = FEATS3[:2], IDS3[:2]


def logits(model, feats=FEATS, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=ids).logits


def randomize_language(model, language: str, seed: int = 1, scale: float = 0.05) -> None:
    """Move a language's paths and gates away from their init (paths differ from the shared FFN, gates mix)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in language_parameters(model, language).items():
            noise = torch.randn(p.shape, generator=g)
            if ".experts." in name and name.endswith((".weight", ".bias")):
                p.add_(scale * noise)  # full path: perturb the copy of the pretrained weights
            elif name.endswith("w2.weight"):
                p.copy_(noise)  # gate: some tokens open, some closed
            else:
                p.copy_(scale * noise)


def force_gates(model, language: str, open_: bool) -> None:
    """Make ``language``'s gates G = +-256 for every token: hard gates 1/0, and sigmoid exactly 1.0/0.0 in float32."""
    with torch.no_grad():
        for gated in [fc1 for _, fc1, _ in clsr_layers(model)] + [proj for _, _, proj in clsr_projections(model)]:
            gate = gated.gates[language]
            gate.w1.weight.zero_()
            gate.w1.bias.fill_(1.0)
            gate.w2.weight.fill_(4.0 if open_ else -4.0)


def language_ffn_model(plain, clsr, language: str):
    """A plain Whisper (a copy of ``plain``) whose fc1/fc2 (and gated attention projections) are ``language``'s
    paths (low-rank deltas merged)."""
    import copy

    model = copy.deepcopy(plain)
    gated = {f"{name}.{fc}": module for name, fc1, fc2 in clsr_layers(clsr) for fc, module in (("fc1", fc1),
                                                                                               ("fc2", fc2))}
    gated.update({f"{name}.{slot}": proj for name, slot, proj in clsr_projections(clsr)})
    with torch.no_grad():
        for name, clsr_linear in gated.items():
            target, path = model.get_submodule(name), clsr_linear.experts[language]
            if isinstance(path, LowRankPath):
                target.weight.add_(path.scale * path.lora_B @ path.lora_A)
            else:
                target.weight.copy_(path.weight)
                if target.bias is not None:
                    target.bias.copy_(path.bias)
    return model
