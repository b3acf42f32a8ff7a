"""Distillation losses: KL and Jensen-Shannon between student and teacher, the gate budget, and the total loss.

KD losses are ``nn.Module``s called as ``loss(student_logits, teacher, labels)``:

* ``student_logits``: (batch, positions, vocab), teacher-forced on ``labels``.
* ``teacher``: the teacher's logits at the same positions, (batch, positions, vocab), or a :class:`TopKTeacher`
  (the teacher's top-k log-probabilities and token ids per position, as a teacher cache stores them).
* ``labels``: (batch, positions) target ids, ``-100`` at padding; padded positions are left out.

Both divergences are computed between temperature-softened distributions, multiplied by ``T**2`` (so gradients
keep their size across temperatures) and averaged over the unpadded positions. The teacher gets no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
LOG2 = math.log(2.0)


class TopKTeacher(NamedTuple):
    """A teacher distribution truncated to its k most likely tokens per position.

    Attributes:
        logprobs: (batch, positions, k) the teacher's log-probabilities (temperature 1) of those tokens.
        indices: (batch, positions, k) their token ids.

    The KD losses treat it as the teacher's distribution renormalized over those k tokens (zero elsewhere);
    with k = vocab it is the full teacher exactly, at any temperature.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor


def topk_teacher(teacher_logits: torch.Tensor, k: int) -> TopKTeacher:
    """The top-k of a teacher's logits (batch, positions, vocab) as log-probabilities at temperature 1."""
    logprobs, indices = F.log_softmax(teacher_logits.detach().float(), dim=-1).topk(k, dim=-1)
    return TopKTeacher(logprobs, indices)


def _masked_mean(per_position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_position`` (batch, positions) over positions whose label is not padding (0 if none is)."""
    if labels.shape != per_position.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, "
                         f"the logits cover {tuple(per_position.shape)} positions")
    keep = labels != IGNORE_INDEX
    return torch.where(keep, per_position, 0.0).sum() / keep.sum().clamp_min(1)


def _teacher_and_student(student_logits: torch.Tensor, teacher, temperature: float):
    """``(q, log_q, log_p)`` on the teacher's support: the teacher's probabilities and log-probabilities, and the
    student's log-probabilities of the same tokens (normalized over the whole vocabulary)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopKTeacher):
        log_q = F.log_softmax(teacher.logprobs.detach().float() / temperature, dim=-1)
        log_p = log_p.gather(-1, teacher.indices)
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits have shape {tuple(teacher.shape)}, student logits "
                             f"{tuple(student_logits.shape)}; the teacher must share the tokenizer and positions")
        log_q = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return log_q.exp(), log_q, log_p


class KDLoss(nn.Module):
    """Base of the KD losses: softening, padding mask, ``T**2`` scaling; subclasses give the divergence.

    Args:
        temperature: softmax temperature T applied to both student and teacher logits.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def per_position(self, student_logits: torch.Tensor, teacher) -> torch.Tensor:
        """The divergence at each position, (batch, positions), before scaling and masking."""
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss; see the module docstring for the arguments."""
        return self.temperature ** 2 * _masked_mean(self.per_position(student_logits, teacher), labels)


class KLDivergenceLoss(KDLoss):
    """Forward KL ``KL(teacher || student) = sum_v q_v (log q_v - log p_v)`` per position."""

    def per_position(self, student_logits, teacher):
        q, _, log_p = _teacher_and_student(student_logits, teacher, self.temperature)
        return (torch.xlogy(q, q) - q * log_p).sum(-1)


class JensenShannonLoss(KDLoss):
    """Jensen-Shannon divergence ``0.5 KL(q || m) + 0.5 KL(p || m)``, ``m = (q + p) / 2`` (DistilWhisper's default).

    Symmetric in student and teacher, bounded by ``log 2``. With a :class:`TopKTeacher` the student's mass
    outside the teacher's k tokens (where ``m = p / 2``) contributes ``0.5 * p_rest * log 2``.
    """

    def per_position(self, student_logits, teacher):
        q, log_q, log_p = _teacher_and_student(student_logits, teacher, self.temperature)
        p = log_p.exp()
        log_m = torch.logaddexp(log_q, log_p) - LOG2
        teacher_side = (torch.xlogy(q, q) - q * log_m).sum(-1)
        student_side = (torch.xlogy(p, p) - p * log_m).sum(-1)
        if isinstance(teacher, TopKTeacher):
            student_side = student_side + (1.0 - p.sum(-1)).clamp_min(0.0) * LOG2
        return 0.5 * (teacher_side + student_side)


