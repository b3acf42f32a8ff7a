"""Task vectors: what an expert changes in Whisper's weights, as per-parameter deltas.

A task vector maps a Whisper parameter name to the delta an expert adds to it, e.g.
``model.decoder.layers.0.fc1.weight`` -> dW of shape (out_features, in_features). Keys are parameter names
(module path plus ``.weight`` / ``.bias``) rather than module paths because a full fine-tune also changes biases
and layer norms; a LoRA expert only ever produces ``<module>.weight`` entries. A value is either

- a dense tensor (a full fine-tune's ``fine-tuned - base``, or any merge that is not low-rank), or
- a :class:`LowRank` ``scale * B @ A`` (a LoRA expert, or an exact low-rank merge), kept factored so that exact
  fusion and SVD truncation stay cheap; ``.dense()`` materialises it.

A module an expert does not touch is simply absent (a zero delta). Stored as an expert, a task vector whose
entries are all low-rank becomes a ``lora`` expert (``<module>.lora_A`` / ``.lora_B``, loadable with
``lora_experts.model.attach_expert``); otherwise a ``task_vector`` expert whose tensors are the dense deltas,
named by the parameter they add to (:func:`expert_from_task_vector`, :func:`apply_task_vector`).

Which experts have a task vector, and how it is read from their tensors, is their kind's entry in
:mod:`lora_experts.kinds` (:func:`task_vector` asks it). The delta types, the LoRA delta and
:func:`apply_task_vector` live in :mod:`lora_experts.deltas` and are re-exported here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch

from lora_experts.deltas import (Delta, LowRank, TaskVector, apply_task_vector, dense, dense_task_vector,
                                 lora_scale, lora_task_vector)
from lora_experts.kinds import expert_kind
from registry.expert_file import Expert, new_manifest

__all__ = ["Delta", "LowRank", "TaskVector", "apply_task_vector", "dense", "dense_task_vector",
           "expert_from_task_vector", "lora_from_task_vector", "lora_scale", "lora_task_vector", "lora_tensors",
           "relative_error", "task_vector", "truncate", "weights_task_vector"]


# ------------------------------------------------------------------------------------ from experts and models
def task_vector(expert: Expert, *, as_dense: bool = False) -> TaskVector:
    """The task vector of a stored expert, as its kind's entry in :mod:`lora_experts.kinds` reads it (``lora``:
    ``scale * B @ A`` per module, :class:`LowRank` unless ``as_dense``; ``task_vector``: its tensors, in their
    stored dtype; ``sparse``: dense deltas, zeros off its mask).

    Raises:
        ValueError: the expert's kind has no task vector (``clsr``, ``mask``), saying why and what to do instead.
    """
    kind = expert_kind(expert.kind)
    if kind.task_vector is None:
        raise ValueError(f"a {expert.kind} expert (languages {', '.join(expert.languages)}) has no task vector: "
                         f"{kind.reason('task_vector')}")
    return kind.task_vector(expert, as_dense=as_dense)


def _parameters(source) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once (Whisper ties proj_out to embed_tokens); a state dict twice.
    if isinstance(source, torch.nn.Module):
        return dict(source.named_parameters())
    return dict(source)


def weights_task_vector(finetuned, base, *, skip_unchanged: bool = True) -> dict[str, torch.Tensor]:
    """The task vector of a full or partial fine-tune: ``fine-tuned - base`` per parameter (float32).

    Args:
        finetuned, base: ``nn.Module``s or state dicts with the same parameter names and shapes.
        skip_unchanged: leave out parameters the fine-tune did not change (frozen parts), so a partial
            fine-tune's task vector holds only what it trained.
    """
    tuned, ref = _parameters(finetuned), _parameters(base)
    if tuned.keys() != ref.keys():
        extra, missing = sorted(tuned.keys() - ref.keys()), sorted(ref.keys() - tuned.keys())
        raise ValueError(f"fine-tuned model and base differ in parameters (only in fine-tuned: {extra[:3]}, only "
                         f"in base: {missing[:3]}); pass both as modules or both as state dicts, of one Whisper "
                         "config")
    out = {}
    with torch.no_grad():
        for name, value in tuned.items():
            if value.shape != ref[name].shape:
                raise ValueError(f"parameter {name}: fine-tuned shape {tuple(value.shape)} but base shape "
                                 f"{tuple(ref[name].shape)}; not the same Whisper size")
            delta = value.detach().float() - ref[name].detach().to(value.device).float()
            if skip_unchanged and not torch.any(delta):
                continue
            out[name] = delta
    return out


# ------------------------------------------------------------------------------------ back to low rank
def truncate(delta: Delta, rank: int) -> tuple[LowRank, float, float]:
    """The best rank-``rank`` approximation of a 2-D delta (truncated SVD), with its error.

    A :class:`LowRank` input is decomposed through QR of its factors (an SVD of a (R, R) core), so truncating a
    concatenation of LoRA experts never materialises the (out, in) matrix.

    Returns:
        (``LowRank(A=Vh_r, B=U_r * S_r, scale=1)`` in the input's dtype, the relative Frobenius error
        ``||dW - L||_F / ||dW||_F`` (0 for a zero delta), ``||dW||_F``).
    """
    if rank < 1:
        raise ValueError(f"truncation rank must be >= 1, got {rank}")
    dtype = delta.dtype
    if isinstance(delta, LowRank) and delta.rank == 0:
        return delta, 0.0, 0.0
    if isinstance(delta, LowRank):
        # B A = Qb (Rb Ra^T) Qa^T: the singular values of B A are those of the small core Rb Ra^T.
        qb, rb = torch.linalg.qr(delta.B.float() * delta.scale)
        qa, ra = torch.linalg.qr(delta.A.float().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        u, vh = qb @ u, vh @ qa.T
    else:
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    total = float(s.square().sum().sqrt())
    kept = min(rank, s.numel())
    error = float(s[kept:].square().sum().sqrt()) / total if total > 0 else 0.0
    low = LowRank(vh[:kept].contiguous().to(dtype), (u[:, :kept] * s[:kept]).to(dtype), 1.0)
    return low, error, total


def lora_tensors(task_vector: Mapping[str, LowRank]) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA expert tensors and hyperparameters for an all-low-rank task vector (no arithmetic, factors as given).

    Each module keeps its own scale through peft's ``alpha_pattern`` (alpha_m = scale_m * rank_m), so
    ``attach_expert`` and PEFT export reproduce ``scale * B @ A`` exactly.

    Returns:
        (``<module>.lora_A`` / ``.lora_B`` tensors, ``{"rank", "alpha", "alpha_pattern"?, "dropout",
        "target_modules", "side"}``).
    """
    tensors, alphas, ranks = {}, {}, {}
    for name, delta in sorted(task_vector.items()):
        if not isinstance(delta, LowRank) or not name.endswith(".weight"):
            raise ValueError(f"task vector entry {name} is not a low-rank weight delta; store it as a task_vector")
        module = name[: -len(".weight")]
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = delta.A.contiguous(), delta.B.contiguous()
        ranks[module], alphas[module] = delta.rank, delta.scale * delta.rank
    if not tensors:
        raise ValueError("empty task vector: nothing to store as a LoRA expert")
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    hyper = {"rank": min(ranks.values()), "alpha": alpha, "dropout": 0.0, **_targets(ranks)}
    pattern = {m: a for m, a in alphas.items() if a != alpha}
    if pattern:
        hyper["alpha_pattern"] = pattern
    return tensors, hyper


