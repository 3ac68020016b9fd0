"""Adaptive sparse training (AST): exact N:M masks, straight-through gradients, resume, SLoRB export."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from sparsefit.errors import UsageError
from sparsefit.export import export_checkpoint
from sparsefit.models import load_model
from sparsefit.models.slorb import SLORB_FILE, slorb_modules
from sparsefit.pruning import OneShotConfig, oneshot
from sparsefit.pruning.structure import Structure
from sparsefit.training import FinetuneConfig, finetune
from sparsefit.training.adaptive import AdaptiveMasks, adaptive_keep_mask, cap_pruned_scores, setup_adaptive
from sparsefit.training.loop import LOG_FILE
from sparsefit.training.masks import decoder_linears
from tests.conftest import tiny_model
from tests.training.test_loop import BASE, _interrupt_after, losses

AST = dict(BASE, method="ast", lr=1e-2)


def rows_inputs(module, t):
    return t.t() if isinstance(module, Conv1D) else t


def assert_nm(module, t, n=2, m=4):
    w = rows_inputs(module, t)
    per_group = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
    assert (per_group <= n).all()


def log_records(path):
    return [json.loads(line) for line in (path / LOG_FILE).read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_every_mask_update_is_exact_nm(arch):
    model = tiny_model(arch)
    linears = decoder_linears(model)
    adaptive = AdaptiveMasks.initial(linears, Structure(2, 4), every=1, decay=0.0, increase_steps=0)
    for _ in range(3):
        for name, module, keep in adaptive.masks.items():
            k = rows_inputs(module, keep)
            assert (k.reshape(k.shape[0], -1, 4).sum(-1) == 2).all(), name
        with torch.no_grad():
            for module in linears.values():
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
        assert 0 < adaptive.update() < 1  # perturbed weights: some positions flip


def test_straight_through_gradient_is_the_gradient_of_the_masked_weights():
    model = tiny_model("llama")
    reference = tiny_model("llama")
    adaptive = AdaptiveMasks.initial(decoder_linears(model), Structure(2, 4), 1, 0.0, 0)
    dense = {name: module.weight.detach().clone() for name, module, _ in adaptive.masks.items()}
    with torch.no_grad():
        for name, _, keep in adaptive.masks.items():
            reference.get_submodule(name).weight.mul_(keep)  # a model whose weights are W * M
    ids = torch.randint(0, 200, (2, 16))
    adaptive.mask_weights()
    model(input_ids=ids, labels=ids).loss.backward()
    adaptive.restore_weights()
    reference(input_ids=ids, labels=ids).loss.backward()
    for name, module, keep in adaptive.masks.items():
        assert torch.equal(module.weight, dense[name])  # the dense shadow is back, bit for bit
        expected = reference.get_submodule(name).weight.grad
        assert torch.allclose(module.weight.grad, expected, atol=1e-6)
        assert module.weight.grad[~keep].abs().sum() > 0  # pruned weights get a gradient too


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_ast_run_ends_as_an_exact_nm_model(arch, tokenizer, data_dir, tmp_path):
    model = tiny_model(arch)
    cfg = FinetuneConfig(**AST, max_steps=6, ast={"mask_every": 2, "srste_decay": 1e-3, "increase_steps": 4})
    metrics = finetune(model, tokenizer, cfg, tmp_path / "ast", progress=False)
    assert metrics["method"] == "ast" and metrics["revived_weights"] == 0
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for module in decoder_linears(model).values():
        assert_nm(module, module.weight)
    records = log_records(tmp_path / "ast")
    assert [r["step"] for r in records if "mask_flip_rate" in r] == [2, 4]
    assert [r["srste_lambda"] for r in records] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    reloaded = load_model(tmp_path / "ast")
    for name, module in decoder_linears(reloaded).items():
        assert_nm(module, module.weight)
        assert torch.equal(module.weight, model.get_submodule(name).weight)


def test_masks_adapt_during_training(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    initial = AdaptiveMasks.initial(decoder_linears(model), Structure(2, 4), 1, 0.0, 0).masks.state_dict()
    cfg = FinetuneConfig(**dict(AST, lr=5e-2), max_steps=8, ast={"mask_every": 2, "srste_decay": 0.0})
    finetune(model, tokenizer, cfg, tmp_path / "a", progress=False)
    flips = [r["mask_flip_rate"] for r in log_records(tmp_path / "a") if "mask_flip_rate" in r]
    assert len(flips) == 3 and max(flips) > 0
    final = {n: m.weight != 0 for n, m in decoder_linears(model).items()}
    assert any(not torch.equal(final[n], initial[n]) for n in final)  # pruned weights won places back


def test_wanda_metric_uses_input_norms(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(**AST, max_steps=1, ast={"mask_metric": "wanda", "stats_batches": 2})
    magnitude, wanda = tiny_model("llama"), tiny_model("llama")
    finetune(
        magnitude,
        tokenizer,
        cfg.model_copy(update={"ast": cfg.ast.model_copy(update={"mask_metric": "magnitude"})}),
        tmp_path / "m",
        progress=False,
    )
    finetune(wanda, tokenizer, cfg, tmp_path / "w", progress=False)
    a = decoder_linears(magnitude)
    b = decoder_linears(wanda)
    assert any(not torch.equal(a[n].weight != 0, b[n].weight != 0) for n in a)


def test_resume_restores_masks_statistics_and_branches(tokenizer, data_dir, tmp_path):
    ast = {"mask_every": 2, "mask_metric": "wanda", "stats_batches": 2, "stats_every": 4, "slorb": True}
    cfg = FinetuneConfig(**AST, max_steps=7, checkpoint_every=3, ast=ast)
    full = tiny_model("llama")
    finetune(full, tokenizer, cfg, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(tiny_model("llama"), tokenizer, cfg, tmp_path / "resumed", steps=5)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-00000003"
    assert (checkpoint / "masks.safetensors").is_file() and (checkpoint / "extra.safetensors").is_file()
    resumed = tiny_model("llama")
    metrics = finetune(resumed, tokenizer, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert metrics["resumed_from"] == 3
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_slorb_export_and_reload(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(**AST, max_steps=3, ast={"slorb": True, "slorb_k": 8})
    model = tiny_model("llama")
    metrics = finetune(model, tokenizer, cfg, tmp_path / "s", progress=False)
    info = metrics["slorb"]
    linears = decoder_linears(model)
    assert info["layers"] == len(linears) and info["k"] == 8
    assert info["parameters"] == sum(m.weight.numel() // 8 for m in linears.values())
    assert (tmp_path / "s" / SLORB_FILE).is_file()
    assert json.loads((tmp_path / "s" / "sparsity.json").read_text())["slorb"]["parameters"] == info["parameters"]
    ids = torch.randint(0, 200, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits

    reloaded = load_model(tmp_path / "s")  # restores the branches
    assert len(slorb_modules(reloaded)) == len(linears)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # a plain load: the N:M model alone
    assert not slorb_modules(plain)
    for name, module in decoder_linears(plain).items():
        assert_nm(module, module.weight)
        assert torch.equal(module.weight, linears[name].weight)

    export_checkpoint(load_model(tmp_path / "s"), tokenizer, tmp_path / "drop", "s", slorb="drop")
    assert not (tmp_path / "drop" / SLORB_FILE).exists()
    assert not slorb_modules(load_model(tmp_path / "drop"))
    result = export_checkpoint(load_model(tmp_path / "s"), tokenizer, tmp_path / "merge", "s", slorb="merge")
    assert result["slorb"] == "merged" and result["sparsity"] < 0.1  # dense again
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "merge")(ids).logits, expected, atol=1e-4)
    kept = export_checkpoint(load_model(tmp_path / "s"), tokenizer, tmp_path / "keep", "s", fmt="sparse-24-bitmask")
    assert SLORB_FILE in kept["files"]
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "keep")(ids).logits, expected, atol=1e-5)


def pruned_24(tokenizer, arch):
    model = tiny_model(arch)
    oneshot(model, tokenizer, OneShotConfig(method="magnitude", structure="2:4", calib=None), progress=False)
    return model


def sparse_start(tokenizer, arch):
    """A 2:4 model, a teacher whose values outscore many of its kept weights (3x the dense ones), the
    one-shot weights, a batch and the one-shot model's logits on it."""
    model, teacher = pruned_24(tokenizer, arch), tiny_model(arch)
    with torch.no_grad():
        for module in decoder_linears(teacher).values():
            module.weight.mul_(3.0)
    pruned = {name: m.weight.detach().clone() for name, m in decoder_linears(model).items()}
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    return model, teacher, pruned, ids, expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_start_teacher_keeps_the_mask_and_takes_the_teachers_pruned_values(arch, tokenizer):
    model, teacher, pruned, ids, expected = sparse_start(tokenizer, arch)  # the teacher's values must be copied
    cfg = FinetuneConfig(method="ast", teacher="t", ast={"pruned_start": "teacher", "mask_metric": "magnitude"})
    adaptive = setup_adaptive(model, cfg, steps=10, stats_batches=[], teacher=teacher)
    theirs = decoder_linears(teacher)
    for name, module, keep in adaptive.masks.items():
        assert torch.equal(keep, pruned[name] != 0), name  # the one-shot mask is the starting mask
        assert torch.equal(module.weight[keep], pruned[name][keep])  # kept weights unchanged
        assert torch.equal(module.weight[~keep], theirs[name].weight[~keep])  # pruned ones: the teacher's
        assert (module.weight[~keep] != 0).all()
    adaptive.mask_weights()
    with torch.no_grad():  # the forward still sees the one-shot model
        assert torch.equal(model(ids).logits, expected)
    adaptive.restore_weights()
    assert adaptive.update() > 0  # the teacher's values compete for places at the first update