KD_LOSSES: dict[str, type[KDLoss]] = {"kl": KLDivergenceLoss, "js": JensenShannonLoss}


def gate_budget_loss(gates: Iterable[torch.Tensor], budget: float = 0.5) -> torch.Tensor:
    """``|mean(g) - b|`` over all gate values of all layers and tokens.

    Args:
        gates: gate tensors of any shapes (e.g. ``GateRecorder.values`` from ``distill.clsr.collect_gates``); each
            value counts once.
        budget: the target fraction ``b`` of tokens on the language paths.

    Returns:
        A scalar; 0 when there are no gate values (every layer call ran the shared path only).
    """
    values = [g.reshape(-1) for g in getattr(gates, "values", gates)]
    if not values:
        return torch.zeros(())
    return (torch.cat(values).float().mean() - budget).abs()


@dataclass(frozen=True)
class DistillationLossConfig:
    """Weights of DistilWhisper's total loss ``ce_weight * CE + gate_weight * L_gate + kd_weight * KD``.

    The defaults are DistilWhisper's JS runs: its code weighs ``0.5 / sigma_i**2`` with ``sigma = (1.41, 1.0)``,
    i.e. about ``0.25 * (CE + L_gate) + 0.5 * KD``.
    """

    ce_weight: float = 0.25  # cross-entropy on the labels, with label smoothing
    gate_weight: float = 0.25  # gate budget loss |mean(g) - b|
    kd_weight: float = 0.5  # KD loss against the teacher
    label_smoothing: float = 0.1
    gate_budget: float = 0.5  # b
    kd: str = "js"  # "js" (Jensen-Shannon) or "kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kd not in KD_LOSSES:
            raise ValueError(f"unknown KD loss {self.kd!r}; choose from {', '.join(KD_LOSSES)}")

    @classmethod
    def without_teacher(cls, **changes) -> DistillationLossConfig:
        """CE + gate budget with weight 1 each and no KD (CLSR training without a teacher)."""
        return cls(**{"ce_weight": 1.0, "gate_weight": 1.0, "kd_weight": 0.0, **changes})


class DistillationLossOutput(NamedTuple):
    loss: torch.Tensor  # the weighted total, to backpropagate
    ce: torch.Tensor
    gate: torch.Tensor
    kd: torch.Tensor


class DistillationLoss(nn.Module):
    """The total training loss of a distilled CLSR (or any) student; returns the parts for logging."""

    def __init__(self, config: DistillationLossConfig = DistillationLossConfig()) -> None:
        super().__init__()
        self.config = config
        self.kd_loss = KD_LOSSES[config.kd](config.temperature)

    def forward(self, student_logits: torch.Tensor, teacher, labels: torch.Tensor,
                gates: Iterable[torch.Tensor] | None = None) -> DistillationLossOutput:
        """
        Args:
            student_logits: (batch, positions, vocab).
            teacher: teacher logits, a :class:`TopKTeacher`, or None when ``kd_weight`` is 0.
            labels: (batch, positions), ``-100`` at padding.
            gates: the student's gate values (``GateRecorder`` or tensors); None or empty for a student without
                gates.
        """
        cfg = self.config
        ce = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing)
        gate = gate_budget_loss(gates if gates is not None else [], cfg.gate_budget).to(ce.device)
        if teacher is None:
            if cfg.kd_weight:
                raise ValueError("the KD weight is not 0 but no teacher was given; pass the teacher's logits "
                                 "(or a TopKTeacher), or use DistillationLossConfig.without_teacher()")
            kd = torch.zeros((), device=ce.device)
        else:
            kd = self.kd_loss(student_logits, teacher, labels)
        total = cfg.ce_weight * ce + cfg.gate_weight * gate + cfg.kd_weight * kd
        return DistillationLossOutput(total, ce, gate, kd)
