"""Adapters in the fine-tuning loop: the base stays frozen, merges keep the mask, 4-bit bases, resume,
unmerged row adapters saved beside the model, and the command line."""

import json

import pytest
import torch
from pydantic import ValidationError

from sparsefit.cli import main
from sparsefit.models import load_model
from sparsefit.models.layout import weight_as_out_in
from sparsefit.models.row_deltas import ROWS_FILE, row_delta_modules
from sparsefit.training import FinetuneConfig, finetune
from sparsefit.training.masks import SparsityMasks, decoder_linears
from tests.training.test_loop import BASE, _interrupt_after, losses, sparse_tiny

PEFT = dict(BASE, lr=2e-2)


def base_weights(model):
    return {n: weight_as_out_in(m).clone() for n, m in decoder_linears(model).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("criterion", ["l2", "taylor"])
def test_rows_train_only_chosen_rows_and_merge_without_reviving(arch, criterion, tokenizer, data_dir, tmp_path):
    model = sparse_tiny(tokenizer, arch=arch)
    masks = SparsityMasks.from_zeros(model)
    before = base_weights(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n.replace(".weight", "") not in before}
    cfg = FinetuneConfig(
        **PEFT, max_steps=3, peft="rows", adapter={"rank": 2, "criterion": criterion, "importance_batches": 2}
    )
    metrics = finetune(model, tokenizer, cfg, tmp_path / "rows", progress=False)
    info = metrics["adapters"]
    assert info["peft"] == "rows" and info["merge"] == "masked" and info["criterion"] == criterion
    assert set(info["rows_per_layer"].values()) == {2} and metrics["revived_weights"] == 0
    assert info["trainable_parameters"] == sum(2 * w.shape[1] for w in before.values())
    assert info["merged_sparsity"] == pytest.approx(masks.sparsity(), abs=1e-4)
    changed_rows = 0
    for name, module in decoder_linears(model).items():
        w = weight_as_out_in(module)
        assert not (w[~_out_in(module, masks.masks[name])] != 0).any()  # 0 revived
        changed = (w != before[name]).any(dim=1)
        assert changed.sum() <= 2
        changed_rows += int(changed.sum())
    assert changed_rows > 0
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n  # the rest of the base is frozen
    assert not row_delta_modules(model) and not (tmp_path / "rows" / ROWS_FILE).exists()


def _out_in(module, mask):
    return mask.t() if type(module).__name__ == "Conv1D" else mask


def test_unmerged_rows_are_saved_apart_and_restored(tokenizer, data_dir, tmp_path):
    model = sparse_tiny(tokenizer)
    before = base_weights(model)
    cfg = FinetuneConfig(**PEFT, max_steps=3, peft="rows", adapter={"rank": 3, "merge": "none", "dropout": 0.1})
    metrics = finetune(model, tokenizer, cfg, tmp_path / "r", progress=False)
    assert metrics["adapters"]["row_adapters"]["parameters"] == metrics["adapters"]["trainable_parameters"]
    assert (tmp_path / "r" / ROWS_FILE).is_file()
    meta = json.loads((tmp_path / "r" / "sparsity.json").read_text())
    assert meta["row_adapters"]["layers"] == len(before)
    ids = torch.randint(0, 200, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    reloaded = load_model(tmp_path / "r")
    assert len(row_delta_modules(reloaded)) == len(before)
    for name, module in decoder_linears(reloaded).items():
        assert torch.equal(weight_as_out_in(module), before[name])  # the base as it was
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-6)


@pytest.mark.parametrize("merge", ["masked", "plain"])
def test_lora_reports_what_a_plain_merge_revives(merge, tokenizer, data_dir, tmp_path):
    model = sparse_tiny(tokenizer)
    sparsity = SparsityMasks.from_zeros(model).sparsity()
    cfg = FinetuneConfig(**PEFT, max_steps=3, peft="lora", adapter={"rank": 2, "merge": merge})
    metrics = finetune(model, tokenizer, cfg, tmp_path / "l", progress=False)
    info = metrics["adapters"]
    assert info["peft"] == "lora" and info["revived_by_plain_merge"] > 0 and metrics["revived_weights"] == 0
    if merge == "masked":
        assert info["merged_sparsity"] == pytest.approx(sparsity, abs=1e-4)
    else:
        assert info["merged_sparsity"] < sparsity - 0.1
    reloaded = load_model(tmp_path / "l")  # a plain HF checkpoint: LoRA is merged
    assert set(decoder_linears(reloaded)) == set(decoder_linears(model))


@pytest.mark.parametrize("peft", ["rows", "lora"])
def test_four_bit_base(peft, tokenizer, data_dir, tmp_path):
    from sparsefit.quantization.scheme import Grid, quantize_rtn

    model = sparse_tiny(tokenizer)
    sparsity = SparsityMasks.from_zeros(model).sparsity()
    quantized = {n: quantize_rtn(w, Grid("int", 4, 16))[0] for n, w in base_weights(model).items()}
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = FinetuneConfig(**PEFT, max_steps=2, peft=peft, adapter={"rank": 2, "base_bits": 4, "base_group_size": 16})
    metrics = finetune(model, tokenizer, cfg, tmp_path / "q", progress=False)
    info = metrics["adapters"]
    linear_bytes = sum(w.numel() * 4 for w in quantized.values())
    # 4 bits per weight plus a float32 scale per 16 weights, instead of 32 bits
    assert info["base_bits"] == 4 and info["base_bytes"] == pytest.approx(
        dense_bytes - linear_bytes + linear_bytes * (0.5 + 4 / 16) / 4, rel=0.05
    )
    assert info["dequantized_layers"] == len(quantized)
    assert info["merged_sparsity"] == pytest.approx(sparsity, abs=1e-4)
    for name, module in decoder_linears(model).items():
        changed = (weight_as_out_in(module) != quantized[name]).any(dim=1)
        if peft == "rows":  # the base is the 4-bit one; only the chosen rows differ from it
            assert cfg.adapter.residual_init and 0 < changed.sum() <= 2
        else:
            assert changed.any()  # LoRA's update is spread over every row
    load_model(tmp_path / "q")


def test_resume_with_adapters_reproduces_the_run(tokenizer, data_dir, tmp_path):
    cfg = FinetuneConfig(
        **PEFT, max_steps=6, checkpoint_every=3, peft="rows", adapter={"rank": 2, "criterion": "zo-taylor",
                                                                        "zo_directions": 3},
    )  # fmt: skip
    full = sparse_tiny(tokenizer)
    finetune(full, tokenizer, cfg, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(sparse_tiny(tokenizer), tokenizer, cfg, tmp_path / "resumed", steps=5)
    resumed = sparse_tiny(tokenizer)
    metrics = finetune(resumed, tokenizer, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert metrics["resumed_from"] == 3
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_option_errors():
    with pytest.raises(ValidationError, match="frozen base"):
        FinetuneConfig(peft="rows", method="ast")
    with pytest.raises(ValidationError, match="merged at the end"):
        FinetuneConfig(peft="lora", adapter={"merge": "none"})
    with pytest.raises(ValidationError, match="base_bits 4"):
        FinetuneConfig(peft="rows", adapter={"row_init": "residual"})


def test_cli_flags(tiny_checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["finetune", "--model", str(tiny_checkpoint), "--rank", "2", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--rank" in err and "--peft rows" in err and err.count("\n") == 1
    code = main(
        ["finetune", "--model", str(tiny_checkpoint), "--peft", "rows", "--rank", "2", "--criterion", "taylor",
         "--importance-batches", "1", "--max-steps", "2", "--seq-len", "64", "--format", "plain", "--bf16", "false",
         "--output", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapters"]["criterion"] == "taylor" and metrics["config"]["adapter"]["rank"] == 2
    code = main(["finetune", "--model", str(tiny_checkpoint), "--peft", "rows", "--row-init", "residual",
                 "--output", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--row-init: 'residual' starts from the quantization residual: set --base-bits 4" in err
    code = main(
        ["finetune", "--model", str(tiny_checkpoint), "--peft", "lora", "--base-bits", "4", "--base-group-size", "16",
         "--max-steps", "1", "--seq-len", "64", "--format", "plain", "--bf16", "false", "--output", str(tmp_path / "q")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "q" / "metrics.json").read_text())["adapters"]["base_bits"] == 4


def test_a_blocked_final_save_leaves_a_checkpoint_that_resumes(tokenizer, data_dir, tmp_path, monkeypatch):
    """Files appearing in the output during training block the final save; the unmerged adapters are
    checkpointed, and --resume (after the files move out) writes the same model as an unblocked run."""
    from sparsefit.errors import UsageError

    cfg = FinetuneConfig(**PEFT, max_steps=3, peft="rows", adapter={"rank": 2, "criterion": "taylor"})
    plain = sparse_tiny(tokenizer)
    finetune(plain, tokenizer, cfg, tmp_path / "plain", progress=False)
    out = tmp_path / "blocked"
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        out.joinpath("stray.txt").write_text("not sparsefit's")
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(UsageError, match="now holds files"):
        finetune(sparse_tiny(tokenizer), tokenizer, cfg, out, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    (out / "stray.txt").unlink()
    resumed = sparse_tiny(tokenizer)
    metrics = finetune(resumed, tokenizer, cfg, out, resume=True, progress=False)
    assert metrics["resumed_from"] == 3 and metrics["adapters"]["restored"]
    for (name, p), q in zip(plain.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_unmerged_rows_must_be_merged_before_pruning_quantizing_or_training(tokenizer, data_dir, tmp_path, capsys):
    from sparsefit.errors import UsageError
    from sparsefit.pruning import OneShotConfig, oneshot
    from sparsefit.quantization import QuantizeConfig, quantize

    cfg = FinetuneConfig(**PEFT, max_steps=2, peft="rows", adapter={"rank": 2, "merge": "none"})
    finetune(sparse_tiny(tokenizer), tokenizer, cfg, tmp_path / "r", progress=False)
    model = load_model(tmp_path / "r")
    with pytest.raises(UsageError, match="export --row-adapters merge"):
        oneshot(model, tokenizer, OneShotConfig(method="magnitude", calib=None), progress=False)
    with pytest.raises(UsageError, match="export --row-adapters merge"):
        quantize(model, tokenizer, QuantizeConfig(method="rtn", calib=None))
    with pytest.raises(UsageError, match="export --row-adapters merge"):
        finetune(model, tokenizer, FinetuneConfig(**PEFT, max_steps=1), tmp_path / "again", progress=False)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    assert (
        main(["export", "--model", str(tmp_path / "r"), "--row-adapters", "merge", "--output", str(tmp_path / "m")])
        == 0
    )
    merged = load_model(tmp_path / "m")
    assert not row_delta_modules(merged) and not (tmp_path / "m" / ROWS_FILE).exists()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    masks = SparsityMasks.from_zeros(load_model(tmp_path / "r"))
    assert SparsityMasks.from_zeros(merged).sparsity() == pytest.approx(masks.sparsity(), abs=1e-4)


def test_options_of_the_other_adapter_kind_are_errors():
    with pytest.raises(ValidationError, match="need peft"):
        FinetuneConfig(adapter={"rank": 4})
    with pytest.raises(ValidationError, match="criterion does not apply to peft 'lora'"):
        FinetuneConfig(peft="lora", adapter={"criterion": "l2"})
    with pytest.raises(ValidationError, match="lora_alpha does not apply to peft 'rows'"):
        FinetuneConfig(peft="rows", adapter={"lora_alpha": 8})
