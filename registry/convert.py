"""Convert a faster-whisper / CTranslate2 Whisper directory into a Hugging Face Whisper directory.

CTranslate2 stores Whisper with its own variable names and some fusions that Hugging Face keeps apart:

- self-attention q/k/v are one linear (``self_attention/linear_0``, output rows q | k | v); Whisper's key
  projection has no bias, so the k third of the fused bias is zero and is dropped;
- cross-attention keeps q alone (``attention/linear_0``) and fuses k/v (``attention/linear_1``);
- layer norms use ``gamma``/``beta``; the output projection is an alias of the token embeddings.

The directory also holds ``config.json`` (alignment heads, language ids, suppressed tokens) and the tokenizer
(``tokenizer.json``). Some packagings drop the 1,501 timestamp tokens from ``tokenizer.json``; they are added
back so the vocabulary matches the embedding matrix. English-only models (``*.en``) are told apart from
multilingual ones by vocabulary size, not by the CTranslate2 config, whose language ids can be off by one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from registry.atomic import staged_directory
from registry.ct2 import CT2FormatError, CT2Model, model_parts, read_ct2_model

# Token ids are looked up by name in the tokenizer; these are the names.
SOT, EOT, NO_TIMESTAMPS = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"
TRANSCRIBE, TRANSLATE, START_OF_PREV = "<|transcribe|>", "<|translate|>", "<|startofprev|>"
N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 0.02 s steps


def _timestamp_token(i: int) -> str:
    return f"<|{i * 0.02:.2f}|>"


def _linear(state: dict, hf: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    state[f"{hf}.weight"] = weight
    if bias is not None:
        state[f"{hf}.bias"] = bias


def _layer_norm(state: dict, hf: str, v: dict, ct2: str) -> None:
    state[f"{hf}.weight"] = v[f"{ct2}/gamma"]
    state[f"{hf}.bias"] = v[f"{ct2}/beta"]


def _fused_qkv(state: dict, hf: str, v: dict, ct2: str, d_model: int) -> None:
    w, b = v[f"{ct2}/weight"], v.get(f"{ct2}/bias")
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(i * d_model, (i + 1) * d_model)
        # k_proj has no bias in Whisper; CTranslate2 pads the fused bias with zeros there.
        _linear(state, f"{hf}.{proj}", w[rows], None if (b is None or proj == "k_proj") else b[rows])


def _self_attention_and_ffn(state: dict, v: dict, hf: str, ct: str, d_model: int) -> None:
    """The parts encoder and decoder layers share: self-attention (fused q/k/v), its norm, the FFN and its norm."""
    _fused_qkv(state, f"{hf}.self_attn", v, f"{ct}/self_attention/linear_0", d_model)
    _linear(state, f"{hf}.self_attn.out_proj", v[f"{ct}/self_attention/linear_1/weight"],
            v[f"{ct}/self_attention/linear_1/bias"])
    _layer_norm(state, f"{hf}.self_attn_layer_norm", v, f"{ct}/self_attention/layer_norm")
    _linear(state, f"{hf}.fc1", v[f"{ct}/ffn/linear_0/weight"], v[f"{ct}/ffn/linear_0/bias"])
    _linear(state, f"{hf}.fc2", v[f"{ct}/ffn/linear_1/weight"], v[f"{ct}/ffn/linear_1/bias"])
    _layer_norm(state, f"{hf}.final_layer_norm", v, f"{ct}/ffn/layer_norm")


def whisper_state_dict(model: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """Map a CTranslate2 ``WhisperSpec`` model to Hugging Face ``WhisperForConditionalGeneration`` names.

    Returns:
        (state dict without the tied ``proj_out.weight``, dims: d_model, layer counts, heads, ffn size, mels).
    """
    if model.spec_name and model.spec_name != "WhisperSpec":
        raise CT2FormatError(f"this is a CTranslate2 {model.spec_name} model, not Whisper (WhisperSpec)")
    v = model.variables
    try:
        d_model = v["decoder/embeddings/weight"].shape[1]
        n_enc = 1 + max(int(k.split("/")[1][6:]) for k in v if k.startswith("encoder/layer_") and k.count("/") > 2)
        n_dec = 1 + max(int(k.split("/")[1][6:]) for k in v if k.startswith("decoder/layer_") and k.count("/") > 2)
    except (KeyError, ValueError) as e:
        raise CT2FormatError(f"not a Whisper model: missing {e}") from e
    dims = {
        "d_model": d_model,
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": int(model.scalar("encoder/num_heads", d_model // 64)),
        "decoder_attention_heads": int(model.scalar("decoder/num_heads", d_model // 64)),
        "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "num_mel_bins": v["encoder/conv1/weight"].shape[1],
        "vocab_size": v["decoder/embeddings/weight"].shape[0],
        "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": v["decoder/position_encodings/encodings"].shape[0],
    }
    s: dict[str, torch.Tensor] = {}
    try:
        for conv in ("conv1", "conv2"):
            _linear(s, f"model.encoder.{conv}", v[f"encoder/{conv}/weight"], v[f"encoder/{conv}/bias"])
        s["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
        _layer_norm(s, "model.encoder.layer_norm", v, "encoder/layer_norm")
        for i in range(n_enc):
            _self_attention_and_ffn(s, v, f"model.encoder.layers.{i}", f"encoder/layer_{i}", d_model)

        s["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
        s["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
        _layer_norm(s, "model.decoder.layer_norm", v, "decoder/layer_norm")
        for i in range(n_dec):
            hf, ct = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
            _self_attention_and_ffn(s, v, hf, ct, d_model)
            _linear(s, f"{hf}.encoder_attn.q_proj", v[f"{ct}/attention/linear_0/weight"],
                    v[f"{ct}/attention/linear_0/bias"])
            kv_w, kv_b = v[f"{ct}/attention/linear_1/weight"], v[f"{ct}/attention/linear_1/bias"]
            _linear(s, f"{hf}.encoder_attn.k_proj", kv_w[:d_model], None)
            _linear(s, f"{hf}.encoder_attn.v_proj", kv_w[d_model:], kv_b[d_model:])
            _linear(s, f"{hf}.encoder_attn.out_proj", v[f"{ct}/attention/linear_2/weight"],
                    v[f"{ct}/attention/linear_2/bias"])
            _layer_norm(s, f"{hf}.encoder_attn_layer_norm", v, f"{ct}/attention/layer_norm")
    except KeyError as e:
        raise CT2FormatError(f"CTranslate2 Whisper model lacks variable {e}; "
                             "the file is incomplete or not Whisper") from e
    return {k: t.contiguous() for k, t in s.items()}, dims


def _complete_tokenizer_json(data: dict, vocab_size: int) -> dict:
    """Add missing timestamp tokens so the tokenizer covers the embedding matrix (whisper's 51,865 / 51,864)."""
    added = data.setdefault("added_tokens", [])
    present = {t["content"] for t in added}
    next_id = max([t["id"] for t in added] + list(data["model"]["vocab"].values())) + 1
    for i in range(N_TIMESTAMPS):
        content = _timestamp_token(i)
        if content in present:
            continue
        added.append({"id": next_id, "content": content, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": True, "special": False})
        next_id += 1
    return data


def build_tokenizer(tokenizer_json: Path, vocab_size: int, workdir: Path) -> WhisperTokenizer:
    """A WhisperTokenizer from a faster-whisper ``tokenizer.json``, with timestamp tokens completed."""
    try:
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CT2FormatError(f"{tokenizer_json} is not a readable tokenizers JSON file ({e})") from e
    data = _complete_tokenizer_json(data, vocab_size)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (workdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer", "unk_token": EOT, "bos_token": EOT, "eos_token": EOT,
        "pad_token": EOT, "model_max_length": 448, "task": "transcribe", "predict_timestamps": False,
    }))
    tokenizer = WhisperTokenizer.from_pretrained(workdir)
    if len(tokenizer) != vocab_size:
        raise CT2FormatError(
            f"{tokenizer_json} gives {len(tokenizer)} tokens after adding timestamps, but the model's embedding "
            f"matrix has {vocab_size} rows: tokenizer and model.bin do not belong together"
        )
    return tokenizer


def build_generation_config(tokenizer: WhisperTokenizer, ct2_config: dict, dims: dict) -> GenerationConfig:
    """Generation defaults for HF Whisper: language/task token ids, suppressed tokens, no-timestamps token.

    Multilingual is decided by vocabulary size (English-only checkpoints have one token fewer).
    """
    ids = tokenizer.convert_tokens_to_ids
    eot, sot = ids(EOT), ids(SOT)
    multilingual = dims["vocab_size"] >= 51865
    lang_to_id = {}
    if multilingual:
        for code in LANGUAGES:
            tok = f"<|{code}|>"
            i = ids(tok)
            if i is not None and i != tokenizer.unk_token_id:
                lang_to_id[tok] = i
    cfg = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=dims["max_target_positions"],
        no_timestamps_token_id=ids(NO_TIMESTAMPS),
        prev_sot_token_id=ids(START_OF_PREV),
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,
    )
    if multilingual:
        cfg.lang_to_id = lang_to_id
        cfg.task_to_id = {"transcribe": ids(TRANSCRIBE), "translate": ids(TRANSLATE)}
        # A bare generate() must still emit the task token: default to transcription.
        cfg.task = "transcribe"
    return cfg


