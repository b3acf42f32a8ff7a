"""Fingerprints that tie an expert to the base model and tokenizer it was trained on.

The weight fingerprint hashes every parameter tensor by name, shape and float32 value, so a base stored in
float16 and the same base upcast to float32 share a fingerprint, while any changed weight changes it. Tied
parameters (the output projection shares the token embeddings) are hashed once.
"""

from __future__ import annotations

import hashlib
import json

import torch


def weight_fingerprint(model: torch.nn.Module, length: int = 16) -> str:
    """Hex sha256 prefix over the model's parameters and buffers (float32 values, sorted by name).

    Args:
        model: any module (typically ``WhisperForConditionalGeneration``).
        length: hex characters kept.
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for name in sorted(tensors):
        t = tensors[name]
        if t.data_ptr() in seen:
            continue  # tied weight: counted under its first name
        seen.add(t.data_ptr())
        # Bias-free LoRA layers etc. are not part of a base; only hash what a plain Whisper has.
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:length]


# Special tokens OpenAI renamed without changing their id or role; older packagings carry the old name.
_RENAMED_TOKENS = {"<|nocaptions|>": "<|nospeech|>"}


def tokenizer_fingerprint(tokenizer, feature_extractor=None, length: int = 16) -> str:
    """Hex sha256 prefix over the vocabulary (token -> id) and the feature extractor's shape parameters.

    Renamed special tokens are hashed under their current name, so two packagings of the same Whisper
    tokenizer (e.g. ``<|nocaptions|>`` vs ``<|nospeech|>`` at id 50362) share a fingerprint.
    """
    h = hashlib.sha256()
    vocab = {_RENAMED_TOKENS.get(tok, tok): i for tok, i in tokenizer.get_vocab().items()}
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    if feature_extractor is not None:
        fe = {k: getattr(feature_extractor, k, None)
              for k in ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length")}
        h.update(json.dumps(fe, sort_keys=True).encode())
    return h.hexdigest()[:length]
