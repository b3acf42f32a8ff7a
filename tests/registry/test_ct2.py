"""CTranslate2 model.bin reading (of what CTranslate2's own converter writes) and conversion to Hugging Face
Whisper."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from registry.convert import convert_ct2_directory, whisper_state_dict
from registry.ct2 import CT2FormatError, model_parts, read_ct2_model
from tests.tiny import ct2_model_dir


def _ct2_dir(tiny_whisper_dir, path, quantization="float32", split=False):
    """The tiny model as a faster-whisper directory (CTranslate2's converter; optionally split in two parts)."""
    return ct2_model_dir(tiny_whisper_dir, path, quantization, split)


@pytest.mark.parametrize("quantization,tol", [("float32", 0.0), ("float16", 1e-3), ("int8_float32", 2e-2)])
def test_converter_output_reads_back_every_dtype(tiny_whisper, tiny_whisper_dir, tmp_path, quantization, tol):
    model, _ = tiny_whisper
    ct2 = read_ct2_model(_ct2_dir(tiny_whisper_dir, tmp_path / "ct2", quantization) / "model.bin")
    assert ct2.spec_name == "WhisperSpec"
    if quantization.startswith("int8"):
        assert ct2.dtypes["decoder/layer_0/ffn/linear_0/weight"] == "int8"
    state, dims = whisper_state_dict(ct2)
    assert dims["d_model"] == 64 and dims["encoder_layers"] == 2 and dims["vocab_size"] == 51865
    original = {k: v for k, v in model.state_dict().items() if k != "proj_out.weight"}
    assert set(state) == set(original)
    for name, tensor in original.items():
        torch.testing.assert_close(state[name].float(), tensor.float(), atol=tol * tensor.abs().max().item(), rtol=0)


@pytest.mark.parametrize("quantization,split", [("float32", False), ("float16", True), ("int8_float32", False)])
def test_converted_directory_gives_same_logits(tiny_whisper, tiny_whisper_dir, tmp_path, quantization, split):
    model, processor = tiny_whisper
    src = _ct2_dir(tiny_whisper_dir, tmp_path / "ct2", quantization, split)
    out = convert_ct2_directory(src, tmp_path / "hf")
    converted, info = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    feats = torch.randn(2, 80, 3000)
    ids = torch.tensor([[50258, 50261, 50359, 50363, 1000], [50258, 50260, 50359, 50363, 2000]])
    with torch.no_grad():
        ref = model(input_features=feats, decoder_input_ids=ids).logits
        got = converted.eval()(input_features=feats, decoder_input_ids=ids).logits
    tol = {"float32": 1e-5, "float16": 2e-2, "int8_float32": 0.25}[quantization]
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    gc = converted.generation_config
    assert gc.is_multilingual and gc.task == "transcribe" and gc.lang_to_id["<|de|>"] == 50261
    assert gc.task_to_id == {"transcribe": 50359, "translate": 50358} and gc.no_timestamps_token_id == 50363
    # The tokenizer was completed with the 1,501 timestamp tokens the packaged tokenizer.json lacks.
    from transformers import WhisperProcessor

    tok = WhisperProcessor.from_pretrained(out).tokenizer
    assert len(tok) == 51865 and tok.convert_tokens_to_ids("<|30.00|>") == 51864


def test_truncated_model_bin_is_refused(tiny_whisper_dir, tmp_path):
    src = _ct2_dir(tiny_whisper_dir, tmp_path / "ct2")
    blob = (src / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(CT2FormatError, match="truncated"):
        convert_ct2_directory(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.*")), "no partial output left behind"


def test_missing_part_is_named(tiny_whisper_dir, tmp_path):
    src = _ct2_dir(tiny_whisper_dir, tmp_path / "ct2", split=True)
    (src / "model.bin.part1").unlink()
    with pytest.raises(CT2FormatError, match=r"part\(s\) \[1\] are missing"):
        model_parts(src)
    (src / "model.bin.part2").unlink()
    with pytest.raises(CT2FormatError, match="no model.bin"):
        convert_ct2_directory(src, tmp_path / "hf")


def test_parts_across_directories(tiny_whisper_dir, tmp_path):
    src = _ct2_dir(tiny_whisper_dir, tmp_path / "a", split=True)
    other = tmp_path / "b"
    other.mkdir()
    shutil.move(src / "model.bin.part2", other / "model.bin.part2")
    assert [p.name for p in model_parts(src, [other])] == ["model.bin.part1", "model.bin.part2"]
    convert_ct2_directory(src, tmp_path / "hf", extra_dirs=[other])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_garbage_file_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x07\x00\x00\x00not a model at all")
    with pytest.raises(CT2FormatError, match="unsupported CTranslate2 binary version 7"):
        read_ct2_model(tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model(tmp_path / "model.bin")


def test_tokenizer_that_does_not_match_the_model_is_refused(tiny_whisper_dir, tmp_path):
    src = _ct2_dir(tiny_whisper_dir, tmp_path / "ct2")
    data = json.loads((src / "tokenizer.json").read_text())
    data["added_tokens"] = data["added_tokens"][:50]  # drops language tokens: vocabulary no longer fits
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CT2FormatError, match="do not belong together"):
        convert_ct2_directory(src, tmp_path / "hf")
