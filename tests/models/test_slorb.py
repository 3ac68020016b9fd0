"""SLoRB side branches: the mean init's exactness, merging, and the side file's round trip."""

import pytest
import torch
from torch import nn

from sparsefit.models.slorb import (
    SLoRB,
    attach_slorb,
    detach_slorb,
    group_sum_matrix,
    load_slorb,
    merge_slorb,
    save_slorb,
    slorb_init,
    slorb_modules,
    slorb_state,
)
from sparsefit.pruning.structure import nm_keep_mask
from tests.conftest import tiny_model


def test_mean_init_reproduces_the_pruned_part_for_inputs_constant_within_groups():
    torch.manual_seed(0)
    k = 4
    linear = nn.Linear(16, 6, bias=False)
    keep = nm_keep_mask(linear.weight.abs(), 2, 4)
    dense = linear.weight.detach().clone()
    s = slorb_init(dense, keep, k, "mean")
    with torch.no_grad():
        linear.weight.mul_(keep)
    attach_slorb({"l": linear}, k, {"l": s})
    x = torch.randn(3, 16 // k).repeat_interleave(k, dim=-1)  # constant within each group of k inputs
    expected = x @ dense.t()  # (W * M) x + the pruned part = the dense layer
    assert torch.allclose(linear(x), expected, atol=1e-6)
    y = torch.randn(3, 16)  # a general input: the branch adds exactly S (P y)
    assert torch.allclose(linear(y), y @ (dense * keep).t() + (y @ group_sum_matrix(16, k).t()) @ s.t(), atol=1e-6)


def test_zero_init_leaves_the_layer_unchanged():
    linear = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    before = linear(x)
    attach_slorb(
        {"l": linear}, 4, {"l": slorb_init(linear.weight, torch.ones_like(linear.weight, dtype=bool), 4, "zero")}
    )
    assert torch.equal(linear(x), before)


@pytest.mark.parametrize("trainable", [False, True])
def test_branch_size_and_projection(trainable):
    branch = SLoRB(32, 5, 8, trainable_projection=trainable)
    assert branch.weight.shape == (5, 4)
    assert (branch.projection is not None) == trainable
    x = torch.randn(2, 32)
    branch.weight.data.normal_()
    assert torch.allclose(branch(x), x @ branch.dense_delta().t(), atol=1e-5)


def test_groups_must_divide_the_inputs():
    with pytest.raises(ValueError, match="divisible by 16"):
        slorb_init(torch.zeros(2, 24), torch.ones(2, 24, dtype=torch.bool), 16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_the_branch_forward_and_removes_it(arch):
    model = tiny_model(arch)
    linears = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "c_fc", "down_proj", "c_proj"))}
    init = {}
    for name, m in linears.items():
        w = m.weight.detach()
        rows = w.t() if arch == "gpt2" else w
        init[name] = torch.randn(rows.shape[0], rows.shape[1] // 8)
    attach_slorb(linears, 8, init)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        with_branch = model(ids).logits
        assert merge_slorb(model) == len(linears)
        merged = model(ids).logits
    assert not slorb_modules(model) and not slorb_state(model)
    assert torch.allclose(with_branch, merged, atol=1e-4)


def test_side_file_round_trip(tmp_path):
    model = tiny_model("llama")
    linears = {n: m for n, m in model.named_modules() if n.endswith("up_proj")}
    attach_slorb(linears, 16, {n: torch.randn(m.weight.shape[0], m.weight.shape[1] // 16) for n, m in linears.items()})
    ids = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        expected = model(ids).logits
    save_slorb(slorb_state(model), tmp_path, 16)
    fresh = tiny_model("llama")
    assert load_slorb(fresh, tmp_path) == len(linears)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    assert detach_slorb(fresh) == len(linears)
    assert load_slorb(tiny_model("llama"), tmp_path / "nowhere") is None


def _slorb_file(tmp_path, **changes):
    """A SLoRB side file of the tiny Llama's up_proj layers (k 16), with `changes` to its tensors."""
    from safetensors.torch import save_file

    model = tiny_model("llama")
    linears = {n: m for n, m in model.named_modules() if n.endswith("up_proj")}
    attach_slorb(linears, 16)
    state = {k: v.contiguous() for k, v in slorb_state(model).items()}
    for key, value in changes.items():
        state[key] = value
    save_file(state, str(tmp_path / "slorb.safetensors"), metadata={"format": "sparsefit-slorb-1", "k": "16"})


UP = "model.layers.0.mlp.up_proj.slorb.weight"


@pytest.mark.parametrize(
    "key, value, message",
    [
        (UP, torch.zeros(128, 3), r"is float32 \(128, 3\); expected float \(128, 4\)"),
        (UP, torch.zeros(128, 4, dtype=torch.int64), r"is int64 .*expected float"),
        ("model.layers.1.mlp.up_proj.slorb.weight", torch.full((128, 4), float("nan")), r"holds 512 NaN or infinite"),
        ("model.layers.0.mlp.nope.slorb.weight", torch.zeros(2, 2), r"names modules the model lacks"),
        ("stray", torch.zeros(2), r"tensor stray is not a SLoRB tensor"),
    ],
)  # fmt: skip
def test_a_wrong_slorb_file_names_file_tensor_and_expected(tmp_path, key, value, message):
    _slorb_file(tmp_path, **{key: value})
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message) as info:
        load_slorb(model, tmp_path)
    assert "slorb.safetensors" in str(info.value) and not slorb_modules(model)  # nothing half attached


def test_a_garbage_slorb_file_is_refused_as_unreadable(tmp_path):
    (tmp_path / "slorb.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"slorb.safetensors is not a readable safetensors file"):
        load_slorb(tiny_model("llama"), tmp_path)
