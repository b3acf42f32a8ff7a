"""The learned router: a small gate, trained on a language mix with the experts frozen, that picks each
utterance's expert from the base model's encoder output (the expert-fusion gate of the LoRA language-experts
paper, here routing whole utterances)::

    encoder output (batch, frames, d_model) --mean over the frames that carry audio--> (batch, d_model)
        --LayerNorm--> Linear(d_model, hidden) --GELU--> Linear(hidden, slots) --softmax--> p (batch, slots)

A **slot** is one choice the router can make: an expert of the bank together with a language it serves
(most experts serve one language: one slot per expert), or the base model for a language that no expert
serves (a "base model" slot, made for a training language without an expert; it still names the language to
decode in). The router's input is the base model's encoder output, which transcription computes anyway, so
routing costs one small MLP per utterance; the language posterior of Whisper's first decoder step is not
used, being a function of that same encoder output.

Training (``trainers/train_router.py``) runs every sample through all slots at once, weighted by ``p``
(the batched LoRA layer applies weights that require grad in rank space, so the decoder's cross-entropy
reaches the router). At inference :class:`LearnedRouting` routes hard to the top slot, or mixes the top k.

The file is one ``.safetensors``: tensors are the router's weights; the header metadata key
``whisper_experts_router`` holds a JSON manifest: ``format_version``, ``kind`` ("router"), ``experts`` (the
bank's expert names it was trained for), ``slots`` (``{"expert", "language"}`` each), ``languages`` (per slot),
``base`` (name and fingerprints; None when unknown), ``d_model``, ``hidden``, ``dropout``, ``training``
(data and optimisation summary), ``metrics``, ``created``, ``package_version``. Written atomically.

Usage::

    router = LearnedRouter.load("router.safetensors")
    decision = LearnedRouting(bank, router).route(features)          # or encoder_hidden_states=...
    with bank.route(decision):
        model.generate(features, language=decision.languages)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from inference.bank import ExpertBank
from inference.batched_layer import BASE_ONLY

ROUTER_FORMAT_VERSION = 1
ROUTER_KEY = "whisper_experts_router"
FRAMES_PER_SECOND = 50  # Whisper's encoder: 100 mel frames per second, halved by the second convolution


class RouterFormatError(ValueError):
    """A router file is missing, truncated, corrupt, or not a router."""


class RouterMismatchError(ValueError):
    """A router is asked to route a bank (or base) other than the one it was trained for."""


def audio_frames(seconds: Sequence[float], max_frames: int = 1500) -> list[int]:
    """Encoder frames that carry audio, per utterance of ``seconds`` (the rest of the 30 s window is padding)."""
    return [max(1, min(max_frames, math.ceil(s * FRAMES_PER_SECOND))) for s in seconds]


def pool(encoder_states: torch.Tensor, frames: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the encoder output over each utterance's audio frames.

    Args:
        encoder_states: (batch, frames, d_model).
        frames: per utterance, how many leading frames carry audio (:func:`audio_frames`); None: all.

    Returns:
        (batch, d_model) float32.
    """
    x = encoder_states.float()
    if frames is None:
        return x.mean(1)
    n = torch.as_tensor(frames, device=x.device).clamp(1, x.shape[1])
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]).to(x.dtype)
    return (x * mask.unsqueeze(-1)).sum(1) / n.to(x.dtype).unsqueeze(-1)


def router_slots(bank: ExpertBank, languages: Sequence[str] = ()) -> list[tuple[str | None, str]]:
    """The slots of a router for ``bank``: (expert name, language) for each language of each expert, in bank
    order, then (None, language) for each of ``languages`` that no expert serves (the base model decodes it).

    Raises:
        ValueError: an expert that names no language (the router could not say what to decode in).
    """
    slots: list[tuple[str | None, str]] = []
    for e in bank.experts:
        if not e.languages:
            raise ValueError(f"expert {e.name} names no language; a router needs each expert's language to "
                             "decode in (give the expert a language in its manifest)")
        slots += [(e.name, lang) for lang in e.languages]
    served = {lang for _, lang in slots}
    slots += [(None, lang) for lang in dict.fromkeys(languages) if lang not in served]
    return slots


