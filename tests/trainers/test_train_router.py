"""Training a learned router on a tiny Whisper: two "languages" a listener can tell apart (a low and a high
tone), two experts that each make their own language's transcript likely, and a router that learns from the
decoder's loss alone to send each utterance to the expert that serves it. Then the command line end to end:
``router train``, ``router inspect``, ``transcribe --router``."""

from __future__ import annotations

import copy
import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch

from inference.bank import expert_bank
from inference.router import LearnedRouter, audio_frames
from inference.routing import LearnedRouting
from registry.bases import load_base
from registry.expert_file import Expert, new_manifest
from registry.packs import create_pack
from trainers.cli import main
from inference.audio import load_audio
from trainers.corpus.loading import load_corpus, make_row, rows_to_dataset, save_corpus
from inference.decoding import log_mel
from trainers.train_router import RouterTrainConfig, train_router

SR = 16000
TONES = {"uk": 300.0, "pt": 3000.0}  # what makes each "language" recognisable
WORDS = {"uk": "hello", "pt": "world"}  # each language's transcripts: one word, repeated


def _utterance(language: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rng.uniform(1.0, 3.0) * SR)) / SR
    freq = TONES[language] * rng.uniform(0.97, 1.03)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tone_corpus(tmp_path_factory):
    """6 + 6 train, 2 + 2 validation, 1 + 1 test utterances (new seeds in every split)."""
    splits, seed = {}, 0
    for split, n in (("train", 6), ("validation", 2), ("test", 1)):
        rows = []
        for lang in TONES:
            for i in range(n):
                seed += 1
                rows.append(make_row(id=f"{lang}-{split}-{i}", audio=_utterance(lang, seed), language=lang,
                                     text=" ".join([WORDS[lang]] * (2 + i % 3)), source="test tones"))
        splits[split] = rows_to_dataset(rows)
    return save_corpus(datasets.DatasetDict(splits), tmp_path_factory.mktemp("tones") / "corpus", progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny random Whisper, with its convolutions scaled up so that its encoder output carries the audio (a
    random init leaves it dominated by the position embeddings: every input would sound the same)."""
    from transformers import WhisperForConditionalGeneration

    from tests.tiny import make_tiny_whisper

    path = make_tiny_whisper(tmp_path_factory.mktemp("hearing") / "tiny-whisper")
    model = WhisperForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
            conv.weight.mul_(30.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_base(tiny_dir):
    return load_base(str(tiny_dir), device="cpu")


def _booster(base, language: str) -> Expert:
    """A rank-1 expert on the last decoder layer's fc2 that pushes the residual stream toward the embedding of
    its language's word: the decoder then finds that language's transcripts likelier (and the other's less)."""
    model = base.model
    token = base.processor.tokenizer(" " + WORDS[language], add_special_tokens=False).input_ids[0]
    direction = model.get_output_embeddings().weight[token].detach()
    fc2 = model.model.decoder.layers[-1].fc2
    tensors = {"model.decoder.layers.1.fc2.lora_A": torch.ones(1, fc2.in_features),  # GELU outputs: a positive sum
               "model.decoder.layers.1.fc2.lora_B": (direction / direction.norm()).unsqueeze(1)}
    return Expert(tensors, new_manifest("lora", [language], base, {"rank": 1, "alpha": 1.0, "side": "decoder"}))


@pytest.fixture(scope="module")
def pack(tiny_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("router-pack") / "tones.safetensors"
    create_pack(path, {f"{lang}-x": _booster(tiny_base, lang) for lang in TONES})
    return path


def _fresh(base):
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def _own_probability(base, router, corpus, split: str) -> list[float]:
    """The router's probability of each utterance's own expert, from the audio of ``split``."""
    ds = load_corpus(corpus)[split]
    audios = [load_audio(a) for a in ds["audio"]]
    feats = log_mel(base.processor, audios, base.model)
    policy = LearnedRouting(expert_bank(base.model), router)
    probs = policy.probabilities(feats, frames=audio_frames([len(a) / SR for a in audios]))
    own = [router.slots.index((f"{lang}-x", lang)) for lang in ds["language"]]
    return [float(probs[i, j]) for i, j in enumerate(own)]


def test_the_router_learns_from_the_decoder_loss_alone_to_send_each_language_to_its_expert(
        tiny_base, pack, tone_corpus, tmp_path):
    base = _fresh(tiny_base)
    cfg = RouterTrainConfig(data=str(tone_corpus), languages=("uk", "pt"), pack=(str(pack),), aux_weight=0.0,
                            hidden=16, lr=1e-2, epochs=6, batch_size=4, cache_dir=str(tmp_path / "cache"),
                            progress=False)
    router, report = train_router(cfg, base=base)
    assert router.slots == [("uk-x", "uk"), ("pt-x", "pt")] and router.experts == ["uk-x", "pt-x"]
    # Held-out utterances (validation and test: other pitches, lengths and noise) go to their own expert.
    assert report["validation"]["routing_accuracy"] == 1.0
    assert min(_own_probability(base, router, tone_corpus, "test")) > 0.8  # an untrained gate gives about 0.5
    # Hard routing to the own expert is what the oracle does: the same transcripts, the same WER.
    assert report["validation"]["wer"] == report["oracle"]["wer"]
    first = report["history"][0]["train_ce"]
    assert report["history"][-1]["train_ce"] < first  # the decoder's loss fell as the router learned
    assert {h["epoch"] for h in report["history"]} == set(range(6)) and 0 <= report["best_epoch"] < 6
    manifest = router.manifest()
    assert manifest["training"]["aux_weight"] == 0.0 and manifest["training"]["utterances"]["train"] == 12
    assert manifest["metrics"]["validation"]["routing_accuracy"] == 1.0
    assert manifest["base"]["fingerprint"] == tiny_base.fingerprint
    # Only the router trained: the experts in the bank are the pack's, bit for bit.
    bank = expert_bank(base.model)
    expert = _booster(tiny_base, "uk")
    assert all(torch.equal(t, expert.tensors[k]) for k, t in bank.tensors("uk-x").items())
    assert not any(p.requires_grad for p in base.model.parameters())


def test_experts_that_route_hard_train_the_router_on_the_language_loss_alone(tiny_base, pack, tone_corpus, tmp_path):
    from inference.bank import RoutedKind
    from inference.packs import load_pack

    class Recorder(RoutedKind):  # stands in for CLSR experts: computed in the model's own layers, routed hard
        kind = "recorded"

        def __init__(self):
            self.calls = []

        def route(self, names):
            self.calls.append(names)

        def remove(self, name):
            pass

    base = _fresh(tiny_base)
    load_pack(base, pack)
    recorder = Recorder()
    expert_bank(base.model).add_routed(recorder, {"de-r": (["de"], [], {})})
    cfg = RouterTrainConfig(data=str(tone_corpus), languages=("uk", "pt"), aux_weight=0.0, hidden=16, lr=1e-2,
                            epochs=2, batch_size=4, cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(ValueError, match="de-r route hard.*--aux-weight > 0"):
        train_router(cfg, base=base)
    router, report = train_router(dataclasses.replace(cfg, aux_weight=1.0), base=base)
    assert router.slots == [("uk-x", "uk"), ("pt-x", "pt"), ("de-r", "de")]
    assert all(h["train_ce"] == 0.0 and h["train_aux"] > 0 for h in report["history"])  # no decoder loss
    assert report["validation"]["routing_accuracy"] == 1.0
    assert recorder.calls and not any(c == "de-r" or "de-r" in (c or []) for c in recorder.calls)  # never chosen


def test_router_train_help_teaches_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["router", "train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    for phrase in ("--pack FILE", "--languages", "--aux-weight", "--hidden", "routing accuracy", "oracle WER",
                   "examples:", "whisper-experts router train --pack packs/eu3.safetensors"):
        assert phrase in out


def test_cli_trains_inspects_and_transcribes_with_the_router(tiny_base, pack, tone_corpus, tiny_dir,
                                                             tmp_path, capsys):
    import soundfile as sf

    out = tmp_path / "router.safetensors"
    assert main(["router", "train", "--pack", str(pack), "--data", str(tone_corpus), "--languages", "uk,pt",
                 "--base", str(tiny_dir), "--out", str(out), "--epochs", "4", "--lr", "1e-2",
                 "--batch-size", "4", "--hidden", "16", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "routing accuracy" in printed
    router = LearnedRouter.load(out)
    assert router.experts == ["uk-x", "pt-x"] and router.manifest()["training"]["aux_weight"] == 1.0
    assert main(["router", "inspect", str(out)]) == 0
    assert "uk-x" in capsys.readouterr().out

    files = []
    for lang, seed in (("pt", 101), ("uk", 102)):
        files.append(tmp_path / f"{lang}.wav")
        sf.write(files[-1], _utterance(lang, seed), SR)
    result = tmp_path / "out.json"
    assert main(["transcribe", *map(str, files), "--pack", str(pack), "--base", str(tiny_dir),
                 "--router", str(out), "--format", "json", "--out", str(result), "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    records = json.loads(result.read_text())
    assert [(r["language"], r["expert"]) for r in records] == [("pt", "pt-x"), ("uk", "uk-x")]
    assert all(0.5 < r["language_probability"] <= 1 for r in records)

    # A router refuses a pack of other experts, before decoding anything.
    other = tmp_path / "other.safetensors"
    create_pack(other, {"uk-y": _booster(tiny_base, "uk")})
    assert main(["transcribe", str(files[0]), "--pack", str(other), "--base", str(tiny_dir),
                 "--router", str(out)]) == 2
    assert "trained for experts [uk-x, pt-x] but the bank holds [uk-y]" in capsys.readouterr().err


@pytest.mark.slow
def test_on_whisper_base_the_router_tells_synthesized_ukrainian_from_portuguese(whisper_base, uk_pt_corpus, tmp_path):
    """Real signal: whisper-base's encoder output of espeak-ng speech, held-out voices in validation and test.
    The experts are random and small, so the router learns from the language labels (``aux_weight``)."""
    from tests.lora_experts.random_experts import linear_shapes, lora_expert

    base = _fresh(whisper_base)
    shapes = {m: s for m, s in linear_shapes(base.model, ("q_proj",)).items() if ".decoder." in m}
    pack = tmp_path / "pack.safetensors"
    create_pack(pack, {f"{lang}-x": lora_expert(shapes, 2, 4.0, seed, [lang], base)
                       for seed, lang in enumerate(("uk", "pt"))})
    cfg = RouterTrainConfig(data=str(uk_pt_corpus), languages=("uk", "pt"), pack=(str(pack),), aux_weight=1.0,
                            lr=1e-2, epochs=5, batch_size=5, cache_dir=str(tmp_path / "cache"), progress=False)
    router, report = train_router(cfg, base=base)
    assert report["validation"]["routing_accuracy"] == 1.0
    assert min(_own_probability(base, router, uk_pt_corpus, "test")) > 0.5
