"""A tiny Whisper with a short audio window, for CLSR tests that run many forward passes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from tests.tiny import tiny_config

SOURCE_POSITIONS = 50  # encoder positions; inputs are 2 * 50 = 100 mel frames instead of 3000


@pytest.fixture(scope="session")
def short_whisper(tiny_whisper):
    """The tiny Whisper's shapes (d_model 64, 2 + 2 layers) and generation settings, with a 100-frame window.

    A forward costs ~30x less than on the 3000-frame ``tiny_whisper``; ``generate`` treats 100 frames as one
    short-form segment.
    """
    config = tiny_config()
    config.max_source_positions = SOURCE_POSITIONS
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, as in tests/tiny.py
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.generation_config = copy.deepcopy(tiny_whisper[0].generation_config)
    return model