def test_pruned_start_teacher_trains_to_an_exact_nm_model(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(
        **AST, max_steps=4, teacher="given", ast={"pruned_start": "teacher", "mask_every": 2, "mask_metric": "wanda"}
    )
    model = pruned_24(tokenizer, "llama")
    metrics = finetune(model, tokenizer, cfg, tmp_path / "t", teacher=tiny_model("llama"), progress=False)
    assert metrics["revived_weights"] == 0 and metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for module in decoder_linears(model).values():
        assert_nm(module, module.weight)
    assert [r["step"] for r in log_records(tmp_path / "t") if "mask_flip_rate" in r] == [2]
    with pytest.raises(UsageError, match="prune it first"):  # a dense model has no mask to start from
        finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "d", teacher=tiny_model("llama"), progress=False)
    with pytest.raises(ValueError, match="pruned_start 'teacher'.*set teacher"):
        FinetuneConfig(method="ast", ast={"pruned_start": "teacher"})


@pytest.mark.parametrize("with_norms", [False, True])
def test_cap_pruned_scores_puts_every_pruned_score_under_its_groups_kept_ones(with_norms):
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    keep = adaptive_keep_mask(torch.randn(16, 32), Structure(2, 4))  # a mask that often prunes the larger weights
    sq_sum = torch.rand(32) * 4 if with_norms else None
    if with_norms:
        sq_sum[5] = 0.0  # an input that never fires: score 0, its weights left alone
    capped = cap_pruned_scores(weight, keep, 4, 0.8, sq_sum)
    assert torch.equal(capped[keep], weight[keep])
    moved = ~keep & (capped != 0)  # 0 where a kept weight of the group sits on the silent input
    assert torch.equal(capped.sign()[moved], weight.sign()[moved])
    assert (capped.abs() <= weight.abs()).all()
    assert not torch.equal(capped, weight)  # this mask prunes weights that outscore kept ones
    norms = torch.ones(32) if sq_sum is None else sq_sum.sqrt()
    scores = (capped.abs() * norms).view(16, 8, 4)
    floor = scores.masked_fill(~keep.view(16, 8, 4), float("inf")).amin(-1, keepdim=True)
    pruned = ~keep.view(16, 8, 4)
    assert (scores[pruned] <= (0.8 * floor.expand(16, 8, 4))[pruned] * (1 + 1e-6)).all()
    below = (weight.abs() * norms <= 0.8 * floor.expand(16, 8, 4).reshape(16, 32)) & ~keep
    assert torch.equal(capped[below], weight[below])  # already under the cap: unchanged
    if with_norms:
        assert torch.equal(capped[:, 5], weight[:, 5])
        groups = torch.ones(16, 8, dtype=torch.bool)
        groups[:, 1] = False  # the group holding the silent input may tie at 0
    else:
        groups = torch.ones(16, 8, dtype=torch.bool)
    again = adaptive_keep_mask(capped, Structure(2, 4), sq_sum).view(16, 8, 4)
    assert torch.equal(again[groups], keep.view(16, 8, 4)[groups])  # the mask recomputed is the same