def _targets(modules) -> dict:
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    encoder, decoder = any(".encoder." in f".{m}" for m in modules), any(".decoder." in f".{m}" for m in modules)
    return {"target_modules": leaves, "side": "both" if encoder and decoder else "encoder" if encoder else "decoder"}


def lora_from_task_vector(task_vector: Mapping[str, Delta], rank: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """A LoRA expert of rank ``rank`` that best approximates a task vector's 2-D weight deltas (truncated SVD).

    Args:
        task_vector: parameter name -> delta; only ``.weight`` matrices can be LoRA, anything else is refused.
        rank: LoRA rank (a module whose matrix is smaller keeps its full rank).

    Returns:
        (LoRA tensors, hyperparameters as :func:`lora_tensors`, parameter name -> relative Frobenius error).
    """
    low, errors = {}, {}
    for name, delta in task_vector.items():
        if delta.dim() != 2 or not name.endswith(".weight"):
            raise ValueError(f"task vector entry {name} (shape {tuple(delta.shape)}) is not a weight matrix; a "
                             "LoRA expert can only hold linear-layer weight deltas")
        low[name], errors[name], _ = truncate(delta, rank)
    tensors, hyper = lora_tensors(low)
    return tensors, hyper, errors


def relative_error(errors: Mapping[str, float], norms: Mapping[str, float]) -> float:
    """The whole task vector's relative Frobenius error from per-entry relative errors and norms."""
    total = math.sqrt(sum(n * n for n in norms.values()))
    missed = math.sqrt(sum((errors[k] * norms[k]) ** 2 for k in errors))
    return missed / total if total > 0 else 0.0


# ------------------------------------------------------------------------------------ storing
def expert_from_task_vector(task_vector: Mapping[str, Delta], *, languages, base, hyperparameters: dict | None = None,
                            **extra) -> Expert:
    """A storable expert: kind ``lora`` when every entry is exactly low-rank, else ``task_vector``.

    A ``task_vector`` expert's tensors are the dense deltas named by the parameter they add to
    (``model.decoder.layers.0.fc1.weight``), applied with :func:`apply_task_vector`.

    Args:
        languages: Whisper codes the expert serves.
        base: the base's manifest entry (dict with ``name``, ``fingerprint``, ``tokenizer_fingerprint``) or a
            ``registry.bases.Base``.
        hyperparameters: merged over the derived ones (LoRA rank/alpha/targets, or the side touched).
        extra: further manifest fields (``lineage``, ``data``, ``metrics``).
    """
    if not task_vector:
        raise ValueError("the task vector is empty (every weight was 0?): there is no expert to store")
    if all(isinstance(v, LowRank) and k.endswith(".weight") for k, v in task_vector.items()):
        tensors, hyper = lora_tensors(task_vector)
        kind = "lora"
    else:
        tensors = {k: dense(v).detach().contiguous() for k, v in sorted(task_vector.items())}
        hyper = {"side": _targets([k.rsplit(".", 1)[0] for k in tensors])["side"]}
        kind = "task_vector"
    hyper.update(hyperparameters or {})
    return Expert({k: v.detach().cpu() for k, v in tensors.items()},
                  new_manifest(kind, languages, base, hyper, **extra))
