"""KD losses, the gate budget loss and the total loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import (DistillationLoss, DistillationLossConfig, JensenShannonLoss, KLDivergenceLoss,
                            TopKTeacher, gate_budget_loss, topk_teacher)

LN2 = math.log(2)
# One position each; logits are log-probabilities, so softmax gives these distributions exactly.
TEACHER = [0.5, 0.25, 0.25]
STUDENT = [0.25, 0.5, 0.25]


def _logits(*rows):
    return torch.tensor([rows], dtype=torch.float64).log().float()  # (1, positions, vocab)


def _random(seed, shape=(2, 5, 11), scale=3.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_kl_and_js_equal_hand_computed_values():
    student, teacher, labels = _logits(STUDENT), _logits(TEACHER), torch.tensor([[7]])
    # KL(t || s) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln(1) = 0.25 ln 2
    assert KLDivergenceLoss()(student, teacher, labels).item() == pytest.approx(0.25 * LN2, rel=1e-6)
    # m = (0.375, 0.375, 0.25): JS = 0.5 [0.5 ln(4/3) + 0.25 ln(2/3)] + 0.5 [0.25 ln(2/3) + 0.5 ln(4/3)]
    js = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    assert JensenShannonLoss()(student, teacher, labels).item() == pytest.approx(js, rel=1e-6)


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    student, teacher, labels = _logits(STUDENT), _logits(TEACHER), torch.tensor([[1]])
    t = 2.0
    # p^(1/2) normalized: teacher (sqrt .5, .5, .5) / Z, student (.5, sqrt .5, .5) / Z, same Z
    z = math.sqrt(0.5) + 1.0
    q = [math.sqrt(0.5) / z, 0.5 / z, 0.5 / z]
    p = [0.5 / z, math.sqrt(0.5) / z, 0.5 / z]
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    assert KLDivergenceLoss(t)(student, teacher, labels).item() == pytest.approx(t * t * kl, rel=1e-5)
    m = [(a + b) / 2 for a, b in zip(q, p)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(q, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(p, m))
    assert JensenShannonLoss(t)(student, teacher, labels).item() == pytest.approx(t * t * js, rel=1e-5)


def test_js_is_symmetric_bounded_and_zero_for_equal_distributions():
    a, b, labels = _random(0), _random(1), torch.zeros(2, 5, dtype=torch.long)
    js = JensenShannonLoss()
    torch.testing.assert_close(js(a, b, labels), js(b, a, labels))
    assert 0 < js(a, b, labels).item() < LN2
    assert js(a, a, labels).abs().item() < 1e-6
    assert KLDivergenceLoss()(a, a, labels).abs().item() < 1e-6
    assert not torch.allclose(KLDivergenceLoss()(a, b, labels), KLDivergenceLoss()(b, a, labels))


@pytest.mark.parametrize("loss", [KLDivergenceLoss(), JensenShannonLoss(2.0)], ids=["kl", "js"])
def test_padding_is_masked(loss):
    student, teacher = _random(0), _random(1)
    labels = torch.tensor([[3, 4, -100, -100, -100], [5, 6, 7, -100, -100]])
    full = loss(student, teacher, labels)
    # the mean over the 5 unpadded positions only
    per = [loss(student[b:b + 1, i:i + 1], teacher[b:b + 1, i:i + 1], labels[b:b + 1, i:i + 1])
           for b, i in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]]
    torch.testing.assert_close(full, torch.stack(per).mean())
    garbage = student.clone()
    garbage[labels == -100] = 1e4 * torch.randn_like(garbage[labels == -100])
    torch.testing.assert_close(loss(garbage, teacher, labels), full)
    assert loss(student, teacher, torch.full_like(labels, -100)).item() == 0.0


def test_teacher_gets_no_gradient_student_does():
    student, teacher = _random(0).requires_grad_(), _random(1).requires_grad_()
    JensenShannonLoss()(student, teacher, torch.zeros(2, 5, dtype=torch.long)).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize("loss", [KLDivergenceLoss(), JensenShannonLoss(), KLDivergenceLoss(2.0),
                                  JensenShannonLoss(0.5)], ids=["kl", "js", "kl-t2", "js-t0.5"])
def test_topk_teacher_with_k_equal_vocab_is_the_full_teacher(loss):
    student, teacher, labels = _random(0), _random(1), torch.tensor([[1, 2, 3, 4, -100], [5, 6, -100, -100, -100]])
    torch.testing.assert_close(loss(student, topk_teacher(teacher, 11), labels), loss(student, teacher, labels))


def test_topk_teacher_is_the_renormalized_truncated_teacher():
    student, teacher, labels = _random(0, (1, 1, 6)), _random(1, (1, 1, 6)), torch.tensor([[0]])
    cached = topk_teacher(teacher, 3)
    assert isinstance(cached, TopKTeacher) and cached.indices.shape == (1, 1, 3)
    p = torch.softmax(student[0, 0].double(), -1)
    q = torch.zeros(6, dtype=torch.float64)
    top = torch.softmax(teacher[0, 0].double(), -1).topk(3)
    q[top.indices] = top.values / top.values.sum()
    nz = q > 0
    kl = (q[nz] * (q[nz] / p[nz]).log()).sum()
    m = (p + q) / 2
    js = 0.5 * (q[nz] * (q[nz] / m[nz]).log()).sum() + 0.5 * (p * (p / m).log()).sum()
    assert KLDivergenceLoss()(student, cached, labels).item() == pytest.approx(kl.item(), rel=1e-5)
    assert JensenShannonLoss()(student, cached, labels).item() == pytest.approx(js.item(), rel=1e-5)


def test_gate_budget_loss_equals_hand_computed_value():
    gates = [torch.tensor([[0.2, 0.4]]), torch.tensor([1.0]), torch.tensor([[0.0], [0.0], [0.8]])]
    # mean over the 6 values = 2.4 / 6 = 0.4; |0.4 - 0.5| = 0.1, |0.4 - 0.25| = 0.15
    assert gate_budget_loss(gates).item() == pytest.approx(0.1, rel=1e-6)
    assert gate_budget_loss(gates, budget=0.25).item() == pytest.approx(0.15, rel=1e-6)
    assert gate_budget_loss([]).item() == 0.0
    g = torch.tensor([0.9, 0.7], requires_grad=True)
    gate_budget_loss([g]).backward()  # mean 0.8 > 0.5: pushes every gate down by 1 / n
    torch.testing.assert_close(g.grad, torch.tensor([0.5, 0.5]))


def test_total_loss_follows_the_paper_weights():
    student, teacher = _logits(TEACHER, STUDENT), _logits(STUDENT, STUDENT)
    labels = torch.tensor([[0, -100]])
    gates = [torch.tensor([0.9, 0.9])]
    out = DistillationLoss()(student, teacher, labels, gates)
    # CE with label smoothing 0.1 on p = (.5, .25, .25), label 0: 0.9 ln 2 + 0.1 (ln 2 + ln 4 + ln 4) / 3
    ce = 0.9 * LN2 + 0.1 * 5 * LN2 / 3
    js = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    assert out.ce.item() == pytest.approx(ce, rel=1e-6)
    assert out.gate.item() == pytest.approx(0.4, rel=1e-6)
    assert out.kd.item() == pytest.approx(js, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.25 * (ce + 0.4) + 0.5 * js, rel=1e-5)
    kl = DistillationLoss(DistillationLossConfig(kd="kl", ce_weight=1.0, gate_weight=0.0, kd_weight=2.0))
    assert kl(student, teacher, labels).loss.item() == pytest.approx(ce + 2 * 0.25 * LN2, rel=1e-5)


def test_total_loss_without_teacher():
    student, labels = _logits(TEACHER), torch.tensor([[0]])
    with pytest.raises(ValueError, match="no teacher"):
        DistillationLoss()(student, None, labels)
    out = DistillationLoss(DistillationLossConfig.without_teacher())(student, None, labels, [torch.tensor([0.5])])
    assert out.kd.item() == 0.0 and out.gate.item() == 0.0
    assert out.loss.item() == pytest.approx(0.9 * LN2 + 0.1 * 5 * LN2 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="unknown KD loss"):
        DistillationLossConfig(kd="mse")