@pytest.mark.parametrize("arch,metric", [("llama", "wanda"), ("gpt2", "magnitude")])
def test_pruned_start_capped_keeps_the_one_shot_model_until_training_moves_it(arch, metric, tokenizer):
    model, teacher, pruned, ids, expected = sparse_start(tokenizer, arch)
    cfg = FinetuneConfig(method="ast", teacher="t", ast={"pruned_start": "capped", "mask_metric": metric})
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    adaptive = setup_adaptive(model, cfg, steps=10, stats_batches=batches, teacher=teacher)
    theirs = decoder_linears(teacher)
    capped = 0
    for name, module, keep in adaptive.masks.items():
        assert torch.equal(keep, pruned[name] != 0), name
        assert torch.equal(module.weight[keep], pruned[name][keep])
        t = theirs[name].weight[~keep]
        assert torch.equal(module.weight[~keep].sign(), t.sign())
        assert (module.weight[~keep].abs() <= t.abs()).all()
        capped += int((module.weight[~keep] != t).sum())
    assert capped > 0  # some of the teacher's values outscored the kept weights
    adaptive.mask_weights()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    adaptive.restore_weights()
    assert adaptive.update() == 0  # unlike 'teacher': nothing flips before training moves the weights
    with pytest.raises(ValueError, match="pruned_start 'capped'.*set teacher"):
        FinetuneConfig(method="ast", ast={"pruned_start": "capped"})
    with pytest.raises(ValueError, match="pruned_cap"):
        FinetuneConfig(method="ast", teacher="t", ast={"pruned_start": "capped", "pruned_cap": 1.0})


