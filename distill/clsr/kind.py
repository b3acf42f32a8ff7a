"""The ``clsr`` kind's entry in the table of expert kinds (:mod:`lora_experts.kinds`), registered on import.

A ``clsr`` expert is one language's gated paths (:mod:`distill.clsr.expert`). Applied to one model, the model
is converted to CLSR with the expert's layout and the expert added as its language, routed for every sample
(undo converts back, bit-exactly). An expert bank routes it through the model's own CLSR layers (the runtime's
handler: ``inference.clsr_bank``). It has no task vector: for the tokens its gate opens, a language path
replaces the feed-forward output instead of adding a fixed delta to the weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from distill.clsr.config import recorded_layout
from distill.clsr.expert import attach_clsr_expert, clsr_modules
from distill.clsr.model import convert_from_clsr, convert_to_clsr, set_language
from lora_experts.kinds import Applied, ExpertKind, register_kind
from registry.expert_file import Expert


def apply_clsr(model: torch.nn.Module, expert: Expert, *, name: str = "expert", restorable: bool = True) -> Applied:
    """Convert ``model`` to CLSR with the expert's layout, add the expert as its language and route every sample
    to it. The caller has checked the expert against the model's base.

    Args:
        model: a plain ``WhisperForConditionalGeneration`` (not CLSR yet).
        name: names the expert in errors.

    Returns:
        :class:`~lora_experts.kinds.Applied`: ``activate`` routes to the expert's language again, ``undo``
        converts the model back (the base, bit-exactly).
    """
    convert_to_clsr(model, **recorded_layout(expert.manifest.get("hyperparameters", {})))
    try:
        # Its own base identity: the caller checked it against the model's base already (with its --force).
        trained_on = SimpleNamespace(**{"name": None, "tokenizer_fingerprint": None, **expert.manifest["base"]})
        language = attach_clsr_expert(model, expert, trained_on, where=f"CLSR expert {name}")
        set_language(model, language)
    except BaseException:
        convert_from_clsr(model)
        raise
    return Applied(undo=lambda: convert_from_clsr(model), activate=lambda: set_language(model, language))


CLSR = register_kind(ExpertKind(
    "clsr", "a language's gated path beside every fc1/fc2 of its layout (DistilWhisper): a full copy or a "
            "low-rank delta of each FFN, and a per-token gate",
    apply=apply_clsr, routing="layers", modules=clsr_modules,
    why_not={"task_vector": "its language paths replace the feed-forward output for the tokens its gate opens "
                            "rather than add a fixed delta to the weights; route it (whisper-experts pack create, "
                            "then transcribe) or evaluate it (whisper-experts eval --expert)",
             "merge": "a CLSR expert adds a gated language path beside each feed-forward layer, which a plain "
                      "Whisper has no place for; serve it from a pack (whisper-experts pack create, then "
                      "transcribe)",
             "peft": "only LoRA experts have one, and PEFT has no gated language paths; serve it from a pack "
                     "(whisper-experts pack create) or export it as --format safetensors"}))
