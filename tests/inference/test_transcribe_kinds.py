"""Transcription with a pack of sparse and CLSR experts: caller languages and language ID route each window to
its expert (named per window and file, as for LoRA), and a mixed batch equals each file transcribed alone."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from distill.clsr import add_language, convert_to_clsr, make_clsr_expert
from inference.decoding import log_mel
from inference.routing import language_posterior
from inference.transcribe import ExpertWhisper
from lora_experts.sparse import sparse_expert
from registry.bases import load_base
from registry.packs import create_pack
from tests.distill.clsr_helpers import randomize_language
from tests.inference.test_sparse_routing import random_sparse

SR = 16000
FAST = dict(max_new_tokens=4, progress=False)


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def whisper(tiny_base, tmp_path_factory):
    """uk-sp: sparse on decoder attention; nl-sp: sparse on encoder and decoder attention; pt-clsr and det-clsr
    (the language language ID hears in noise): low-rank CLSR experts."""
    feats = log_mel(tiny_base.processor, [_noise(2, 0)], tiny_base.model)
    codes, probs = language_posterior(tiny_base.model, feats)
    detected = codes[int(probs.argmax())]
    model = tiny_base.model
    ident = {"name": tiny_base.name, "fingerprint": tiny_base.fingerprint,
             "tokenizer_fingerprint": tiny_base.tokenizer_fingerprint}
    clsr = convert_to_clsr(copy.deepcopy(model))
    for seed, language in enumerate(dict.fromkeys(["pt", detected]), start=5):
        add_language(clsr, language, kind="lowrank", rank=4, alpha=8.0)
        randomize_language(clsr, language, seed=seed, scale=0.5)
    experts = {"uk-sp": sparse_expert(random_sparse(model, ("q_proj", "v_proj"), 0.2, seed=1, side=".decoder."),
                                      languages=["uk"], base=ident),
               "nl-sp": sparse_expert(random_sparse(model, ("q_proj", "v_proj", "out_proj"), 0.2, seed=2),
                                      languages=["nl"], base=ident),
               "pt-clsr": make_clsr_expert(clsr, "pt", tiny_base),
               "det-clsr": make_clsr_expert(clsr, detected, tiny_base)}
    path = tmp_path_factory.mktemp("pack") / "kinds.safetensors"
    create_pack(path, experts)
    w = ExpertWhisper.from_pack(dataclasses.replace(tiny_base, model=copy.deepcopy(model)), path)
    w.detected, w.pack = detected, path
    return w


def test_a_mixed_batch_of_sparse_and_clsr_experts_equals_each_file_alone(whisper):
    assert [e.kind for e in whisper.bank.experts] == ["sparse", "sparse", "clsr", "clsr"]
    audios = [_noise(3, 10), _noise(35, 11), _noise(4, 12), _noise(2, 13)]
    languages = ["uk", "pt", "nl", "de"]  # nl-sp and the CLSR experts change the encoder; de: the base model
    mixed = whisper.transcribe(audios, language=languages, batch_size=8, num_beams=2, **FAST)
    alone = [whisper.transcribe([a], language=lang, num_beams=2, **FAST)[0] for a, lang in zip(audios, languages)]
    assert [t.expert for t in mixed] == ["uk-sp", "pt-clsr", "nl-sp", None]
    assert [s.expert for s in mixed[1].segments] == ["pt-clsr", "pt-clsr"]  # two 30 s windows
    assert [t.text for t in mixed] == [t.text for t in alone]
    base = ExpertWhisper(dataclasses.replace(whisper.base, model=copy.deepcopy(whisper.base.model)))
    base.bank.clear()
    plain = [t.text for t in base.transcribe(audios, language=languages, **FAST)]
    assert plain[3] == mixed[3].text and plain[:3] != [t.text for t in mixed[:3]]  # the experts did something


def test_language_id_routes_windows_to_a_clsr_expert(whisper):
    routed = whisper.transcribe([_noise(2, 20), _noise(3, 21)], threshold=0.0, **FAST)
    assert [t.expert for t in routed] == ["det-clsr", "det-clsr"] and {t.language for t in routed} == {whisper.detected}
    fallback = whisper.transcribe([_noise(2, 20)], threshold=1.01, **FAST)
    assert fallback[0].expert is None and fallback[0].language == whisper.detected


def test_clsr_gates_override_what_the_experts_record(whisper, tiny_base):
    """``from_pack(clsr_gates="soft")`` (``transcribe --clsr-gates soft``) gives every CLSR expert soft gates; by
    default each keeps the mode its file records (hard here)."""
    from distill.clsr import clsr_routing

    assert set(clsr_routing(whisper.base.model).gate_modes.values()) == {"hard"}
    soft = ExpertWhisper.from_pack(dataclasses.replace(tiny_base, model=copy.deepcopy(tiny_base.model)), whisper.pack,
                                   clsr_gates="soft")
    assert set(clsr_routing(soft.base.model).gate_modes.values()) == {"soft"}
    audio = [_noise(3, 30)]
    assert soft.transcribe(audio, language="pt", **FAST)[0].expert == "pt-clsr"
    with pytest.raises(ValueError, match="unknown CLSR gate mode 'half'"):
        ExpertWhisper.from_pack(dataclasses.replace(tiny_base, model=copy.deepcopy(tiny_base.model)), whisper.pack,
                                clsr_gates="half")


def test_the_server_loads_clsr_experts_with_the_gates_asked_for(whisper, tiny_base):
    """``serve --clsr-gates soft`` (``ServeConfig.clsr_gates``): every generation the server loads, reloads
    included, has soft CLSR gates; by default the experts' own (hard here)."""
    from distill.clsr import clsr_routing
    from inference.serve.state import PackLoader, ServeConfig

    for gates, want in ((None, {"hard"}), ("soft", {"soft"})):
        loader = PackLoader(tiny_base, ServeConfig(packs=(str(whisper.pack),), clsr_gates=gates))
        for _ in range(2):  # the first load and a reload
            served = loader.load((str(whisper.pack),))
            assert set(clsr_routing(served.whisper.base.model).gate_modes.values()) == want
