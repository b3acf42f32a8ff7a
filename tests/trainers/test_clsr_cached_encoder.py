"""A CLSR student whose layout leaves the encoder (or its lower layers) alone trains on cached encoder states:
its loss there equals its loss through the live encoder, and the recipe decides when to cache as it does for LoRA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distill.clsr import ClsrConfig, clsr_layers
from tests.distill.clsr_helpers import randomize_language

DETERMINISTIC = {"path_dropout": 0.0, "gate_dropout": 0.0, "shared_only_prob": 0.0}
LAYOUTS = {"decoder": ({"side": "decoder"}, "encoder_hidden_states"),
           "encoder-from-1": ({"side": "both", "encoder_start": 1}, "encoder_layer_input"),
           "encoder-top-1": ({"side": "both", "encoder_start": -1}, "encoder_layer_input"),  # = from 1 on tiny
           "attention-from-1": ({"side": "both", "encoder_start": 1, "attention": True}, "encoder_layer_input")}


def _student(tiny_whisper_dir, layout):
    from registry.bases import load_base
    from trainers.clsr_module import ClsrExpertModule

    base = load_base(str(tiny_whisper_dir), device="cpu")
    module = ClsrExpertModule(base.model, base.processor, ["uk", "pt"], ClsrConfig(**layout, **DETERMINISTIC))
    for n, lang in enumerate(("uk", "pt")):  # paths away from the shared FFN, gates half open
        randomize_language(module.model, lang, seed=n + 1)
    return base, module


def _loss(module, batch):
    logits, gates, _ = module._forward(batch)
    return module.loss_fn(logits, None, batch["labels"], gates).loss


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_loss_on_cached_encoder_states_equals_the_loss_through_the_live_encoder(uk_pt_corpus, tiny_whisper_dir,
                                                                                tmp_path, layout):
    from trainers.data import encode_until
    from trainers.language_batches import DistillDataModule
    from trainers.train_distill import encoder_cache_plan

    options, key = LAYOUTS[layout]
    base, module = _student(tiny_whisper_dir, options)
    cache, layer = encoder_cache_plan(module.clsr_config, None)
    assert cache and layer == (None if layout == "decoder" else 1)
    cached = DistillDataModule(str(uk_pt_corpus), base.processor, ["uk", "pt"], 4, encoder=base.model.model.encoder,
                               encoder_layer=layer, cache_dir=str(tmp_path), base_fingerprint=base.fingerprint,
                               progress=False)
    live = DistillDataModule(str(uk_pt_corpus), base.processor, ["uk", "pt"], 4, progress=False)
    cached.setup()
    live.setup()
    a, b = next(iter(cached.train_dataloader())), next(iter(live.train_dataloader()))
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])  # the same batch
    assert key in a and "input_features" not in a and "input_features" in b
    module.train()
    torch.manual_seed(0)
    live_loss = _loss(module, b)
    # Exactly equal when the cached states are the encoder's own float32 output ...
    encoder = base.model.model.encoder
    with torch.no_grad():
        feats = b["input_features"]
        states = encoder(feats).last_hidden_state if layer is None else encode_until(encoder, feats, layer)
    exact = {k: v for k, v in b.items() if k != "input_features"}
    torch.manual_seed(0)
    assert torch.equal(_loss(module, {**exact, key: states}), live_loss)
    # ... and up to float16 rounding from the data module's cache, with gradients for the language's path and gate.
    torch.manual_seed(0)
    cached_loss = _loss(module, a)
    torch.testing.assert_close(cached_loss, live_loss, rtol=2e-3, atol=2e-3)
    cached_loss.backward()
    lang = a["language"][0]
    grads = [p.grad for n, p in module.model.named_parameters() if f".{lang}." in n]
    assert grads and all(g is not None for g in grads)
    encoder_grads = [n for n, p in module.model.named_parameters() if p.grad is not None and ".encoder." in n]
    assert bool(encoder_grads) == (layer is not None)  # only CLSR encoder layers above the cached input train
    assert all(int(n.split(".layers.")[1].split(".")[0]) >= 1 for n in encoder_grads)
    assert [name for name, _, _ in clsr_layers(module.model)][0].startswith(
        "model.decoder." if layer is None else "model.encoder.layers.1")


def test_the_cache_plan_follows_the_layout_and_the_teacher():
    from trainers.train_distill import encoder_cache_plan

    cached, online = SimpleNamespace(kind="cached"), SimpleNamespace(kind="online")
    assert encoder_cache_plan(ClsrConfig(side="decoder"), cached) == (True, None)
    assert encoder_cache_plan(ClsrConfig(side="decoder"), None) == (True, None)
    assert encoder_cache_plan(ClsrConfig(encoder_start=3), cached) == (True, 3)
    assert encoder_cache_plan(ClsrConfig(), cached) == (False, None)  # the paper's layout runs the whole encoder
    assert encoder_cache_plan(ClsrConfig(side="decoder"), online) == (False, None)  # it reads the audio


def test_gates_train_at_their_own_learning_rate(tiny_whisper_dir):
    from registry.bases import load_base
    from trainers.clsr_module import ClsrExpertModule

    base = load_base(str(tiny_whisper_dir), device="cpu")
    module = ClsrExpertModule(base.model, base.processor, ["uk"], ClsrConfig(side="decoder"), lr=1e-4, gate_lr=3e-3)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    gates = {id(p) for n, p in module.model.named_parameters() if ".gates." in n}
    paths = {id(p) for n, p in module.model.named_parameters() if ".experts." in n}
    assert gates and paths
    by_lr = {g["initial_lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {1e-4: paths, 3e-3: gates}
    same = ClsrExpertModule(load_base(str(tiny_whisper_dir), device="cpu").model, base.processor, ["uk"],
                            ClsrConfig(side="decoder"), lr=1e-4)
    same.trainer = SimpleNamespace(estimated_stepping_batches=10)
    assert {g["initial_lr"] for g in same.configure_optimizers()["optimizer"].param_groups} == {1e-4}


def test_decoder_paths_train_at_their_own_learning_rate(tiny_whisper_dir):
    from registry.bases import load_base
    from trainers.clsr_module import ClsrExpertModule

    base = load_base(str(tiny_whisper_dir), device="cpu")
    module = ClsrExpertModule(base.model, base.processor, ["uk"], ClsrConfig(side="both"), lr=1e-3, gate_lr=3e-3,
                              decoder_lr=2e-4)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    by_lr = {g["initial_lr"]: {id(p) for p in g["params"]}
             for g in module.configure_optimizers()["optimizer"].param_groups}
    named = list(module.model.named_parameters())
    paths = {side: {id(p) for n, p in named if ".experts." in n and f".{side}." in n}
             for side in ("encoder", "decoder")}
    assert paths["encoder"] and paths["decoder"]
    assert by_lr == {1e-3: paths["encoder"], 2e-4: paths["decoder"],
                     3e-3: {id(p) for n, p in named if ".gates." in n}}
