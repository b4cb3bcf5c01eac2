"""Each loss on a hand-computed case."""

import math

import pytest
import torch

from kubedistill.ml import losses


def test_ce_loss():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert losses.ce_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))


def test_align_loss_and_stop_gradient():
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    r = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    loss = losses.align_loss(h, r)  # cosine distances 1 and 0
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert h.grad is not None and r.grad is None
    r2 = r.detach().clone().requires_grad_(True)
    losses.align_loss(h, r2, stop_gradient=False).backward()
    assert r2.grad is not None and r2.grad.abs().sum() > 0


def test_batch_contrastive_loss_on_3x3():
    h = torch.eye(3)
    r = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])  # pair 2's reasoning view points elsewhere
    # similarity rows: [1,0,1] (target 0), [0,1,0] (target 1), [0,0,0] (target 2), temperature 1
    e = math.e
    expected = (math.log((2 * e + 1) / e) + math.log((e + 2) / e) + math.log(3)) / 3
    assert losses.batch_contrastive_loss(h, r, temperature=1.0).item() == pytest.approx(expected)
    # temperature 0.5 doubles the logits
    e2 = math.e**2
    expected_half = (math.log((2 * e2 + 1) / e2) + math.log((e2 + 2) / e2) + math.log(3)) / 3
    assert losses.batch_contrastive_loss(h, r, temperature=0.5).item() == pytest.approx(expected_half)
    # scale does not matter (cosine), and a perfectly separated batch at low temperature is near 0
    assert losses.batch_contrastive_loss(5 * h, 3 * torch.eye(3), 0.01).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        losses.batch_contrastive_loss(h, r, 0.0)


def test_kd_loss():
    zero = torch.zeros(1, 2)
    assert losses.kd_loss(zero, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.kd_loss(zero, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2))
    assert losses.kd_loss(zero, torch.tensor([[1.0, 0.0]]), temperature=2.0).item() == pytest.approx(4 * math.log(2))


def test_crsd_loss_on_a_hand_computed_case():
    # standard view: CE log 3 (uniform), log 4 (p=1/4), log 2 (p=1/2); reasoning view uniform: log 3 each
    ls = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [0.0, 0.0, math.log(2)]])
    lt = torch.zeros(3, 3)
    y = torch.tensor([0, 1, 2])
    h = torch.eye(3)
    r = torch.tensor([[2.0, 0, 0], [0, 0, 1.0], [0, 0, 3.0]])  # cosines with h: 1, 0, 1
    # InfoNCE at temperature 1 over cos(h_i, r_j): rows [1,0,0], [0,0,0], [0,1,1]; targets 0, 1, 2
    e = math.e
    contrast = (math.log((e + 2) / e) + math.log(3) + math.log((2 * e + 1) / e)) / 3
    align = (0 + 1 + 0) / 3
    t = losses.crsd_loss(ls, lt, h, r, y, align_weight=0.5, contrast_weight=2.0, temperature=1.0)
    assert t["sce"].item() == pytest.approx((math.log(3) + math.log(4) + math.log(2)) / 3)
    assert t["tce"].item() == pytest.approx(math.log(3))
    assert t["align"].item() == pytest.approx(align)
    assert t["contrast"].item() == pytest.approx(contrast)
    total = (math.log(3) + math.log(4) + math.log(2)) / 3 + math.log(3) + 0.5 * align + 2.0 * contrast
    assert t["loss"].item() == pytest.approx(total)
    # class weights (3, 1, 1) weigh both CE terms, and only them
    w = torch.tensor([3.0, 1.0, 1.0])
    tw = losses.crsd_loss(ls, lt, h, r, y, align_weight=0.5, contrast_weight=2.0, temperature=1.0, weight=w)
    sce_w = (3 * math.log(3) + math.log(4) + math.log(2)) / 5
    assert tw["sce"].item() == pytest.approx(sce_w)
    assert tw["tce"].item() == pytest.approx(math.log(3))  # a weighted mean of equal values
    assert tw["loss"].item() == pytest.approx(sce_w + math.log(3) + 0.5 * align + 2.0 * contrast)


def test_crsd_stop_gradient_keeps_the_reasoning_view_out_of_the_alignment_terms():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    r = torch.tensor([[1.0, 1.0], [1.0, -1.0]], requires_grad=True)
    zero = torch.zeros(2, 2)
    t = losses.crsd_loss(zero, zero, h, r, torch.tensor([0, 1]), 1.0, 1.0, 0.5, stop_gradient=True)
    t["loss"].backward()
    assert r.grad is None and h.grad is not None and h.grad.abs().sum() > 0
    r2 = r.detach().clone().requires_grad_(True)
    losses.crsd_loss(zero, zero, h, r2, torch.tensor([0, 1]), 1.0, 1.0, 0.5, stop_gradient=False)["loss"].backward()
    assert r2.grad is not None and r2.grad.abs().sum() > 0


def test_weighted_ce_on_three_examples():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [0.0, 0.0]])
    y = torch.tensor([0, 1, 1])  # CE: log 4, log 4/3, log 2
    plain = (math.log(4) + math.log(4 / 3) + math.log(2)) / 3
    assert losses.ce_loss(logits, y).item() == pytest.approx(plain)
    weighted = (3 * math.log(4) + math.log(4 / 3) + math.log(2)) / (3 + 1 + 1)
    assert losses.ce_loss(logits, y, torch.tensor([3.0, 1.0])).item() == pytest.approx(weighted)
    # equal weights change nothing
    assert losses.ce_loss(logits, y, torch.tensor([2.0, 2.0])).item() == pytest.approx(plain)


def test_weighted_kd_on_three_examples():
    student = torch.zeros(3, 2)  # uniform: KL(teacher || uniform) = log 2 - H(teacher)
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])  # KL: log 2, 0, log 2
    y = torch.tensor([0, 1, 1])
    assert losses.kd_loss(student, teacher).item() == pytest.approx(2 / 3 * math.log(2))
    w = torch.tensor([3.0, 1.0])
    assert losses.kd_loss(student, teacher, 1.0, y, w).item() == pytest.approx((3 + 0 + 1) / 5 * math.log(2))
    assert losses.kd_loss(student, teacher, 2.0, y, w).item() == pytest.approx(4 * (3 + 0 + 1) / 5 * math.log(2))
    with pytest.raises(ValueError, match="labels"):
        losses.kd_loss(student, teacher, 1.0, None, w)
