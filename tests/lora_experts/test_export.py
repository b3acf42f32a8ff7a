"""Experts out of the project: the base with an expert merged in, as a transformers directory that
`from_pretrained` and `pipeline` load with no arguments, and as a CTranslate2 model whose runtime decodes what
the project decodes with the expert attached; CLSR experts are refused with the reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import distill.clsr  # noqa: F401  (registers the clsr kind, whose refusal names its reason)
from lora_experts.config import LoraExpertConfig
from lora_experts.export import export_ct2_expert, export_hf
from lora_experts.model import attach_expert
from registry.bases import load_base
from registry.ct2_export import ExportError
from registry.expert_file import Expert, ExpertMismatchError, new_manifest
from tests.lora_experts.random_experts import peft_random_expert

FEATS = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(3))
PROMPT = [50258, 50261, 50359, 50363]  # <|startoftranscript|><|de|><|transcribe|><|notimestamps|>


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


def _expert(base, seed=1) -> Expert:
    config = LoraExpertConfig(rank=4, alpha=8, side="both")
    tensors, hyper = peft_random_expert(copy.deepcopy(base.model), config, seed)
    return Expert(tensors, new_manifest("lora", ["de"], base, hyper))


def _attached(base, expert):
    model = copy.deepcopy(base.model)
    attach_expert(model, expert.tensors, expert.manifest["hyperparameters"])
    return model.eval()


def test_hf_export_loads_plainly_and_equals_the_attached_expert(tiny_base, tmp_path):
    from transformers import WhisperForConditionalGeneration, pipeline

    expert = _expert(tiny_base)
    out = export_hf(expert, tmp_path / "hf", "de-x@1", base=copy.deepcopy(tiny_base))
    merged = WhisperForConditionalGeneration.from_pretrained(out)  # no dtype argument: float32 on the CPU
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    ids = torch.tensor([PROMPT, PROMPT])
    with torch.no_grad():
        ours = _attached(tiny_base, expert)(input_features=FEATS, decoder_input_ids=ids).logits
        theirs = merged.eval()(input_features=FEATS, decoder_input_ids=ids).logits
        base = tiny_base.model(input_features=FEATS, decoder_input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (theirs - base).abs().max() > 1e-3  # the expert is really in there
    assert merged.generation_config.language == "de"  # a one-language expert's default
    asr = pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    result = asr(np.zeros(16000, np.float32) + 0.01 * np.sin(np.arange(16000) / 5).astype(np.float32),
                 generate_kwargs={"max_new_tokens": 5})
    assert isinstance(result["text"], str)
    assert (out / "expert.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_ct2_export_decodes_what_we_decode(tiny_base, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    expert = _expert(tiny_base, seed=2)
    out = export_ct2_expert(expert, tmp_path / "ct2", "de-x@1", quantization="float32", base=copy.deepcopy(tiny_base))
    assert {p.name for p in out.iterdir()} >= {"model.bin", "config.json", "tokenizer.json", "expert.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no intermediate copy left behind
    runtime = ctranslate2.models.Whisper(str(out), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(FEATS.numpy()))
    model = _attached(tiny_base, expert)
    with torch.no_grad():  # the encoder LoRA is merged: same encoder output
        encoded = model.model.encoder(FEATS).last_hidden_state
    np.testing.assert_allclose(np.array(runtime.encode(features, to_cpu=True)), encoded.numpy(), rtol=1e-3, atol=1e-3)
    theirs = runtime.generate(features, [PROMPT, PROMPT], beam_size=1, max_length=12, suppress_blank=False,
                              suppress_tokens=[])
    with torch.no_grad():
        ours = model.generate(FEATS, decoder_input_ids=torch.tensor([PROMPT, PROMPT]), max_new_tokens=8,
                              do_sample=False, num_beams=1, suppress_tokens=None, begin_suppress_tokens=None)
    for row, result in zip(ours.tolist(), theirs):
        assert result.sequences_ids[0] and row[:len(result.sequences_ids[0])] == result.sequences_ids[0]


def test_clsr_and_foreign_experts_are_refused(tiny_base, tmp_path, other_tiny_base):
    clsr = Expert({"x": torch.zeros(1)}, new_manifest("clsr", ["de"], tiny_base, {}))
    with pytest.raises(ExportError, match="'clsr' expert and cannot be merged.*serve it from a pack"):
        export_hf(clsr, tmp_path / "x", "de-clsr@1", base=tiny_base)
    with pytest.raises(ExpertMismatchError, match="trained on base"):
        export_hf(_expert(tiny_base), tmp_path / "y", "de-x@1", base=other_tiny_base)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def other_tiny_base(tmp_path_factory):
    from tests.tiny import make_tiny_whisper

    return load_base(str(make_tiny_whisper(tmp_path_factory.mktemp("other") / "tiny-7", seed=7)), device="cpu")
