"""``whisper-experts registry``: every action through its parser, help texts, exit codes."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from registry.expert_file import Expert, ExpertFormatError, load_expert, new_manifest, save_expert
from registry.records import ExpertNotFoundError
from registry.store import Registry
from tests.registry.test_store import make_expert
from trainers.cli.registry import register


def build_parser() -> argparse.ArgumentParser:
    """The registry command as the top-level CLI mounts it (without depending on its COMMANDS list)."""
    parser = argparse.ArgumentParser(prog="whisper-experts")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def run(*argv) -> int:
    args = build_parser().parse_args(["registry", *map(str, argv)])
    return args.func(args)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "registry"


@pytest.fixture
def expert_file(tmp_path):
    metrics = {"uk": {"validation": {"wer": 0.3}, "test": {"wer": 0.25, "cer": 0.1}}}
    return save_expert(make_expert(1, metrics=metrics), tmp_path / "uk.safetensors")


def test_add_list_show_tag_remove(root, expert_file, tmp_path, capsys):
    assert run("--registry", root, "add", expert_file, "--name", "uk-espeak", "--tag", "best") == 0
    assert "uk-espeak@1" in capsys.readouterr().out
    save_expert(make_expert(2, languages=["pt"]), tmp_path / "pt.safetensors")
    assert run("add", tmp_path / "pt.safetensors", "--name", "pt-espeak", "--registry", root) == 0  # flag after
    capsys.readouterr()

    assert run("--registry", root, "list") == 0
    out = capsys.readouterr().out
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["REF", "TAGS", "KIND", "LANGUAGES"] and "TEST WER %" in header
    assert len(lines) == 2 and "uk-espeak@1" in out and "uk 25.0" in out and "best" in out
    assert run("--registry", root, "list", "--language", "pt") == 0
    out = capsys.readouterr().out
    assert "pt-espeak@1" in out and "uk-espeak" not in out
    assert run("--registry", root, "list", "--kind", "clsr") == 0
    assert "(none)" in capsys.readouterr().out

    assert run("--registry", root, "show", "uk-espeak@best") == 0
    out = capsys.readouterr().out
    assert "sha256" in out and '"kind": "lora"' in out and '"languages": [' in out

    assert run("--registry", root, "add", tmp_path / "pt.safetensors", "--name", "uk-espeak") == 0
    assert run("--registry", root, "tag", "uk-espeak@2", "best") == 0
    assert "uk-espeak@best -> uk-espeak@2" in capsys.readouterr().out
    assert run("--registry", root, "list", "--all-versions") == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert run("--registry", root, "remove", "uk-espeak@1") == 0
    assert "removed uk-espeak@1" in capsys.readouterr().out
    assert [r.ref for r in Registry(root).records()] == ["pt-espeak@1", "uk-espeak@2"]


def test_registry_accepts_a_file_url_and_defaults_to_the_home(root, expert_file, monkeypatch, tmp_path):
    assert run("--registry", root.as_uri(), "add", expert_file, "--name", "uk") == 0
    assert Registry(root).resolve("uk").version == 1
    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(tmp_path / "home"))
    assert run("add", expert_file, "--name", "uk") == 0
    assert Registry(tmp_path / "home" / "registry").resolve("uk").version == 1


def test_verify_exits_1_and_lists_corruption(root, expert_file, capsys):
    run("--registry", root, "add", expert_file, "--name", "uk")
    capsys.readouterr()
    assert run("--registry", root, "verify") == 0
    assert capsys.readouterr().out.startswith("ok: 1 expert version(s)")
    path = Registry(root).resolve("uk").path
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run("--registry", root, "verify") == 1
    out = capsys.readouterr().out
    assert "hash:" in out and str(path) in out and "uk@1" in out


def test_user_errors_are_lookup_or_value_errors(root, expert_file):
    """The top-level CLI prints these as one `error:` line with exit code 2."""
    run("--registry", root, "add", expert_file, "--name", "uk-espeak")
    with pytest.raises(ExpertNotFoundError, match="did you mean uk-espeak"):
        run("--registry", root, "show", "uk-espek")
    with pytest.raises(ValueError, match="invalid expert name"):
        run("--registry", root, "add", expert_file, "--name", "../evil")
    with pytest.raises(ValueError, match="remote mirror"):
        run("--registry", "memory://somewhere", "add", expert_file, "--name", "uk")
    with pytest.raises(ExpertFormatError):
        run("--registry", root, "import", root / "index.sqlite", "--name", "x")


def test_top_level_cli_reports_one_error_line(root, capsys, monkeypatch):
    from trainers import cli

    if "registry" not in cli.COMMANDS:  # mounted the way trainers.cli mounts every command
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "registry"])
    assert cli.main(["registry", "--registry", str(root), "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no expert named 'nope'") and "Traceback" not in err
    assert cli.main(["registry", "--registry", str(root), "add", str(root / "missing.safetensors"), "--name", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_push_pull_and_remote_list(root, expert_file, tmp_path, capsys):
    url = f"memory://cli-{tmp_path.name}"
    run("--registry", root, "add", expert_file, "--name", "uk", "--tag", "best")
    assert run("--registry", root, "push", url) == 0
    assert "pushed uk@1" in capsys.readouterr().out
    assert run("--registry", url, "list") == 0
    assert "uk@1" in capsys.readouterr().out
    other = tmp_path / "other"
    assert run("--registry", other, "pull", url, "uk@best") == 0
    assert "pulled uk@1" in capsys.readouterr().out
    assert Registry(other).read_bytes("uk") == expert_file.read_bytes()


def test_export_safetensors_is_the_exact_file_and_imports_back(root, expert_file, tmp_path, capsys):
    run("--registry", root, "add", expert_file, "--name", "uk")
    out = tmp_path / "exported"
    assert run("--registry", root, "export", "uk", "--format", "safetensors", "--out", out) == 0
    exported = out / "uk-v1.safetensors"
    assert exported.read_bytes() == expert_file.read_bytes()
    assert run("--registry", root, "import", exported, "--name", "uk-copy") == 0
    assert Registry(root).resolve("uk-copy").sha256 == Registry(root).resolve("uk").sha256


def test_export_peft_then_import_round_trips_the_tensors(root, tmp_path, tiny_whisper_dir, capsys):
    pytest.importorskip("lora_experts.peft_format")
    from registry.bases import load_base

    base = load_base(str(tiny_whisper_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"model.decoder.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A"] = torch.randn(4, 64, generator=g)
            tensors[f"{key}.lora_B"] = torch.randn(64, 4, generator=g)
    hyper = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    Registry(root).add(Expert(tensors, new_manifest("lora", ["uk"], base, hyper)), "uk")

    out = tmp_path / "peft"
    assert run("--registry", root, "export", "uk", "--format", "peft", "--out", out) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="pass --base"):
        run("--registry", root, "import", out, "--name", "uk-peft")
    assert run("--registry", root, "import", out, "--name", "uk-peft", "--base", tiny_whisper_dir,
               "--language", "uk") == 0
    imported = Registry(root).get("uk-peft")
    assert imported.tensors.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(imported.tensors[k], t)
    m = imported.manifest
    assert m["base"]["fingerprint"] == base.fingerprint and m["languages"] == ["uk"]
    assert m["hyperparameters"]["rank"] == 4 and m["hyperparameters"]["alpha"] == 8.0
    assert m["lineage"]["imported_from"].startswith("peft:")
    # A non-LoRA expert has no PEFT form.
    Registry(root).add(make_expert(5, kind="task_vector"), "tv")
    with pytest.raises(ValueError, match="only LoRA experts"):
        run("--registry", root, "export", "tv", "--format", "peft", "--out", tmp_path / "tv")
    config = json.loads((out / "adapter_config.json").read_text())  # valid JSON for peft
    # a loadable base reference (here the base's directory; a bundled base names its hub id) and the task type
    assert config["base_model_name_or_path"] == str(tiny_whisper_dir) and config["task_type"] == "SEQ_2_SEQ_LM"
    assert load_expert(Registry(root).resolve("uk-peft").path).manifest == m
