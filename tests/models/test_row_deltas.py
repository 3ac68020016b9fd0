"""Row deltas: zero init changes nothing, only chosen rows change, the merge equals the unmerged
forward and revives no pruned weight, and unmerged adapters round-trip through their file."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsefit.models.layout import weight_as_out_in
from sparsefit.models.row_deltas import (
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


def _rows_file(tmp_path, **changes):
    from safetensors.torch import save_file

    state = {
        "model.layers.0.mlp.down_proj.row_delta.rows": torch.tensor([1, 5, 9]),
        "model.layers.0.mlp.down_proj.row_delta.delta": torch.zeros(3, 128),
    }
    state.update(changes)
    save_file(state, str(tmp_path / ROWS_FILE), metadata={"format": "sparsefit-rows-1"})


P = "model.layers.0.mlp.down_proj.row_delta"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({f"{P}.rows": torch.tensor([1, 64, 9])}, r"rows holds rows outside 0..63 or repeats one"),
        ({f"{P}.rows": torch.tensor([1, -1, 9])}, r"rows holds rows outside 0..63"),
        ({f"{P}.rows": torch.tensor([1, 1, 9])}, r"repeats one"),
        ({f"{P}.rows": torch.tensor([1.0, 5.0, 9.0])}, r"rows is float32 \(3,\); expected int64 \(R,\), R from 1 to"),
        ({f"{P}.rows": torch.zeros(3, 1, dtype=torch.int64)}, r"rows is int64 \(3, 1\); expected int64 \(R,\)"),
        ({f"{P}.delta": torch.zeros(3, 127)}, r"delta is float32 \(3, 127\); expected float \(3, 128\)"),
        ({f"{P}.delta": torch.zeros(3, 128, dtype=torch.int8)}, r"delta is int8 .*expected float"),
        ({f"{P}.keep": torch.ones(2, 128, dtype=torch.bool)}, r"keep is bool \(2, 128\); expected bool \(3, 128\)"),
        ({f"{P}.delta": torch.full((3, 128), float("inf"))}, r"delta holds 384 NaN or infinite values"),
    ],
)  # fmt: skip
def test_a_wrong_row_adapter_file_names_file_tensor_and_expected(tmp_path, changes, message):
    _rows_file(tmp_path, **changes)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message) as info:
        load_row_deltas(model, tmp_path)
    assert ROWS_FILE in str(info.value) and not row_delta_modules(model)


def test_a_row_adapter_file_of_garbage_is_refused_through_load_model(tmp_path, tokenizer):
    from sparsefit.errors import UsageError
    from sparsefit.models import load_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / ROWS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match=r"cannot restore the row adapters .*is not a readable safetensors file"):
        load_model(tmp_path)
