"""Training a LoRA expert with Lightning on the tiny Whisper: the recipe, the cache, checkpoints, config."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from trainers.train_lora import TrainConfig, train_lora_expert


@pytest.fixture(scope="module")
def trained(uk_corpus, tiny_whisper_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=4, epochs=3,
                      batch_size=4, lr=1e-2, warmup_steps=1, run_dir=str(run), progress=False, patience=5)
    expert, report = train_lora_expert(cfg)
    return cfg, expert, report


def test_expert_has_a_complete_manifest(trained, tiny_whisper_dir):
    cfg, expert, report = trained
    m = expert.manifest
    assert m["kind"] == "lora" and m["languages"] == ["uk"]
    assert m["base"]["fingerprint"] and m["base"]["tokenizer_fingerprint"]
    # The default recipe: decoder + the top three encoder layers (all of the tiny base's two), LoRA dropout 0
    hp = m["hyperparameters"]
    assert hp["rank"] == 4 and (hp["side"], hp["encoder_start"], hp["dropout"]) == ("both", 0, 0.0)
    # The precision the run trained in (the machine's default here), so a float32 and a bf16 expert are told apart
    from trainers.configs import default_precision

    assert hp["precision"] == default_precision()
    assert m["data"]["utterances"] > 0 and m["data"]["hours"] > 0
    assert set(m["metrics"]["uk"]) == {"validation", "test", "base_test"}
    assert len(report["history"]) == 3 and all("val_wer" in h for h in report["history"])
    assert {k.split(".")[1] for k in expert.tensors} == {"encoder", "decoder"}


def test_checkpoints_hold_the_expert_only_and_loss_goes_down(trained):
    cfg, expert, report = trained
    from pathlib import Path

    ckpts = list(Path(cfg.run_dir).glob("logs/version_*/checkpoints/best-*.ckpt"))
    assert len(ckpts) == 1 and str(ckpts[0]) == report["checkpoint"]
    assert (ckpts[0].parent / "last.ckpt").is_file()  # what --resume continues from
    state = torch.load(ckpts[0], weights_only=False, map_location="cpu")["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert len(state) == len(expert.tensors)
    rows = list(csv.DictReader(open(next(Path(cfg.run_dir).glob("logs/*/metrics.csv")))))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert losses[-1] < losses[0]


def test_a_rerun_in_the_same_run_dir_keeps_its_checkpoint_apart(uk_corpus, tiny_whisper_dir, tmp_path):
    """A run started again in a used run directory (after an interruption, say) writes its checkpoint in its own
    version folder, beside its own logs: never next to a stale checkpoint of the earlier run."""
    from pathlib import Path

    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=2, epochs=1,
                      batch_size=4, lr=1e-2, warmup_steps=1, run_dir=str(tmp_path), progress=False, test=False)
    first = Path(train_lora_expert(cfg)[1]["checkpoint"])
    second = Path(train_lora_expert(cfg)[1]["checkpoint"])
    assert first.exists() and second.exists() and first.parent != second.parent
    assert sorted(p.name for p in second.parent.iterdir()) == sorted([second.name, "last.ckpt"])
    assert (second.parent.parent / "metrics.csv").exists()  # the checkpoint sits with its own run's logs


def test_an_interrupted_run_resumes_from_its_last_checkpoint(uk_corpus, tiny_whisper_dir, tmp_path):
    """--resume: the run goes on from the checkpoint's epoch and step, its history and best expert carried over,
    also from a checkpoint written before the best-expert callback kept a state (then its own weights are it)."""
    from pathlib import Path

    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=2, epochs=1,
                      batch_size=4, lr=1e-2, warmup_steps=1, run_dir=str(tmp_path / "a"), progress=False,
                      test=False, patience=5)
    first = train_lora_expert(cfg)[1]
    last = Path(first["checkpoint"]).parent / "last.ckpt"
    steps = first["history"][0]["step"]
    resumed = train_lora_expert(dataclasses.replace(cfg, epochs=3, resume=str(last)))[1]
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][0] == first["history"][0]  # carried over, not re-run
    assert [h["step"] for h in resumed["history"]] == [steps, 2 * steps, 3 * steps]
    assert resumed["best_val_wer"] == min(h["val_wer"] for h in resumed["history"])

    # A checkpoint without the callback's state (written before it had one): its weights are the kept expert
    legacy = torch.load(last, weights_only=False, map_location="cpu")
    legacy["callbacks"] = {k: v for k, v in legacy["callbacks"].items() if not k.startswith("KeepBestExpert")}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    expert, report = train_lora_expert(dataclasses.replace(cfg, epochs=2, resume=str(tmp_path / "legacy.ckpt")))
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert report["history"][0]["val_wer"] == pytest.approx(first["history"][0]["val_wer"])
    if report["best_epoch"] == 0:
        saved = {k.split("model.", 1)[1]: v for k, v in legacy["state_dict"].items()}
        assert all(torch.equal(saved[k], v) for k, v in expert.tensors.items() if k in saved)


@pytest.mark.parametrize("problem, message", [
    ("missing", "no such checkpoint file"),
    ("garbage", "not a readable Lightning checkpoint"),
    ("other rank", "rank=2"),
])
def test_a_bad_resume_checkpoint_is_refused_naming_it(uk_corpus, tiny_whisper_dir, tmp_path, problem, message):
    from pathlib import Path

    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=2, epochs=1,
                      batch_size=4, lr=1e-2, warmup_steps=1, run_dir=str(tmp_path / "a"), progress=False,
                      test=False)
    path = tmp_path / "x.ckpt"
    if problem == "garbage":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif problem == "other rank":
        path = Path(train_lora_expert(cfg)[1]["checkpoint"]).parent / "last.ckpt"
        cfg = dataclasses.replace(cfg, rank=4)
    with pytest.raises(ValueError, match=message) as err:
        train_lora_expert(dataclasses.replace(cfg, resume=str(path)))
    assert str(path) in str(err.value)


def test_resume_is_for_lora_runs():
    from trainers.configs import FullTrainConfig, SparseTrainConfig

    for config in (FullTrainConfig, SparseTrainConfig):
        with pytest.raises(ValueError, match="--resume continues a LoRA run"):
            config(data="d", languages=("uk",), resume="last.ckpt")


def test_encoder_cache_gives_the_same_loss_as_the_live_encoder(uk_corpus, tiny_whisper_dir, tmp_path):
    from registry.bases import load_base
    from lora_experts.config import LoraExpertConfig
    from trainers.data import ExpertDataModule
    from trainers.lora_module import LoraExpertModule

    base = load_base(str(tiny_whisper_dir), device="cpu")
    module = LoraExpertModule(base.model, base.processor, LoraExpertConfig(rank=2, dropout=0.0))
    cached = ExpertDataModule(str(uk_corpus), base.processor, ["uk"], 4, encoder=base.model.model.encoder,
                              cache_dir=str(tmp_path), base_fingerprint=base.fingerprint, progress=False)
    live = ExpertDataModule(str(uk_corpus), base.processor, ["uk"], 4, progress=False)
    cached.setup()
    live.setup()
    a, b = next(iter(cached.val_dataloader())), next(iter(live.val_dataloader()))
    assert "encoder_hidden_states" in a and "input_features" in b
    assert torch.equal(a["labels"], b["labels"])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module._loss(a), module._loss(b), rtol=2e-3, atol=2e-3)
    # The cache is reused, not recomputed, by a second data module over the same utterances.
    again = ExpertDataModule(str(uk_corpus), base.processor, ["uk"], 4, encoder=None, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    cached2 = ExpertDataModule(str(uk_corpus), base.processor, ["uk"], 4, encoder=base.model.model.encoder,
                               cache_dir=str(tmp_path), base_fingerprint=base.fingerprint, progress=False)
    cached2.setup()
    assert sorted(p.name for p in tmp_path.iterdir()) == files and again is not None


def test_labels_mask_the_prompt_and_end_with_end_of_text(tiny_whisper):
    from trainers.data import IGNORE, make_example

    tok = tiny_whisper[1].tokenizer
    ex = make_example(tok, "добрий день", "uk")
    assert ex["decoder_input_ids"][:4] == [50258, tok.convert_tokens_to_ids("<|uk|>"), 50359, 50363]
    assert ex["labels"][:3] == [IGNORE] * 3 and ex["labels"][-1] == 50257
    assert ex["labels"][3:-1] == ex["decoder_input_ids"][4:]


def test_warm_start_begins_from_the_given_expert(trained, uk_corpus, tiny_whisper_dir, tmp_path):
    from registry.expert_file import save_expert

    _, expert, _ = trained
    save_expert(expert, tmp_path / "start.safetensors")
    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=4, epochs=1,
                      max_steps=1, lr=1e-9, warmup_steps=0, batch_size=4, run_dir=str(tmp_path / "run"),
                      progress=False, test=False, init_from=str(tmp_path / "start.safetensors"))
    warm, _ = train_lora_expert(cfg)
    assert warm.manifest["lineage"]["parents"][0]["role"] == "warm start"
    for k, v in expert.tensors.items():
        torch.testing.assert_close(warm.tensors[k], v, rtol=0, atol=1e-6)


def test_unknown_language_is_refused(uk_corpus, tiny_whisper_dir, tmp_path):
    cfg = TrainConfig(data=str(uk_corpus), languages=("xx",), base=str(tiny_whisper_dir), run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown language"):
        train_lora_expert(cfg)


def test_yaml_config_with_overrides(tmp_path):
    from trainers.cli import build_parser
    from trainers.cli.train import _config_from_args

    (tmp_path / "c.yaml").write_text("data: d\nlanguage: uk\nname: uk-x\nrank: 8\nepochs: 4\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2"])
    cfg, name, _ = _config_from_args(args)
    assert (cfg.rank, cfg.epochs, cfg.languages, name) == (8, 2, ("uk",), "uk-x")
    (tmp_path / "bad.yaml").write_text("data: d\nlanguage: uk\nname: x\nrnak: 8\n")
    with pytest.raises(ValueError, match="unknown option.*rnak"):
        _config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))
    assert dataclasses.replace(cfg, rank=2).rank == 2


def test_example_config_parses():
    from pathlib import Path

    from trainers.cli import build_parser
    from trainers.cli.train import _config_from_args

    path = Path(__file__).resolve().parents[2] / "examples" / "train_lora_uk.yaml"
    assert path.read_text().startswith("# whisper-experts train --config examples/train_lora_uk.yaml")
    cfg, name, _ = _config_from_args(build_parser().parse_args(["train", "--config", str(path)]))
    assert name == "uk-espeak" and cfg.languages == ("uk",) and cfg.side == "decoder"
    enc, name, _ = _config_from_args(build_parser().parse_args(["train", "--config", str(path.parent /
                                                                 "train_lora_uk_encoder.yaml")]))
    assert name == "uk-espeak-enc3" and (enc.side, enc.encoder_start, enc.precision) == ("both", 3, "bf16-mixed")
    assert enc.lora().touches_encoder and enc.dropout == 0.0


def test_encoder_halves_compose_to_the_whole_encoder(tiny_whisper):
    from trainers.data import encode_from, encode_until

    encoder = tiny_whisper[0].model.encoder
    x = torch.randn(2, tiny_whisper[0].config.num_mel_bins, 3000)
    with torch.no_grad():
        whole = encoder(x).last_hidden_state
        for k in range(len(encoder.layers) + 1):
            assert torch.equal(encode_from(encoder, encode_until(encoder, x, k), k), whole)


def test_top_encoder_expert_trains_on_cached_layer_inputs(uk_corpus, tiny_whisper_dir, tmp_path):
    """--side both --encoder-start 1: encoder layer 0 is frozen and cached, layer 1 and the decoder adapt, and the
    loss on cached layer inputs equals the loss through the live encoder."""
    from lora_experts.config import LoraExpertConfig
    from registry.bases import load_base
    from trainers.data import ExpertDataModule
    from trainers.lora_module import LoraExpertModule

    base = load_base(str(tiny_whisper_dir), device="cpu")
    lora = LoraExpertConfig(rank=2, dropout=0.0, side="both", encoder_start=1)
    module = LoraExpertModule(base.model, base.processor, lora)
    adapted = {k.rsplit(".", 1)[0] for k in module.expert_tensors()}
    assert not any(k.startswith("model.encoder.layers.0.") for k in adapted)
    assert any(k.startswith("model.encoder.layers.1.") for k in adapted)
    with torch.no_grad():  # a non-zero expert, so the adapted top layer matters
        for p in base.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    cached = ExpertDataModule(str(uk_corpus), base.processor, ["uk"], 4, encoder=base.model.model.encoder,
                              encoder_layer=1, cache_dir=str(tmp_path), base_fingerprint=base.fingerprint,
                              progress=False)
    live = ExpertDataModule(str(uk_corpus), base.processor, ["uk"], 4, progress=False)
    cached.setup()
    live.setup()
    assert all(p.name.endswith(("-layer1.npy", "-layer1.done")) for p in tmp_path.iterdir())
    a, b = next(iter(cached.val_dataloader())), next(iter(live.val_dataloader()))
    assert "encoder_layer_input" in a and "input_features" in b
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module._loss(a), module._loss(b), rtol=2e-3, atol=2e-3)
    module.train()
    module._loss(a).backward()  # gradients reach the adapted encoder layer through the cached inputs
    grads = [p.grad for n, p in base.model.named_parameters() if "encoder.layers.1." in n and p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_negative_encoder_start_counts_from_the_top():
    """-3 is the top three layers on any Whisper size (layers 3-5 of whisper-base, 29-31 of large-v2), every layer
    of a smaller encoder; an expert that leaves the encoder alone records 0; an unresolved start builds no regex."""
    from lora_experts.config import LoraExpertConfig

    top3 = LoraExpertConfig(side="both", encoder_start=-3, dropout=0.0)
    assert [top3.for_encoder(n).encoder_start for n in (2, 4, 6, 32)] == [0, 1, 3, 29]
    assert LoraExpertConfig(side="decoder", encoder_start=-3).for_encoder(6).encoder_start == 0
    assert LoraExpertConfig(side="both", encoder_start=3).for_encoder(6).encoder_start == 3
    with pytest.raises(ValueError, match="encoder_start 6: the encoder has layers 0..5"):
        LoraExpertConfig(side="both", encoder_start=6).for_encoder(6)
    with pytest.raises(ValueError, match="counts from the top"):
        top3.target_regex()
    assert TrainConfig(data="d", languages=("cs",)).lora() == top3  # the default recipe


def test_default_precision_follows_the_machine(monkeypatch):
    from trainers.configs import default_precision

    native = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert default_precision() == ("bf16-mixed" if native else "32-true")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert default_precision() == "32-true"


def test_encoder_start_beyond_the_encoder_is_refused(uk_corpus, tiny_whisper_dir, tmp_path):
    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), side="both",
                      encoder_start=2, run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="encoder-start 2.*layers 0..1"):
        train_lora_expert(cfg)


def test_bf16_autocast_training_on_cpu_gives_a_float32_expert(uk_corpus, tiny_whisper_dir, tmp_path):
    """--precision bf16-mixed on the CPU (a top-encoder expert, as benchmarks/expert_wer.py trains them): the
    stored expert is float32, finite and trained (B moved from its zero start), and it is tested."""
    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=2, epochs=1,
                      batch_size=4, lr=1e-2, warmup_steps=1, run_dir=str(tmp_path), progress=False, side="both",
                      encoder_start=1, dropout=0.0, precision="bf16-mixed", test_limit=2)
    expert, report = train_lora_expert(cfg)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in expert.tensors.values())
    assert any(k.startswith("model.encoder.layers.1.") for k in expert.tensors)
    assert all(t.abs().sum() > 0 for k, t in expert.tensors.items() if "lora_B" in k)
    assert report["test"]["expert"]["uk"]["n"] == 2
