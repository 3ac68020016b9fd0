"""LoRA through peft: injected in place, zero at start; a plain merge refills pruned weights (counted),
a masked merge keeps the mask exactly; both leave plain linears behind."""

import pytest
import torch

from sparsefit.models.layout import weight_as_out_in
from sparsefit.training.adapters.lora import attach_lora, lora_modules, merge_lora
from sparsefit.training.masks import SparsityMasks, decoder_linears
from tests.conftest import tiny_model
from tests.models.test_row_deltas import sparse_linears


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("masked", [False, True])
def test_lora_merge_plain_and_masked(arch, masked):
    model = tiny_model(arch)
    sparse_linears(model)
    masks = SparsityMasks.from_zeros(model)
    linears = decoder_linears(model)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    added = attach_lora(linears, model, rank=2, alpha=4.0, dropout=0.0)
    assert added == sum(2 * sum(weight_as_out_in(m).shape) for m in linears.values())
    assert len(lora_modules(model)) == len(linears)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # B = 0 at start
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)  # as if trained
    with torch.no_grad():
        unmerged = model(ids).logits
    keep = {masks.modules[n]: masks.masks[n] for n in masks.masks}
    info = merge_lora(model, keep, masked=masked)
    assert not lora_modules(model) and decoder_linears(model).keys() == linears.keys()
    assert info["layers"] == len(linears) and info["revived_by_plain_merge"] > 0
    revived = sum(int(((m.weight != 0) & ~masks.masks[n]).sum()) for n, m in decoder_linears(model).items())
    with torch.no_grad():
        merged = model(ids).logits
    if masked:
        assert revived == 0 and not torch.allclose(merged, unmerged, atol=1e-4)
    else:
        assert revived == info["revived_by_plain_merge"] and torch.allclose(merged, unmerged, atol=1e-4)
