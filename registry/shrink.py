"""A smaller student Whisper cut from a base: fewer decoder layers, each initialised from one of the base's.

DistilWhisper teaches a small Whisper from a much larger one; distil-whisper builds its students by keeping the
encoder whole and a few decoder layers spread over the teacher's (the first and the last for two). No larger
multilingual Whisper than whisper-base is offline here, so the same gap is made the other way round: a student
cut from whisper-base, taught by whisper-base plus an expert (``whisper-experts distill --base <student>
--teacher whisper-base+cs-real``). Real users cut from whisper-large-v2 the same way.

    whisper-experts base shrink whisper-base --decoder-layers 2 --name whisper-base-dec2
    whisper-experts base shrink whisper-base --decoder-layers 0,3,5 --name whisper-base-dec3

The student is registered as a base of its own (its own fingerprint: experts trained on it are refused on the
full base and back), with the layers it kept recorded under ``shrunk_from`` in its ``base.json``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path


def pick_layers(total: int, keep: int | str | list[int]) -> list[int]:
    """The decoder layers a student keeps, in order.

    Args:
        total: the base's decoder layers.
        keep: a count (spread evenly from the first layer to the last, as distil-whisper picks them: 2 of 6 ->
            0, 5), or explicit indices (a list, or a comma-separated string such as ``"0,3,5"``).
    """
    if isinstance(keep, str):
        try:  # "2" is a count; "0,5" (or "4,") names layers
            keep = [int(p) for p in keep.split(",") if p.strip()] if "," in keep else int(keep)
        except ValueError:
            raise ValueError(f"--decoder-layers takes a count (2) or layer indices (0,5), got {keep!r}") from None
    if isinstance(keep, int):
        if not 1 <= keep <= total:
            raise ValueError(f"a student keeps 1 to {total} decoder layers of this base, not {keep}")
        if keep == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})
    layers = list(keep)
    bad = [i for i in layers if not 0 <= i < total]
    if not layers or bad or len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"decoder layer indices must be distinct, increasing and within 0..{total - 1}, "
                         f"got {layers}")
    return layers


def shrink_model(model, layers: list[int]):
    """A new ``WhisperForConditionalGeneration`` with ``model``'s weights and only decoder ``layers``."""
    from transformers import WhisperForConditionalGeneration

    config = copy.deepcopy(model.config)
    config.decoder_layers = len(layers)
    student = WhisperForConditionalGeneration(config).to(dtype=next(model.parameters()).dtype)
    source = model.state_dict()
    renamed = {}
    prefix = "model.decoder.layers."
    for key, value in source.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"{prefix}{layers.index(int(index))}.{rest}"
        renamed[key] = value
    missing, unexpected = student.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise RuntimeError(f"shrinking left weights unmatched: missing {missing[:3]}, unexpected {unexpected[:3]}")
    student.tie_weights()
    gc = copy.deepcopy(model.generation_config)
    heads = getattr(gc, "alignment_heads", None)
    if heads:
        # word timestamps read cross-attention of given (layer, head) pairs: keep the kept layers' ones
        kept = [[layers.index(layer), head] for layer, head in heads if layer in layers]
        gc.alignment_heads = kept or [[len(layers) - 1, h] for h in range(config.decoder_attention_heads)]
    student.generation_config = gc
    return student.eval()


def shrink_base(source: str | os.PathLike, name: str, decoder_layers: int | str | list[int] = 2, *, home=None,
                overwrite: bool = False, progress=print) -> Path:
    """Cut a student from ``source`` (any base spec) keeping ``decoder_layers`` and register it as ``name``.

    Returns:
        The registered base directory.
    """
    from registry.bases import load_base, register_model

    say = progress or (lambda *_: None)
    base = load_base(source, home=home, device="cpu", progress=progress)
    total = base.model.config.decoder_layers
    layers = pick_layers(total, decoder_layers)
    student = shrink_model(base.model, layers)
    before = sum(p.numel() for p in base.model.parameters())
    after = sum(p.numel() for p in student.parameters())
    say(f"{name}: decoder layers {layers} of {base.name}'s {total}; {after / 1e6:.1f}M parameters "
        f"({after / before:.0%} of {before / 1e6:.1f}M)")
    lineage = {"base": base.name, "fingerprint": base.fingerprint, "decoder_layers": layers,
               "of_decoder_layers": total}
    return register_model(student, base.processor, name, home=home, overwrite=overwrite, progress=progress,
                          record_extra={"shrunk_from": lineage})
