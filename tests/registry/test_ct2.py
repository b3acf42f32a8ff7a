"""CTranslate2 model.bin reading/writing and conversion to Hugging Face Whisper."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from registry.convert import ct2_variables_from_whisper, convert_ct2_directory, whisper_state_dict
from registry.ct2 import CT2FormatError, model_parts, read_ct2_model, write_ct2_model
from tests.tiny import bundled_ct2_config, bundled_tokenizer_json


def _ct2_dir(tiny_whisper, path, quantization=None, split=False):
    """Write the tiny model as a faster-whisper directory (optionally quantized / split in two parts)."""
    model, _ = tiny_whisper
    path.mkdir(parents=True, exist_ok=True)
    variables, aliases = ct2_variables_from_whisper(model.state_dict(), model.config)
    bin_path = write_ct2_model(path / "model.bin", variables, aliases=aliases, quantization=quantization)
    if split:
        blob = bin_path.read_bytes()
        cut = len(blob) // 2
        (path / "model.bin.part1").write_bytes(blob[:cut])
        (path / "model.bin.part2").write_bytes(blob[cut:])
        bin_path.unlink()
    shutil.copy(bundled_tokenizer_json(), path / "tokenizer.json")
    (path / "config.json").write_text(json.dumps(bundled_ct2_config()))
    return path


@pytest.mark.parametrize("quantization,tol", [(None, 0.0), ("float16", 1e-3), ("int8", 2e-2)])
def test_write_read_roundtrip_every_dtype(tiny_whisper, tmp_path, quantization, tol):
    model, _ = tiny_whisper
    variables, aliases = ct2_variables_from_whisper(model.state_dict(), model.config)
    write_ct2_model(tmp_path / "model.bin", variables, aliases=aliases, quantization=quantization)
    ct2 = read_ct2_model(tmp_path / "model.bin")
    assert ct2.spec_name == "WhisperSpec" and ct2.aliases == aliases
    if quantization == "int8":
        assert ct2.dtypes["decoder/layer_0/ffn/linear_0/weight"] == "int8"
    state, dims = whisper_state_dict(ct2)
    assert dims["d_model"] == 64 and dims["encoder_layers"] == 2 and dims["vocab_size"] == 51865
    original = {k: v for k, v in model.state_dict().items() if k != "proj_out.weight"}
    assert set(state) == set(original)
    for name, tensor in original.items():
        torch.testing.assert_close(state[name].float(), tensor.float(), atol=tol * tensor.abs().max().item(), rtol=0)


@pytest.mark.parametrize("quantization,split", [(None, False), ("float16", True), ("int8", False)])
def test_converted_directory_gives_same_logits(tiny_whisper, tmp_path, quantization, split):
    model, processor = tiny_whisper
    src = _ct2_dir(tiny_whisper, tmp_path / "ct2", quantization, split)
    out = convert_ct2_directory(src, tmp_path / "hf")
    converted, info = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    feats = torch.randn(2, 80, 3000)
    ids = torch.tensor([[50258, 50261, 50359, 50363, 1000], [50258, 50260, 50359, 50363, 2000]])
    with torch.no_grad():
        ref = model(input_features=feats, decoder_input_ids=ids).logits
        got = converted.eval()(input_features=feats, decoder_input_ids=ids).logits
    tol = {None: 1e-5, "float16": 2e-2, "int8": 0.25}[quantization]
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    gc = converted.generation_config
    assert gc.is_multilingual and gc.task == "transcribe" and gc.lang_to_id["<|de|>"] == 50261
    assert gc.task_to_id == {"transcribe": 50359, "translate": 50358} and gc.no_timestamps_token_id == 50363
    # The tokenizer was completed with the 1,501 timestamp tokens the packaged tokenizer.json lacks.
    from transformers import WhisperProcessor

    tok = WhisperProcessor.from_pretrained(out).tokenizer
    assert len(tok) == 51865 and tok.convert_tokens_to_ids("<|30.00|>") == 51864


def test_truncated_model_bin_is_refused(tiny_whisper, tmp_path):
    src = _ct2_dir(tiny_whisper, tmp_path / "ct2")
    blob = (src / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(CT2FormatError, match="truncated"):
        convert_ct2_directory(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.*")), "no partial output left behind"


def test_missing_part_is_named(tiny_whisper, tmp_path):
    src = _ct2_dir(tiny_whisper, tmp_path / "ct2", split=True)
    (src / "model.bin.part1").unlink()
    with pytest.raises(CT2FormatError, match=r"part\(s\) \[1\] are missing"):
        model_parts(src)
    (src / "model.bin.part2").unlink()
    with pytest.raises(CT2FormatError, match="no model.bin"):
        convert_ct2_directory(src, tmp_path / "hf")


def test_parts_across_directories(tiny_whisper, tmp_path):
    src = _ct2_dir(tiny_whisper, tmp_path / "a", split=True)
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


def test_tokenizer_that_does_not_match_the_model_is_refused(tiny_whisper, tmp_path):
    src = _ct2_dir(tiny_whisper, tmp_path / "ct2")
    data = json.loads((src / "tokenizer.json").read_text())
    data["added_tokens"] = data["added_tokens"][:50]  # drops language tokens: vocabulary no longer fits
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CT2FormatError, match="do not belong together"):
        convert_ct2_directory(src, tmp_path / "hf")
