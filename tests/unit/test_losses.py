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


def test_crsd_loss_combines_terms_with_weights():
    torch.manual_seed(0)
    ls, lt, h, r = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 8), torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, 1])
    t = losses.crsd_loss(ls, lt, h, r, y, align_weight=0.5, contrast_weight=2.0, temperature=0.1)
    assert t["loss"].item() == pytest.approx(
        (t["sce"] + t["tce"] + 0.5 * t["align"] + 2.0 * t["contrast"]).item())
    assert t["sce"].item() == pytest.approx(losses.ce_loss(ls, y).item())
