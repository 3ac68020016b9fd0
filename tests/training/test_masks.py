import pytest
import torch

from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.training.masks import SparsityMasks
from tests.conftest import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_from_zeros_cover_every_block_linear(arch, tokenizer):
    model = tiny_model(arch)
    oneshot(model, tokenizer, OneShotConfig(method="magnitude", sparsity=0.5, calib=None), progress=False)
    masks = SparsityMasks.from_zeros(model)
    assert masks.masks and abs(masks.sparsity() - 0.5) < 0.01
    assert all(m.shape == masks.modules[n].weight.shape for n, m in masks.masks.items())
    assert not any("embed" in n or "lm_head" in n for n in masks.masks)


def test_masks_hold_through_adamw_with_weight_decay(tokenizer):
    model = tiny_model("llama")
    oneshot(model, tokenizer, OneShotConfig(method="magnitude", sparsity=0.6, calib=None), progress=False)
    masks = SparsityMasks.from_zeros(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 200, (2, 16))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        masks.apply_to_grads()
        opt.step()
        opt.zero_grad()
        masks.apply_to_weights()
    assert masks.revived() == 0
    # without enforcement, the same optimizer revives pruned weights: the check can fail
    ids2 = torch.randint(0, 200, (2, 16))
    model(input_ids=ids2, labels=ids2).loss.backward()
    opt.step()
    assert masks.revived() > 0


def test_optimizer_state_is_zeroed_at_pruned_positions():
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(3, 4)).sum().backward()
    opt.step()
    keep = torch.rand(4, 4) > 0.5
    masks = SparsityMasks({"l": lin}, {"l": keep})
    masks.apply_to_optimizer(opt)
    assert (opt.state[lin.weight]["exp_avg"][~keep] == 0).all()
    assert (opt.state[lin.weight]["exp_avg_sq"][~keep] == 0).all()
