"""An imported base is checked against the fingerprints recorded at import: a flipped byte in its weights is
found by `verify_base` and by `registry verify` for the bases its experts name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from registry.base_integrity import verify_base
from registry.fingerprint import tokenizer_fingerprint, weight_fingerprint
from registry.store import Registry
from tests.registry.test_store import make_expert
from trainers.cli import main


@pytest.fixture
def home(tmp_path, tiny_whisper_dir, monkeypatch):
    """A home with the tiny Whisper imported as ``tiny-b`` (a base.json as `base import` writes it)."""
    home = tmp_path / "home"
    target = home / "bases" / "tiny-b"
    shutil.copytree(tiny_whisper_dir, target)
    model = WhisperForConditionalGeneration.from_pretrained(target, dtype=torch.float32)
    processor = WhisperProcessor.from_pretrained(target)
    record = {"name": "tiny-b", "fingerprint": weight_fingerprint(model),
              "tokenizer_fingerprint": tokenizer_fingerprint(processor.tokenizer, processor.feature_extractor)}
    (target / "base.json").write_text(json.dumps(record))
    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(home))
    return home


def _flip_a_weight(directory) -> None:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's float32 values
    path.write_bytes(bytes(data))


def test_verify_base_finds_a_flipped_byte(home):
    directory = home / "bases" / "tiny-b"
    assert verify_base("tiny-b") == [] and verify_base(directory) == []
    _flip_a_weight(directory)
    problems = verify_base("tiny-b")
    assert len(problems) == 1 and "the weights changed since import" in problems[0] and str(directory) in problems[0]
    assert "base import tiny-b --overwrite" in problems[0]
    assert verify_base(home / "bases" / "nope")[0].endswith("(import it with `whisper-experts base import`)")


def test_registry_verify_checks_the_bases_its_experts_name(home, tmp_path, capsys):
    reg = Registry(tmp_path / "registry")
    base = {"name": "tiny-b", "fingerprint": json.loads((home / "bases" / "tiny-b" / "base.json").read_text())
            ["fingerprint"], "tokenizer_fingerprint": "t" * 16}
    reg.add(make_expert(1, base=base), "uk")
    reg.add(make_expert(2), "other-base")  # names base "tiny", which is not imported: not checked
    assert reg.verify() == []
    _flip_a_weight(home / "bases" / "tiny-b")
    problems = reg.verify()
    assert [(p.kind, p.refs) for p in problems] == [("base", ("uk@1",))]
    assert main(["registry", "--registry", str(reg.root), "verify"]) == 1
    out = capsys.readouterr().out
    assert "base: " in out and "re-import" in out
    assert main(["registry", "--registry", str(reg.root), "verify", "--no-bases"]) == 0


def test_base_verify_command(home, capsys):
    assert main(["base", "verify", "tiny-b"]) == 0
    assert "match the fingerprints recorded at import" in capsys.readouterr().out
    _flip_a_weight(home / "bases" / "tiny-b")
    assert main(["base", "verify", "tiny-b"]) == 1
    assert "problem: " in capsys.readouterr().out
