"""Teachers: specs, the tokenizer check, experts applied to a teacher, one teacher per language."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from distill.teachers import (Teacher, TeacherMismatchError, TeacherSet, check_same_tokenizer, load_teachers,
                              parse_spec)
from tests.distill.clsr_helpers import FEATS, IDS
from tests.tiny import random_lora_expert


def test_specs_split_base_and_expert(tmp_path):
    assert parse_spec("openai/whisper-large-v2") == ("openai/whisper-large-v2", None)
    assert parse_spec("whisper-base+uk-teacher@2") == ("whisper-base", "uk-teacher@2")
    assert parse_spec("uk-espeak", default_base="whisper-base") == ("whisper-base", "uk-espeak")
    odd = tmp_path / "my+model"
    odd.mkdir()
    assert parse_spec(str(odd)) == (str(odd), None)  # an existing directory is never split
    with pytest.raises(ValueError, match="BASE\\+EXPERT"):
        parse_spec("whisper-base+")


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(tiny_whisper_dir, tmp_path):
    from registry.bases import load_base

    student = load_base(str(tiny_whisper_dir), device="cpu")
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_whisper_dir, other)
    config = json.loads((other / "preprocessor_config.json").read_text())
    config["chunk_length"] = 20  # other features: the tokenizer/feature fingerprint differs
    (other / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherMismatchError, match="other-teacher.*tiny-whisper|tiny-whisper.*other-teacher"):
        load_teachers(str(other), student)
    fake = SimpleNamespace(name="big", tokenizer_fingerprint="abc")
    with pytest.raises(TeacherMismatchError, match="big .*abc.*student"):
        check_same_tokenizer(fake, student)
    assert load_teachers(str(tiny_whisper_dir), student).teachers[0].languages is None  # same tokenizer: fine


@pytest.fixture(scope="module")
def short_dir(short_whisper, tiny_whisper_dir, tmp_path_factory):
    """``short_whisper`` (100-frame window) saved with the tiny Whisper's tokenizer and features."""
    out = tmp_path_factory.mktemp("short") / "short-whisper"
    shutil.copytree(tiny_whisper_dir, out)
    short_whisper.save_pretrained(out)
    return out


def test_base_plus_lora_experts_one_teacher_per_language(short_dir, tmp_path):
    from lora_experts.model import attach_expert, remove_experts
    from registry.bases import load_base
    from registry.store import Registry

    student = load_base(str(short_dir), device="cpu")
    registry = Registry(tmp_path / "registry")
    uk = random_lora_expert(student.model, student, "uk", 1)
    pt = random_lora_expert(student.model, student, "pt", 2)
    registry.add(uk, "uk-t")
    registry.add(pt, "pt-t")
    teachers = load_teachers(["uk-t", "pt-t"], student, registry=tmp_path / "registry")
    assert len(teachers.teachers) == 1 and teachers.languages == ["uk", "pt"]  # two adapters on one model
    assert teachers.fingerprint("uk") != teachers.fingerprint("pt") != student.fingerprint
    feats, ids = FEATS, IDS[:, :5]
    mixed = teachers.logits(feats, ids, ["uk", "pt"])
    with torch.no_grad():  # each sample scored by its own language's expert
        for row, expert in enumerate((uk, pt)):
            attach_expert(student.model, expert.tensors, expert.manifest["hyperparameters"])
            want = student.model(input_features=feats[row:row + 1], decoder_input_ids=ids[row:row + 1]).logits
            remove_experts(student.model)
            torch.testing.assert_close(mixed[row:row + 1], want, rtol=1e-4, atol=1e-4)
    identity = teachers.identity()["teachers"][0]
    assert [e["spec"] for e in identity["experts"]] == ["uk-t", "pt-t"] and identity["teaches"] == ["uk", "pt"]
    with pytest.raises(ValueError, match="no teacher for nl"):
        teachers.check_covers(["uk", "nl"])
    # A single BASE+EXPERT teacher teaches every language with its expert applied.
    single = load_teachers(f"{short_dir}+uk-t", student, registry=tmp_path / "registry")
    single.check_covers(["uk", "nl"])
    torch.testing.assert_close(single.logits(feats[:1], ids[:1], ["nl"]), mixed[:1], rtol=1e-4, atol=1e-4)


def test_teacher_scores_in_eval_mode_without_gradients(short_whisper):
    base = SimpleNamespace(name="short", fingerprint="f" * 16, tokenizer_fingerprint="t")
    teacher = Teacher(short_whisper, base)
    short_whisper.train()
    logits = TeacherSet([teacher], ["short"]).logits(FEATS, IDS, ["uk", "de"])
    assert not logits.requires_grad and not short_whisper.training
    assert logits.shape == (*IDS.shape, short_whisper.config.vocab_size)
