"""Full / partial fine-tunes stored as task_vector experts, on the tiny Whisper: the module, the recipe, the CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_experts.config import LoraExpertConfig
from registry.expert_file import load_expert
from trainers.finetune_module import FullFinetuneModule, finetuned_parameters
from trainers.train_full import FullTrainConfig, train_full_expert


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions,
                           generator=g)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=g)
    return {"input_features": features, "decoder_input_ids": ids, "labels": ids}


def test_the_region_is_what_a_lora_expert_of_the_same_config_adapts(tiny_whisper):
    from lora_experts.model import add_trainable_expert, remove_experts

    model = copy.deepcopy(tiny_whisper[0])
    config = LoraExpertConfig(side="both", encoder_start=1, target_modules=("q_proj", "fc1"))
    names = finetuned_parameters(model, config, biases=False)
    add_trainable_expert(model, config)
    adapted = {n.split(".base_layer")[0] for n, m in model.named_modules()
               if hasattr(m, "lora_A") and "base_layer" not in n}
    remove_experts(model)
    assert {n[: -len(".weight")] for n in names} == adapted
    assert all(".layers.0." not in n for n in names if n.startswith("model.encoder."))
    with_bias = finetuned_parameters(model, config)
    assert set(with_bias) - set(names) and all(n.endswith(".bias") for n in set(with_bias) - set(names))


def test_deltas_are_fine_tuned_minus_base_and_the_base_comes_back_bit_exactly(tiny_whisper):
    model = copy.deepcopy(tiny_whisper[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = FullFinetuneModule(model, tiny_whisper[1], LoraExpertConfig(side="decoder"), lr=1e-2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(module.names) and all(n.startswith("model.decoder.") for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    module._loss(_batch(model)).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    deltas = module.expert_tensors()
    assert set(deltas) == trainable and any(d.abs().sum() > 0 for d in deltas.values())
    for n, d in deltas.items():
        assert torch.equal(d, params[n].detach() - before[n])  # applying it adds back up to float rounding
        torch.testing.assert_close(before[n] + d, params[n].detach(), rtol=0, atol=1e-7)
    assert all(torch.equal(params[n], before[n]) for n in before if n not in trainable)
    module.restore_base()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def fine_tuned(uk_corpus, tiny_whisper_dir, tmp_path_factory):
    cfg = FullTrainConfig(data=str(uk_corpus), base=str(tiny_whisper_dir), languages=("uk",), epochs=1,
                          max_steps=2, batch_size=4, lr=1e-2, warmup_steps=1, progress=False, test_limit=1,
                          run_dir=str(tmp_path_factory.mktemp("full")))
    return train_full_expert(cfg)


def test_the_recipe_stores_a_task_vector_expert_that_fuses(fine_tuned, tiny_whisper):
    from inference.language_matrix import expert_applied
    from lora_experts.merge import fuse_experts

    expert, report = fine_tuned
    m = expert.manifest
    assert m["kind"] == "task_vector" and m["languages"] == ["uk"]
    assert m["hyperparameters"]["mode"] == "fine-tune" and "rank" not in m["hyperparameters"]
    assert set(expert.tensors) == set(finetuned_parameters(tiny_whisper[0], LoraExpertConfig(side="decoder")))
    assert report["parameters"] == sum(t.numel() for t in expert.tensors.values())
    assert set(m["metrics"]["uk"]) == {"validation", "test", "base_test"} and m["data"]["utterances"] > 0
    assert any(t.abs().sum() > 0 for t in expert.tensors.values())
    # Task arithmetic takes it: weights (1, 0) give it back exactly, and applying it changes only its region.
    fused, _ = fuse_experts([expert, expert], [1.0, 0.0], "linear")
    assert fused.kind == "task_vector" and all(torch.equal(fused.tensors[k], v) for k, v in expert.tensors.items())
    model = copy.deepcopy(tiny_whisper[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with expert_applied(model, expert):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= set(expert.tensors)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_train_kind_task_vector_from_the_command_line(uk_corpus, tiny_whisper_dir, tmp_path, capsys, monkeypatch):
    from trainers.cli import main

    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(tmp_path / "home"))
    assert main(["train", "--kind", "task_vector", "--base", str(tiny_whisper_dir), "--data", str(uk_corpus),
                 "--language", "uk", "--name", "uk-ft", "--side", "both", "--encoder-start", "1", "--epochs", "1",
                 "--max-steps", "1", "--batch-size", "4", "--test-limit", "1", "--run-dir", str(tmp_path / "run"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stored uk-ft@1 in the registry" in out and "fine-tuned parameters" in out
    expert = load_expert(tmp_path / "run" / "expert.safetensors")
    assert expert.kind == "task_vector" and expert.manifest["hyperparameters"]["lr"] == 3e-5
    assert any(k.startswith("model.encoder.layers.1.") for k in expert.tensors)
    assert not any(k.startswith("model.encoder.layers.0.") for k in expert.tensors)
    with pytest.raises(ValueError, match="--init-from applies to LoRA experts"):
        FullTrainConfig(data="d", languages=("uk",), init_from="x")