def test_pruned_start_auto_is_capped_for_a_sparse_model_with_a_teacher(tokenizer):
    def start(model, teacher, pruned_start):
        cfg = FinetuneConfig(method="ast", teacher="t", ast={"pruned_start": pruned_start, "mask_metric": "magnitude"})
        setup_adaptive(model, cfg, steps=10, stats_batches=[], teacher=teacher)
        return {name: m.weight.detach().clone() for name, m in decoder_linears(model).items()}

    teacher = sparse_start(tokenizer, "llama")[1]
    auto = start(pruned_24(tokenizer, "llama"), teacher, "auto")
    capped = start(pruned_24(tokenizer, "llama"), teacher, "capped")
    assert all(torch.equal(auto[n], capped[n]) for n in auto)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            start(pruned_24(tokenizer, "llama"), None, "auto").values(),
            start(pruned_24(tokenizer, "llama"), None, "zero").values(),
        )
    )
    dense = tiny_model("llama")  # a dense start has no mask of its own: auto is zero, its weights unchanged
    before = {name: m.weight.detach().clone() for name, m in decoder_linears(dense).items()}
    assert all(torch.equal(w, before[n]) for n, w in start(dense, teacher, "auto").items())


def test_ast_distillation_mix_and_option_errors(tokenizer):
    cfg = FinetuneConfig(method="ast", teacher="t")
    assert (cfg.ce_weight, cfg.kl_weight, cfg.temperature) == (0.33, 0.67, 2.0)
    cfg = FinetuneConfig(method="ast", teacher="t", kl_weight=1.0, temperature=1.5)
    assert (cfg.ce_weight, cfg.kl_weight, cfg.temperature) == (1.0, 1.0, 1.5)
    assert FinetuneConfig(method="ast").kl_weight == 0  # no teacher: the task loss alone
    with pytest.raises(ValueError, match="method ast computes its own"):
        FinetuneConfig(method="ast", gmp={"final": 0.5})
    with pytest.raises(ValueError, match="N:M pattern"):
        FinetuneConfig(method="ast", ast={"structure": "unstructured"})
    with pytest.raises(ValueError, match="ast.slorb_k"):
        FinetuneConfig(method="ast", ast={"slorb_k": 0})


def test_slorb_groups_that_do_not_divide_a_layer_are_a_usage_error(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(**AST, max_steps=1, ast={"slorb": True, "slorb_k": 48})
    with pytest.raises(UsageError, match="slorb-k"):
        finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "x", progress=False)
