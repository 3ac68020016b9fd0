"""The writers' shared guard: NaN / inf, and values a narrower dtype cannot hold, are refused by name."""

import pytest
import torch

from sparsefit.models.finite import NonFiniteError, bad_values, beyond, refuse_non_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bad_values_counts_nan_and_inf(dtype):
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype)
    assert bad_values(t) == 3
    assert bad_values(t.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)) == 0


def test_bad_values_reads_float8_bytes_and_skips_integers():
    t = torch.tensor([1.0, 448.0, -2.0], dtype=torch.float32).to(torch.float8_e4m3fn)
    assert bad_values(t) == 0
    raw = t.view(torch.uint8).clone()
    raw[1] = 0xFF  # e4m3fn's NaN
    assert bad_values(raw.view(torch.float8_e4m3fn)) == 1
    assert bad_values(torch.tensor([0, 255], dtype=torch.uint8)) == 0


def test_beyond_counts_what_would_round_to_inf():
    t = torch.tensor([65504.0, 65519.0, 65520.0, -1e6, float("inf")])
    assert beyond(t, torch.float16) == 2  # 65519 still rounds to 65504; inf is already counted as non-finite
    assert beyond(t, torch.bfloat16) == 0 and beyond(t, torch.float32) == 0


def test_refuse_names_the_tensor_and_writes_nothing():
    good, bad = torch.ones(3), torch.tensor([1.0, float("nan")])
    refuse_non_finite({"a": good, "b": torch.arange(3)}, "cannot write x")
    match = r"cannot write x: tensor b holds 1 NaN or infinite value; .*fix it"
    with pytest.raises(NonFiniteError, match=match) as info:
        refuse_non_finite([("a", good), ("b", bad)], "cannot write x", "fix it")
    assert info.value.exit_code == 1
    with pytest.raises(NonFiniteError, match=r"tensor s holds 1 value \(up to 1e\+06\) beyond what float16") as info:
        refuse_non_finite({"s": torch.tensor([1.0, 1e6])}, "cannot export", cast_to=torch.float16)
    assert info.value.exit_code == 2
