"""Fixtures shared by the trainer tests: a tiny synthesized Ukrainian corpus."""

from __future__ import annotations

import pytest


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
