"""Shared inputs and helpers for CLSR tests on the tiny Whisper."""

from __future__ import annotations

import torch

from distill.clsr import clsr_layers, language_parameters
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
        for _, fc1, _ in clsr_layers(model):
            gate = fc1.gates[language]
            gate.w1.weight.zero_()
            gate.w1.bias.fill_(1.0)
            gate.w2.weight.fill_(4.0 if open_ else -4.0)


def language_ffn_model(plain, clsr, language: str):
    """A plain Whisper (a copy of ``plain``) whose fc1/fc2 are ``language``'s paths (low-rank deltas merged)."""
    import copy

    model = copy.deepcopy(plain)
    layers = {name: (fc1, fc2) for name, fc1, fc2 in clsr_layers(clsr)}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in layers:
                for target, clsr_fc in zip((module.fc1, module.fc2), layers[name]):
                    path = clsr_fc.experts[language]
                    if isinstance(path, LowRankPath):
                        target.weight.add_(path.scale * path.lora_B @ path.lora_A)
                    else:
                        target.weight.copy_(path.weight)
                        target.bias.copy_(path.bias)
    return model
