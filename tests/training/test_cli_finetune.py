"""`sparsefit finetune` end to end on a tiny checkpoint: distillation output, GMP, iterative cycles, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

run = run_cli


def test_prune_then_distill_from_the_dense_checkpoint(tiny_checkpoint, data_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert run(["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--calib", "none",
                "--output", str(pruned)], capsys)[0] == 0  # fmt: skip
    out = tmp_path / "ft"
    code, stdout, err = run(
        ["finetune", "--model", str(pruned), "--teacher", str(tiny_checkpoint), "--kl-weight", "1",
         "--square-head-weight", "1", "--max-steps", "3", "--batch-size", "2", "--seq-len", "64",
         "--format", "plain", "--output", str(out), "--json", str(tmp_path / "m.json")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "revived weights 0" in stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["masks"] and metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    weights = load_file(str(out / "model.safetensors"))
    assert sum(int((w == 0).sum()) for k, w in weights.items() if "layers" in k and k.endswith("proj.weight")) > 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    info = json.loads((out / "sparsity.json").read_text())
    assert info["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01) and "finetune" in info
    # the output is a plain checkpoint that `eval` reads
    assert run(["eval", "--model", str(out), "--seq-len", "64", "--max-windows", "1"], capsys)[0] == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kl-weight", "1"], "options: --kl-weight / --square-head-weight need a teacher: set --teacher"),
        (["--max-steps", "2", "--num-epochs", "1"], "only one of --max-steps, --num-epochs, --max-tokens"),
        (["--method", "ast", "--pruned-start", "teacher"], "--pruned-start 'teacher' (method ast) takes"),
        (["--lr", "-1"], "lr"),
        (["--gmp", "0,0.5,10"], "--gmp takes"),
        (["--teacher", "./nowhere", "--kl-weight", "1"], "does not exist"),
        (["--dataset", "missing.jsonl"], "not found"),
        (["--strategy", "zero3"], "strategy"),
        (["--slorb", "--mask-every", "5"], "--mask-every, --slorb set options of adaptive sparse training"),
        (["--method", "ast", "--structure", "0.5"], "--structure: structure '0.5' is malformed"),
        (["--method", "ast", "--gmp", "0,0.5,0,3,1"], "method ast computes its own"),
        (["--method", "ast", "--cycles", "0.3,0.5"], "--method ast trains its own N:M masks"),
    ],
)
def test_finetune_usage_errors_are_one_line(extra, message, tiny_checkpoint, data_dir, tmp_path, capsys):
    code, _, err = run(["finetune", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_gmp_and_iterative_cycles_from_the_cli(tiny_checkpoint, data_dir, tmp_path, capsys):
    base = ["finetune", "--model", str(tiny_checkpoint), "--batch-size", "2", "--seq-len", "64", "--format", "plain"]
    code, stdout, err = run(
        [*base, "--max-steps", "4", "--gmp", "0,0.4,0,3,1", "--output", str(tmp_path / "g")], capsys
    )
    assert code == 0 and "sparsity 0.4" in stdout, err
    code, stdout, err = run(
        [*base, "--max-steps", "2", "--cycles", "0.2,0.4", "--cycle-method", "wanda", "--calib", "gsm8k",
         "--output", str(tmp_path / "c"), "--json", str(tmp_path / "c.json")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    cycles = json.loads((tmp_path / "c.json").read_text())["cycles"]
    assert [c["sparsity"] for c in cycles] == [0.2, 0.4]
    assert [round(c["finetune"]["sparsity"], 2) for c in cycles] == [0.2, 0.4]
    assert all(c["finetune"]["revived_weights"] == 0 for c in cycles)


def test_cycles_under_fsdp_is_a_usage_error(tiny_checkpoint, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; the check comes before any process group
    code, _, err = run(
        ["finetune", "--model", str(tiny_checkpoint), "--cycles", "0.2,0.4", "--strategy", "fsdp",
         "--output", str(tmp_path / "o")],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--strategy ddp" in err and err.count("\n") == 1, err


def test_adaptive_sparse_training_then_export_from_the_cli(tiny_checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "ast"
    code, stdout, err = run(
        ["finetune", "--model", str(tiny_checkpoint), "--teacher", str(tiny_checkpoint), "--method", "ast",
         "--mask-every", "2", "--slorb", "--slorb-k", "8", "--max-steps", "4", "--batch-size", "2",
         "--seq-len", "64", "--format", "plain", "--output", str(out), "--json", str(tmp_path / "m.json")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "sparsity 0.5000, revived weights 0" in stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["config"]["kl_weight"] == 0.67 and metrics["config"]["temperature"] == 2.0
    assert metrics["slorb"]["k"] == 8 and (out / "slorb.safetensors").is_file()
    code, _, err = run(["eval", "--model", str(out), "--seq-len", "64", "--max-windows", "1"], capsys)
    assert code == 0 and "restored SLoRB branches" in err
    code, _, err = run(["prune", "--model", str(out), "--method", "magnitude", "--structure", "2:4",
                        "--calib", "none", "--output", str(tmp_path / "p")], capsys)  # fmt: skip
    assert code == 0 and (tmp_path / "p" / "slorb.safetensors").is_file(), err
    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert all(torch.equal(weights[k] == 0, w == 0) for k, w in load_file(str(out / "model.safetensors")).items())
    code, _, err = run(["export", "--model", str(out), "--slorb", "drop", "--output", str(tmp_path / "e")], capsys)
    assert code == 0 and "left out" in err and not (tmp_path / "e" / "slorb.safetensors").exists()
    code, _, err = run(["quantize", "--model", str(out), "--scheme", "w8a16", "--method", "rtn",
                        "--output", str(tmp_path / "q")], capsys)  # fmt: skip
    assert code == 2 and "SLoRB branches" in err