def convert_ct2_directory(
    source: Path | str, out_dir: Path | str, *, extra_dirs: list[Path] = (), dtype: torch.dtype | None = None
) -> Path:
    """Convert a CTranslate2 Whisper directory into a Hugging Face directory (safetensors weights).

    Args:
        source: directory with ``model.bin`` (or ``model.bin.partN``), ``config.json``, ``tokenizer.json``.
        out_dir: where the Hugging Face directory is written (atomically: built aside, then swapped in).
        extra_dirs: more directories holding model parts (split packages).
        dtype: weight dtype to store (default: float16 if the CTranslate2 weights were float16, else float32).

    Returns:
        ``out_dir``.
    """
    source, out_dir = Path(source), Path(out_dir)
    dirs = [source, *map(Path, extra_dirs)]

    def find(name: str) -> Path:
        for d in dirs:
            if (d / name).is_file():
                return d / name
        raise CT2FormatError(f"{name} not found in {', '.join(map(str, dirs))}: "
                             "not a complete faster-whisper model dir")

    parts = model_parts(source, extra_dirs)
    tokenizer_json, config_json = find("tokenizer.json"), find("config.json")
    try:
        ct2_config = json.loads(config_json.read_text())
    except ValueError as e:
        raise CT2FormatError(f"{config_json} is not valid JSON ({e})") from e

    model = read_ct2_model(parts)
    state, dims = whisper_state_dict(model)
    if dtype is None:
        stored = {model.dtypes.get(k) for k in model.dtypes if k.endswith("weight")}
        dtype = torch.float16 if stored == {"float16"} else torch.float32
    state = {k: t.to(dtype) for k, t in state.items()}

    with staged_directory(out_dir) as tmp:
        tokenizer = build_tokenizer(tokenizer_json, dims["vocab_size"], tmp / "_tok")
        eot = tokenizer.convert_tokens_to_ids(EOT)
        config = WhisperConfig(
            **dims,
            pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
            decoder_start_token_id=tokenizer.convert_tokens_to_ids(SOT),
            # The weights are stored as read (float16 halves the disk), but the config asks loaders for
            # float32: a plain `from_pretrained(dir)` on a CPU must work without a dtype argument.
            tie_word_embeddings=True, dtype="float32",
        )
        config.save_pretrained(tmp)
        build_generation_config(tokenizer, ct2_config, dims).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(tmp)
        shutil.rmtree(tmp / "_tok")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "conversion.json").write_text(json.dumps({
            "source": [str(p) for p in parts],
            "ct2_binary_version": model.binary_version,
            "ct2_spec": f"{model.spec_name}@{model.spec_revision}",
            "stored_dtypes": sorted(set(model.dtypes.values())),
        }, indent=2))
    return out_dir
