"""Export a Hugging Face Whisper directory to CTranslate2, the format faster-whisper loads.

The conversion is CTranslate2's own (``ctranslate2.converters.TransformersConverter``), so the files are what
``ct2-transformers-converter`` would write; this module only adds an atomic output directory, the tokenizer
and feature-extractor files faster-whisper reads, and clear errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from registry.atomic import staged_directory

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32")
# faster-whisper reads the tokenizer and, when present, the feature extractor's settings from the model dir.
COPIED_FILES = ("tokenizer.json", "preprocessor_config.json")


class ExportError(ValueError):
    """An export that cannot be made (missing converter, unknown quantization, unwritable output)."""


def export_ct2(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, quantization: str = "int8") -> Path:
    """Convert the Whisper in ``hf_dir`` (config.json + safetensors + tokenizer) to a CTranslate2 directory.

    Args:
        hf_dir: a Hugging Face Whisper directory (an imported base, or a merged expert export).
        out_dir: where the faster-whisper model directory goes (replaced atomically if it exists).
        quantization: weight type stored: int8 (default; what faster-whisper users run on CPU), int8_float32,
            int8_float16, int8_bfloat16, float16, bfloat16 or float32.

    Returns:
        ``out_dir``, holding ``model.bin``, ``config.json``, ``vocabulary.json``, ``tokenizer.json`` and
        ``preprocessor_config.json``.
    """
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as err:
        raise ExportError("exporting to faster-whisper needs CTranslate2: pip install 'whisper-experts[export]' "
                          "(or pip install ctranslate2)") from err
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    copy = [name for name in COPIED_FILES if (hf_dir / name).is_file()]
    if "tokenizer.json" not in copy:
        raise ExportError(f"{hf_dir} has no tokenizer.json, which faster-whisper needs; save the processor there "
                          "(WhisperProcessor.save_pretrained) first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out_dir) as staging:
        converter = TransformersConverter(str(hf_dir), copy_files=copy, low_cpu_mem_usage=True)
        converter.convert(str(staging), quantization=quantization, force=True)
    return out_dir
