"""SR-STE's decay: its sign, where it lands, and its linear ramp."""

import pytest
import torch

from sparsefit.training.srste import add_srste_decay_, srste_lambda


def test_decay_pulls_only_pruned_weights_towards_zero():
    weight = torch.tensor([[0.5, -0.3, 0.2, -0.8]])
    keep = torch.tensor([[True, False, False, True]])
    grad = torch.zeros_like(weight)
    add_srste_decay_(grad, weight, keep, 0.1)
    assert torch.equal(grad[keep], torch.zeros(2))  # kept weights receive no decay
    assert torch.allclose(grad[~keep], 0.1 * weight[~keep])  # same sign as the weight: a step moves it to 0
    stepped = weight - 1.0 * grad
    assert (stepped[~keep].abs() < weight[~keep].abs()).all()


def test_lambda_rises_linearly_then_stays_flat():
    assert srste_lambda(0, 2e-4, 100) == 0.0
    assert srste_lambda(25, 2e-4, 100) == pytest.approx(5e-5)
    assert srste_lambda(100, 2e-4, 100) == pytest.approx(2e-4)
    assert srste_lambda(1000, 2e-4, 100) == pytest.approx(2e-4)
    assert srste_lambda(0, 2e-4, 0) == pytest.approx(2e-4)  # no ramp: the peak from the start


def test_scratch_buffer_gives_the_same_result():
    weight, keep, grad = torch.randn(4, 8), torch.rand(4, 8) > 0.5, torch.randn(4, 8)
    expected = add_srste_decay_(grad.clone(), weight, keep, 0.3)
    assert torch.equal(add_srste_decay_(grad.clone(), weight, keep, 0.3, torch.empty(4, 8)), expected)
    assert torch.equal(expected[keep], grad[keep])  # bit for bit


def test_zero_lambda_leaves_the_gradient_alone():
    grad = torch.randn(3, 8)
    before = grad.clone()
    add_srste_decay_(grad, torch.randn(3, 8), torch.rand(3, 8) > 0.5, 0.0)
    assert torch.equal(grad, before)
