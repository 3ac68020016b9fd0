import math

import pytest
import torch

from sparsefit.training.distill import causal_lm_ce, kl_logits, square_head


def test_kl_matches_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    T = 2.0
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            p = torch.softmax(t[b, i] / T, -1)
            q = torch.softmax(s[b, i] / T, -1)
            expected += float((p * (p.log() - q.log())).sum())
            n += 1
    assert kl_logits(s, t, mask, T).item() == pytest.approx(expected / n * T**2, rel=1e-5)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    x = torch.randn(2, 4, 7)
    assert kl_logits(x, x.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_logits(x, x + torch.randn_like(x)).item() > 0


def test_kl_gradient_matches_autograd_of_the_formula():
    # 70 rows span three chunks of the fused pass; the reference is plain autograd on log-softmaxes
    torch.manual_seed(2)
    s = torch.randn(2, 35, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 35, 11, dtype=torch.float64) * 2
    mask = torch.rand(2, 35) > 0.2
    T = 1.7
    log_s, log_t = torch.log_softmax(s[mask] / T, -1), torch.log_softmax(t[mask] / T, -1)
    reference = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * T**2
    (expected,) = torch.autograd.grad(reference * 3.0, s)
    value = kl_logits(s, t, mask, T)
    (got,) = torch.autograd.grad(value * 3.0, s)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    assert got.dtype == s.dtype and torch.allclose(got, expected, atol=1e-7)
    assert torch.all(got[~mask] == 0)


def test_square_head_matches_hand_computation():
    torch.manual_seed(1)
    s = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    t = [torch.randn(2, 3, 4) * 3, torch.randn(2, 3, 4) * 0.1]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    per_layer = []
    for a, b in zip(s, t):
        a, b = a[mask], b[mask]
        per_layer.append(float(((a - b) ** 2).mean() / (b**2).mean()))
    assert square_head(s, t, mask).item() == pytest.approx(sum(per_layer) / 2, rel=1e-5)
    assert square_head(t, t).item() == 0.0


def test_square_head_gradient_matches_autograd_of_the_formula():
    torch.manual_seed(3)
    s = [torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 5, 4, dtype=torch.float64) * k for k in (0.5, 1.0, 4.0)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    w = mask.double().unsqueeze(-1)
    reference = torch.stack([((a - b).pow(2) * w).sum() / (b.pow(2) * w).sum() for a, b in zip(s, t)]).mean()
    expected = torch.autograd.grad(reference * 2.0, s)
    value = square_head(s, t, mask)
    got = torch.autograd.grad(value * 2.0, s)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64 and torch.allclose(g, e, atol=1e-7)
        assert torch.all(g[~mask] == 0)


def test_square_head_is_scale_free():
    s, t = [torch.randn(1, 2, 3)], [torch.randn(1, 2, 3)]
    assert square_head([x * 10 for x in s], [x * 10 for x in t]).item() == pytest.approx(square_head(s, t).item())


def test_ce_counts_only_labelled_tokens():
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, -100, 3, 5]])
    expected = -(torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 2], -1)[5]) / 2
    assert causal_lm_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert causal_lm_ce(logits, torch.full((1, 4), -100)).item() == 0.0
    assert math.isfinite(causal_lm_ce(logits, labels).item())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        kl_logits(torch.randn(1, 2, 3), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="same non-empty"):
        square_head([torch.randn(1, 2, 3)], [])