class LearnedRouter(nn.Module):
    """A gate over the slots of one expert bank (see the module docstring).

    Args:
        slots: (expert name or None for the base model, language) per output, e.g. from :func:`router_slots`.
        experts: the names of every expert of the bank it routes (it refuses other banks).
        d_model: the base model's encoder width.
        hidden: width of the hidden layer; 0: a linear gate.
        dropout: dropout on the hidden layer while training.
        base: the base's identity (``name``, ``fingerprint``, ``tokenizer_fingerprint``), e.g. ``bank.base``.
        manifest: more manifest fields (``training``, ``metrics``), kept as given.
    """

    def __init__(self, slots: Sequence[tuple[str | None, str]], experts: Sequence[str], d_model: int,
                 hidden: int = 64, dropout: float = 0.1, base: dict | None = None, manifest: dict | None = None):
        super().__init__()
        self.slots = [(None if e is None else str(e), str(lang)) for e, lang in slots]
        self.experts = [str(e) for e in experts]
        if not self.slots:
            raise ValueError("a router needs at least one slot (an expert or a base-model language)")
        stray = sorted({e for e, _ in self.slots if e is not None} - set(self.experts))
        if stray:
            raise ValueError(f"slots name experts {', '.join(stray)} that are not among the router's experts "
                             f"({', '.join(self.experts)})")
        self.d_model, self.hidden, self.dropout = int(d_model), int(hidden), float(dropout)
        self.base = None if base is None else dict(base)
        self.manifest_extra = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(manifest or {})}
        self.norm = nn.LayerNorm(self.d_model)
        if self.hidden:
            self.gate = nn.Sequential(nn.Linear(self.d_model, self.hidden), nn.GELU(), nn.Dropout(self.dropout),
                                      nn.Linear(self.hidden, len(self.slots)))
        else:
            self.gate = nn.Sequential(nn.Linear(self.d_model, len(self.slots)))

    def extra_repr(self) -> str:
        named = ", ".join(f"{e or 'base'}/{lang}" for e, lang in self.slots)
        return f"slots={len(self.slots)} ({named})"

    @property
    def languages(self) -> list[str]:
        """The language each slot decodes in."""
        return [lang for _, lang in self.slots]

    def forward(self, encoder_states: torch.Tensor, frames: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Slot logits (batch, slots) from the base model's encoder output (batch, frames, d_model)."""
        if encoder_states.shape[-1] != self.d_model:
            raise RouterMismatchError(f"the router was trained on encoder outputs of width {self.d_model}, got "
                                      f"{encoder_states.shape[-1]}: a base of another size")
        param = self.norm.weight
        return self.gate(self.norm(pool(encoder_states.to(param.device), frames).to(param.dtype)))

    @torch.no_grad()
    def probabilities(self, encoder_states: torch.Tensor, frames=None) -> torch.Tensor:
        """Softmax over slots (batch, slots), float32."""
        return self(encoder_states, frames).float().softmax(-1)

    # --------------------------------------------------------------------------------------- the bank
    def slot_ids(self, bank: ExpertBank) -> torch.Tensor:
        """Each slot's expert id in ``bank`` (:data:`BASE_ONLY` for a base-model slot), matched by name.

        Raises:
            RouterMismatchError: the bank's experts are not the ones the router was trained for, or the bank's
                base has another weight fingerprint.
        """
        if sorted(bank.names) != sorted(self.experts):
            raise RouterMismatchError(
                f"this router was trained for experts [{', '.join(self.experts)}] but the bank holds "
                f"[{', '.join(bank.names)}]; load the pack it was trained with, or train a router for this one "
                "(whisper-experts router train)")
        mine, theirs = (self.base or {}).get("fingerprint"), (bank.base or {}).get("fingerprint")
        if mine and theirs and mine != theirs:
            raise RouterMismatchError(f"this router was trained on base {self.base.get('name')} (fingerprint "
                                      f"{mine}), the bank is on {bank.base.get('name')} (fingerprint {theirs}); "
                                      "train a router for this base")
        return torch.tensor([BASE_ONLY if e is None else bank.index(e) for e, _ in self.slots], dtype=torch.long)

    # --------------------------------------------------------------------------------------- the file
    def manifest(self) -> dict:
        """The JSON manifest written into the file's header (see the module docstring)."""
        from registry.expert_file import package_version

        return {"format_version": ROUTER_FORMAT_VERSION, "kind": "router", "experts": list(self.experts),
                "slots": [{"expert": e, "language": lang} for e, lang in self.slots], "languages": self.languages,
                "base": self.base, "d_model": self.d_model, "hidden": self.hidden, "dropout": self.dropout,
                "training": {}, "metrics": {}, "package_version": package_version(), **self.manifest_extra}

    def save(self, path: Path | str) -> Path:
        """Write the router (weights and manifest) to one ``.safetensors`` file, atomically."""
        from registry.atomic import atomic_write_bytes

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.state_dict().items())}
        data = save(tensors, metadata={ROUTER_KEY: json.dumps(self.manifest(), sort_keys=True, ensure_ascii=False)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu") -> "LearnedRouter":
        """Read a router file written by :meth:`save` (eval mode).

        Raises:
            RouterFormatError: missing, truncated or corrupt file; another kind of file; a newer format.
        """
        path = Path(path)
        if not path.is_file():
            raise RouterFormatError(f"router file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise RouterFormatError(f"{path} is not a readable safetensors file ({e}); the router file is truncated "
                                    "or corrupt, train it again with `whisper-experts router train`") from e
        manifest = _router_manifest(path, meta)
        try:
            router = cls([(s["expert"], s["language"]) for s in manifest["slots"]], manifest["experts"],
                         manifest["d_model"], manifest["hidden"], manifest.get("dropout", 0.0), manifest.get("base"),
                         {k: manifest[k] for k in ("training", "metrics", "created", "package_version")
                          if k in manifest})
        except (KeyError, TypeError, ValueError) as e:
            raise RouterFormatError(f"{path}: router manifest is incomplete or inconsistent ({e}); corrupt") from e
        try:
            router.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise RouterFormatError(f"{path}: the router's tensors do not match its manifest ({e}); corrupt") from e
        return router.to(device).eval()


def _router_manifest(path: Path, meta: dict) -> dict:
    if ROUTER_KEY not in meta:
        other = {"whisper_experts": "an expert file", "whisper_experts_pack": "an expert pack"}
        what = next((v for k, v in other.items() if k in meta), None)
        raise RouterFormatError(f"{path} is {what}, not a router" if what else
                                f"{path} has no '{ROUTER_KEY}' manifest in its header; not a router file")
    try:
        manifest = json.loads(meta[ROUTER_KEY])
    except ValueError as e:
        raise RouterFormatError(f"{path}: router manifest is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != "router":
        raise RouterFormatError(f"{path}: the manifest is not a router's (kind {manifest.get('kind')!r}); corrupt"
                                if isinstance(manifest, dict) else f"{path}: router manifest is not an object")
    if manifest.get("format_version", 0) > ROUTER_FORMAT_VERSION:
        raise RouterFormatError(f"{path}: router format version {manifest['format_version']} is newer than this "
                                f"package understands ({ROUTER_FORMAT_VERSION}); upgrade whisper-experts")
    return manifest
