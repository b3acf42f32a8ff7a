"""`whisper-experts base shrink`: a student cut from a base keeps its weights, decodes, registers as a base of
its own, and is taught by the full base through `distill`."""

from __future__ import annotations

import json

import pytest
import torch

from registry.shrink import pick_layers, shrink_model
from trainers.cli import main


@pytest.mark.parametrize("keep, want", [(2, [0, 5]), (3, [0, 2, 5]), (1, [5]), (6, list(range(6))),
                                        ("2", [0, 5]), ("0,3,5", [0, 3, 5]), ([1, 4], [1, 4]), ("4,", [4])])
def test_layers_spread_from_first_to_last_or_as_named(keep, want):
    assert pick_layers(6, keep) == want


@pytest.mark.parametrize("keep", [0, 7, "5,3", "0,0", "x", [6]])
def test_impossible_layer_choices_are_refused(keep):
    with pytest.raises(ValueError, match="decoder layer|keeps 1 to 6|count"):
        pick_layers(6, keep)


def test_the_student_keeps_the_chosen_layers_weights(tiny_whisper):
    model = tiny_whisper[0]
    student = shrink_model(model, [1])
    assert student.config.decoder_layers == 1 and model.config.decoder_layers == 2
    src, dst = model.state_dict(), student.state_dict()
    for key, value in dst.items():
        source_key = key.replace("decoder.layers.0.", "decoder.layers.1.")
        assert torch.equal(value, src[source_key]), key
    assert student.proj_out.weight.data_ptr() == student.model.decoder.embed_tokens.weight.data_ptr()
    feats = torch.randn(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    with torch.no_grad():  # same encoder; a decoder that runs, cache and all
        assert torch.equal(student.model.encoder(feats).last_hidden_state, model.model.encoder(feats).last_hidden_state)
        out = student.generate(feats, max_new_tokens=3)
    assert out.shape[0] == 1


def test_shrink_registers_a_base_that_distill_teaches_from_the_full_one(uk_pt_corpus, tiny_whisper_dir, tmp_path,
                                                                         capsys):
    from registry.bases import load_base

    assert main(["base", "shrink", str(tiny_whisper_dir), "--decoder-layers", "1", "--name", "tiny-dec1"]) == 0
    assert "decoder layers [1] of" in capsys.readouterr().out
    student = load_base("tiny-dec1", device="cpu")
    full = load_base(str(tiny_whisper_dir), device="cpu")
    assert student.model.config.decoder_layers == 1 and student.fingerprint != full.fingerprint
    record = json.loads((student.path / "base.json").read_text())
    assert record["shrunk_from"]["decoder_layers"] == [1] and record["shrunk_from"]["fingerprint"] == full.fingerprint
    assert main(["base", "shrink", str(tiny_whisper_dir), "--decoder-layers", "3", "--name", "bad"]) == 2
    assert "keeps 1 to 2 decoder layers" in capsys.readouterr().err

    # the student learns CLSR experts from the full base (read online, a forward per step)
    code = main(["distill", "--base", "tiny-dec1", "--teacher", str(tiny_whisper_dir), "--data", str(uk_pt_corpus),
                 "--languages", "uk", "--kind", "clsr", "--path", "lowrank", "--rank", "2", "--name", "dec1-clsr",
                 "--max-steps", "2", "--max-train", "3", "--registry", str(tmp_path / "registry"),
                 "--run-dir", str(tmp_path / "run"), "--no-test", "--batch-size", "4", "--lr", "0.01",
                 "--warmup-steps", "0", "--val-max-new-tokens", "4", "--quiet"])
    assert code == 0
    from registry.store import Registry

    m = Registry(tmp_path / "registry").get("dec1-clsr").manifest
    assert m["base"]["fingerprint"] == student.fingerprint
    assert m["lineage"]["teacher"]["teachers"][0]["base"]["fingerprint"] == full.fingerprint


def test_merge_registers_a_distilled_student_as_a_base(tiny_whisper_dir, tmp_path, capsys):
    """`base merge`: a student's trained weights (an expert of the cut base) merged in and registered as a base of
    its own, its record naming the expert and the base it went into; the base's weights are the student's plus
    the expert's delta; an existing name is refused unless --overwrite."""
    from lora_experts.task_vectors import task_vector
    from registry.bases import load_base
    from registry.expert_file import save_expert
    from tests.tiny import random_lora_expert

    assert main(["base", "shrink", str(tiny_whisper_dir), "--decoder-layers", "1", "--name", "tiny-cut-m"]) == 0
    student = load_base("tiny-cut-m", device="cpu")
    expert = random_lora_expert(student.model, student, "uk", 3)
    save_expert(expert, tmp_path / "kd.safetensors")
    capsys.readouterr()
    assert main(["base", "merge", str(tmp_path / "kd.safetensors"), "--name", "tiny-cut-m-kd"]) == 0
    assert "merged in" in capsys.readouterr().out
    merged = load_base("tiny-cut-m-kd", device="cpu")
    assert merged.fingerprint not in (student.fingerprint, expert.manifest["base"]["fingerprint"])
    record = json.loads((merged.path / "base.json").read_text())["merged"]
    assert record["into"] == "tiny-cut-m" and record["fingerprint"] == student.fingerprint
    assert record["expert"]["file"] == str(tmp_path / "kd.safetensors") and record["kind"] == "lora"
    weights, before = dict(merged.model.named_parameters()), dict(student.model.named_parameters())
    deltas = task_vector(expert, as_dense=True)
    assert deltas
    for key, delta in deltas.items():  # the student's weights plus the delta, parameter by parameter
        torch.testing.assert_close(weights[key], before[key] + delta)
    assert main(["base", "info", "tiny-cut-m-kd"]) == 0
    assert "merged" in capsys.readouterr().out
    assert main(["base", "merge", str(tmp_path / "kd.safetensors"), "--name", "tiny-cut-m-kd"]) == 2
    assert "--overwrite" in capsys.readouterr().err
