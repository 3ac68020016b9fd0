"""Row deltas: zero init changes nothing, only chosen rows change, the merge equals the unmerged
forward and revives no pruned weight, and unmerged adapters round-trip through their file."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.models.layout import weight_as_out_in
from sparsefit.training.adapters.rows import (
    ROWS_FILE,
    RowDelta,
    attach_row_deltas,
    detach_row_deltas,
    load_row_deltas,
    merge_row_deltas,
    row_delta_modules,
    row_delta_state,
    save_row_deltas,
)
from sparsefit.training.masks import decoder_linears
from tests.conftest import tiny_model


def sparse_linears(model):
    linears = decoder_linears(model)
    keep = {}
    with torch.no_grad():
        for name, m in linears.items():
            w = weight_as_out_in(m)
            mask = w.abs() > w.abs().median()
            w.mul_(mask)
            keep[name] = mask
    return linears, keep


def some_rows(linears, count=3):
    return {name: torch.arange(0, 2 * count, 2) for name in linears}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_zero_init_leaves_outputs_unchanged(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    linears = decoder_linears(model)
    added = attach_row_deltas(linears, some_rows(linears))
    assert added == sum(3 * weight_as_out_in(m).shape[1] for m in linears.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_merge_equals_unmerged_and_revives_nothing(arch):
    model = tiny_model(arch)
    linears, keep = sparse_linears(model)
    rows = some_rows(linears)
    attach_row_deltas(linears, rows, keep)
    torch.manual_seed(1)
    for m in row_delta_modules(model).values():
        m.row_delta.delta.data.normal_(0, 0.1)  # as if trained
    base = {name: weight_as_out_in(m).clone() for name, m in linears.items()}
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        unmerged = model(ids).logits
    assert merge_row_deltas(model) == len(linears) and not row_delta_modules(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)
    for name, m in linears.items():
        w = weight_as_out_in(m)
        assert not (w[~keep[name]] != 0).any()  # 0 revived weights
        changed = (w != base[name]).any(dim=1)
        assert changed[rows[name]].all() and not changed[~torch.isin(torch.arange(len(changed)), rows[name])].any()


def test_delta_masked_in_forward_and_gradient_reaches_only_kept_entries():
    layer = nn.Linear(6, 4, bias=False)
    keep = torch.rand(4, 6) > 0.5
    attach_row_deltas({"l": layer}, {"l": torch.tensor([1, 3])}, {"l": keep})
    x = torch.randn(5, 6)
    layer(x).sum().backward()
    grad = layer.row_delta.delta.grad
    assert not grad[~keep[[1, 3]]].any() and grad[keep[[1, 3]]].abs().min() > 0


def test_conv1d_rows_are_output_features():
    conv = Conv1D(5, 7)  # GPT-2: weight (in 7, out 5)
    attach_row_deltas({"c": conv}, {"c": torch.tensor([0, 4])})
    conv.row_delta.delta.data.fill_(1.0)
    x = torch.randn(3, 7)
    out = conv(x)
    plain = x @ conv.weight + conv.bias
    assert torch.allclose(out[:, [0, 4]], plain[:, [0, 4]] + x.sum(-1, keepdim=True), atol=1e-5)
    assert torch.equal(out[:, 1:4], plain[:, 1:4])
    merge_row_deltas(conv)
    assert torch.allclose(conv(x), out, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("llama")
    linears, keep = sparse_linears(model)
    attach_row_deltas(linears, some_rows(linears), keep, dropout=0.1)
    for m in row_delta_modules(model).values():
        m.row_delta.delta.data.normal_()
    model.eval()
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    save_row_deltas(row_delta_state(model), tmp_path)
    assert (tmp_path / ROWS_FILE).is_file()
    detach_row_deltas(model)
    assert load_row_deltas(model, tmp_path) == len(linears)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert load_row_deltas(tiny_model("llama"), tmp_path / "none") is None


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        RowDelta(torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="keep"):
        RowDelta(torch.tensor([0, 1]), 4, keep=torch.ones(3, 4, dtype=torch.bool))
    layer = nn.Linear(4, 4)
    attach_row_deltas({"l": layer}, {"l": torch.tensor([0])})
    with pytest.raises(ValueError, match="already"):
        attach_row_deltas({"l": layer}, {"l": torch.tensor([0])})
