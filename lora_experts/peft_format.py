"""PEFT's adapter format: export experts for peft / vLLM users, import adapters trained with peft.

A PEFT adapter directory holds ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight``. Pickled ``adapter_model.bin`` files are refused:
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from lora_experts.model import lora_modules

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"


def write_peft_adapter(tensors: dict[str, torch.Tensor], hyperparameters: dict, out_dir: Path | str,
                       base_model_name_or_path: str | None = None) -> Path:
    """Write expert tensors as a PEFT LoRA adapter directory loadable by ``PeftModel.from_pretrained``.

    Args:
        tensors: ``<module>.lora_A`` / ``.lora_B`` matrices.
        hyperparameters: ``alpha`` (and optionally ``dropout``, ``alpha_pattern``).
        base_model_name_or_path: recorded in ``adapter_config.json`` (a hub id or a directory).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = lora_modules(tensors)
    rank_values = sorted(set(ranks.values()))
    config = LoraConfig(
        r=rank_values[0], lora_alpha=float(hyperparameters.get("alpha", rank_values[0])),
        lora_dropout=float(hyperparameters.get("dropout", 0.0)), target_modules=sorted(ranks), bias="none",
        rank_pattern={m: r for m, r in ranks.items() if r != rank_values[0]},
        alpha_pattern=dict(hyperparameters.get("alpha_pattern", {})),
        base_model_name_or_path=base_model_name_or_path, task_type="SEQ_2_SEQ_LM",
    )
    config.save_pretrained(str(out_dir))
    save_file({f"{PREFIX}{k}.weight": v.contiguous() for k, v in tensors.items()}, str(out_dir / WEIGHTS),
              metadata={"format": "pt"})
    return out_dir


def read_peft_adapter(directory: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a PEFT LoRA adapter directory into expert tensors and hyperparameters.

    Returns:
        (tensors keyed ``<module>.lora_A`` / ``.lora_B``, hyperparameters with ``rank``, ``alpha``, ``dropout``,
        ``target_modules``; rsLoRA scaling is folded into ``alpha`` so that ``alpha / rank`` stays exact).
    """
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory} has no adapter_config.json: not a PEFT adapter directory")
    if not (directory / WEIGHTS).is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(f"{directory} holds a pickled adapter_model.bin; convert it to safetensors first "
                             "(pickles are never loaded)")
        raise FileNotFoundError(f"{directory} has no {WEIGHTS}")
    raw = json.loads((directory / "adapter_config.json").read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: a {raw.get('peft_type')} adapter, not LoRA")
    if raw.get("use_dora"):
        raise ValueError(f"{directory}: DoRA adapters are not supported as experts")
    state = load_file(str(directory / WEIGHTS))
    tensors = {}
    for key, value in state.items():
        if not key.startswith(PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"{directory}: unexpected tensor {key!r} (only LoRA A/B weights are experts)")
        name = key[len(PREFIX):-len(".weight")]
        name = name.replace(".lora_A.default", ".lora_A").replace(".lora_B.default", ".lora_B")
        tensors[name] = value
    ranks = lora_modules(tensors)
    r = int(raw.get("r", 8))
    alpha = float(raw.get("lora_alpha", r))
    if raw.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); keep alpha / r equal to that
        if len(set(ranks.values())) > 1:
            raise ValueError(f"{directory}: rsLoRA with per-module ranks is not supported")
    hyper = {"rank": r, "alpha": alpha, "dropout": float(raw.get("lora_dropout", 0.0)),
             "target_modules": sorted(ranks), "source": "peft"}
    if raw.get("alpha_pattern"):
        hyper["alpha_pattern"] = raw["alpha_pattern"]
    return tensors, hyper
