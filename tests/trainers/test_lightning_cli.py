"""`whisper-experts lightning`: the LightningCLI path trains on the tiny Whisper and stores the best expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trainers.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_lora_uk.yaml"


def _printed_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(["lightning", "fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_lightning_example_config_parses_and_takes_overrides(capsys):
    assert EXAMPLE.read_text().startswith("# whisper-experts lightning fit --config examples/lightning_lora_uk.yaml")
    config = _printed_config(capsys, "--config", str(EXAMPLE), "--model.rank", "8", "--trainer.max_epochs", "2")
    assert config["model"]["rank"] == 8 and config["model"]["languages"] == ["uk"]
    assert config["trainer"]["max_epochs"] == 2 and config["trainer"]["use_distributed_sampler"] is False
    assert config["expert"]["name"] == "uk-espeak" and config["data"]["data"] == "data/uk"
    assert config["checkpoint"]["monitor"] == config["early_stopping"]["monitor"] == "val_wer"


def test_lightning_help_teaches_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["lightning", "--help"])
    assert "whisper-experts lightning fit --config examples/lightning_lora_uk.yaml" in capsys.readouterr().out


def test_lightning_fit_stores_the_best_expert_with_a_complete_manifest(uk_corpus, tiny_whisper_dir, tmp_path, capsys):
    from registry.store import Registry

    registry = tmp_path / "registry"
    code = main(["lightning", "fit", "--config", str(EXAMPLE), "--model.base", str(tiny_whisper_dir),
                 "--model.rank", "4", "--model.lr", "0.01", "--model.warmup_steps", "0",
                 "--data.data", str(uk_corpus), "--data.batch_size", "4", "--data.progress", "false",
                 "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.enable_progress_bar", "false", "--expert.name", "uk-lightning",
                 "--expert.registry", str(registry), "--expert.test_limit", "1"])
    assert code == 0
    assert "stored uk-lightning@1 in the registry" in capsys.readouterr().out

    expert = Registry(registry).get("uk-lightning@latest")
    m = expert.manifest
    assert m["kind"] == "lora" and m["languages"] == ["uk"] and m["base"]["name"] == str(tiny_whisper_dir)
    assert m["base"]["fingerprint"] and m["base"]["tokenizer_fingerprint"]
    assert m["hyperparameters"]["rank"] == 4 and m["hyperparameters"]["lr"] == 0.01
    assert m["hyperparameters"]["epochs_run"] == 1 and m["hyperparameters"]["batch_size"] == 4
    assert m["data"]["corpus"] == str(uk_corpus) and m["data"]["utterances"] == 9
    assert set(m["metrics"]["uk"]) == {"validation", "test", "base_test"} and m["metrics"]["uk"]["test"]["n"] == 1
    assert all(k.startswith("model.decoder.") for k in expert.tensors)
    assert any(v.abs().sum() > 0 for k, v in expert.tensors.items() if k.endswith("lora_B"))  # it trained

    # The checkpoint holds the expert only, and LightningCLI saved the full config beside the logs.
    ckpts = list((tmp_path / "run").rglob("*.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=False, map_location="cpu")["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert list((tmp_path / "run").rglob("config.yaml"))


def test_lightning_fit_without_an_expert_name_is_refused_before_loading(tmp_path, capsys):
    code = main(["lightning", "fit", "--model.languages", "[uk]", "--model.base", str(tmp_path / "no-such-base"),
                 "--data.data", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
    assert code == 2 and "no expert name" in capsys.readouterr().err
    code = main(["lightning", "fit", "--model.languages", "[uk]", "--model.base", str(tmp_path / "no-such-base"),
                 "--data.data", str(tmp_path), "--expert.name", "../up", "--trainer.default_root_dir", str(tmp_path)])
    assert code == 2 and "../up" in capsys.readouterr().err


def test_lightning_fit_resumes_from_its_checkpoint(uk_corpus, tiny_whisper_dir, tmp_path, capsys):
    """LightningCLI's own --ckpt_path continues a run: the epochs go on and the best expert so far carries over."""
    from registry.store import Registry

    common = ["lightning", "fit", "--config", str(EXAMPLE), "--model.base", str(tiny_whisper_dir),
              "--model.rank", "2", "--model.lr", "0.01", "--model.warmup_steps", "0", "--data.data", str(uk_corpus),
              "--data.batch_size", "4", "--data.progress", "false", "--trainer.default_root_dir",
              str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", "--expert.name", "uk-lightning",
              "--expert.registry", str(tmp_path / "registry"), "--expert.test_limit", "1"]
    assert main([*common, "--trainer.max_epochs", "1"]) == 0
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    assert main([*common, "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)]) == 0
    expert = Registry(tmp_path / "registry").get("uk-lightning@2")
    assert expert.manifest["hyperparameters"]["epochs_run"] == 2
