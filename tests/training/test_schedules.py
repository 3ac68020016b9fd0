import pytest

from sparsefit.training.schedules import gmp_plan, gmp_sparsity, lr_factor


def test_gmp_cubic_schedule_hits_planned_steps():
    plan = gmp_plan(0.0, 0.8, start=10, end=50, every=10)
    assert list(plan) == [10, 20, 30, 40, 50]
    for step, s in plan.items():
        t = (step - 10) / 40
        assert s == pytest.approx(0.8 + (0.0 - 0.8) * (1 - t) ** 3)
    assert plan[10] == 0.0 and plan[50] == pytest.approx(0.8)
    assert gmp_sparsity(15, 0.0, 0.8, 10, 50, 10) is None
    assert gmp_sparsity(5, 0.0, 0.8, 10, 50, 10) is None


def test_gmp_always_updates_on_the_last_step():
    assert list(gmp_plan(0.2, 0.5, 0, 25, 10)) == [0, 10, 20, 25]


def test_lr_factor_warmup_then_decay():
    assert [lr_factor(s, 10, 2) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, 10, 2) == pytest.approx(1 - 7 / 8)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(7, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_factor(1, 10, 0, "step")
