"""DDP and FSDP with two CPU processes (gloo): ranks agree, masks hold, FSDP matches DDP and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def torchrun_workers(worker: str, out: Path) -> None:
    """Run tests/training/WORKER under `torchrun --nproc_per_node=2` (gloo, one thread each) into `out`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "tests" / "training" / worker), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_cpu_processes_agree_and_keep_masks(data_dir, tmp_path):
    torchrun_workers("ddp_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["pruned_nonzero"] == ranks[1]["pruned_nonzero"] == 0
    m = ranks[0]["metrics"]
    assert m["world_size"] == 2 and m["strategy"] == "ddp" and m["revived_weights"] == 0
    assert m["steps"] == 4 and m["tokens"] > 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_adapters_under_ddp_choose_the_same_rows_and_keep_masks(data_dir, tmp_path):
    torchrun_workers("adapters_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for peft in ("rows", "lora"):
        assert ranks[0][peft]["digest"] == ranks[1][peft]["digest"], peft  # the same rows, the same training
        assert ranks[0][peft]["pruned_nonzero"] == ranks[1][peft]["pruned_nonzero"] == 0
        m = ranks[0][peft]["metrics"]
        assert m["world_size"] == 2 and m["strategy"] == "ddp" and m["adapters"]["peft"] == peft
    assert ranks[0]["lora"]["metrics"]["adapters"]["revived_by_plain_merge"] > 0


def test_fsdp_matches_ddp_and_resumes_from_a_sharded_checkpoint(data_dir, tmp_path):
    """FSDP2 on 2 CPU processes: the same masked, gradually pruned run as DDP (grad accumulation on),
    killed after its step-2 checkpoint and resumed; its losses, weights and masks match DDP's."""
    from safetensors.torch import load_file

    torchrun_workers("fsdp_worker.py", tmp_path)
    ddp, fsdp = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("ddp", "fsdp"))
    assert fsdp["resumed_from"] == 2 and fsdp["world_size"] == 2 and fsdp["strategy"] == "fsdp"
    assert fsdp["revived_weights"] == ddp["revived_weights"] == 0
    assert fsdp["sparsity"] == ddp["sparsity"] == pytest.approx(0.6, abs=1e-3)  # GMP's final sparsity
    logs = {
        run: [json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("ddp", "fsdp")
    }
    assert len(logs["fsdp"]) == 4 and logs["fsdp"] == pytest.approx(logs["ddp"], abs=1e-5)
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("ddp", "fsdp"))
    assert sorted(a) == sorted(b)  # tied embeddings saved once, as DDP's save does
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name  # reduction order differs, nothing else
        if name.endswith("proj.weight"):
            assert torch.equal(a[name] == 0, b[name] == 0), name  # the same pruned weights


def test_adaptive_sparse_training_under_ddp_and_fsdp(data_dir, tmp_path):
    """AST on 2 CPU processes: DDP and FSDP agree on losses, masks (updated on gathered weights, Wanda
    norms summed over ranks), SLoRB branches and the final exact 2:4 weights."""
    from safetensors.torch import load_file

    torchrun_workers("ast_worker.py", tmp_path)
    runs = ("ddp", "fsdp")
    metrics = {run: json.loads((tmp_path / run / "metrics.json").read_text()) for run in runs}
    for m in metrics.values():
        assert m["revived_weights"] == 0 and m["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert m["slorb"]["layers"] == 21  # 3 blocks x 7 linears
    logs = {
        run: [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in runs
    }
    assert [r["loss"] for r in logs["fsdp"]] == pytest.approx([r["loss"] for r in logs["ddp"]], abs=1e-5)
    assert [r.get("mask_flip_rate") for r in logs["fsdp"]] == [r.get("mask_flip_rate") for r in logs["ddp"]]
    for file in ("model.safetensors", "slorb.safetensors"):
        a, b = (load_file(str(tmp_path / run / file)) for run in runs)
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-4), name
            if name.endswith("proj.weight"):
                assert torch.equal(a[name] == 0, b[name] == 0), name
                groups = (a[name] != 0).reshape(a[name].shape[0], -1, 4).sum(-1)
                assert (groups <= 2).all(), name


def test_adapters_under_fsdp_match_ddp_merge_on_rank_0_and_resume(data_dir, tmp_path):
    """Row deltas (merged, resumed from a sharded checkpoint; and unmerged) and LoRA under FSDP2 on 2 CPU
    processes: losses, merged weights and the row-adapter file match DDP's; the merge keeps the mask."""
    from safetensors.torch import load_file

    torchrun_workers("fsdp_adapters_worker.py", tmp_path)
    for run in ("rows", "rows-unmerged", "lora"):
        ddp, fsdp = (json.loads((tmp_path / f"{run}-{s}" / "metrics.json").read_text()) for s in ("ddp", "fsdp"))
        assert fsdp["strategy"] == "fsdp" and fsdp["world_size"] == 2, run
        assert fsdp["resumed_from"] == (2 if run == "rows" else None), run
        assert fsdp["revived_weights"] == ddp["revived_weights"] == 0, run
        assert fsdp["adapters"]["merged_sparsity"] == ddp["adapters"]["merged_sparsity"] == 0.5, run
        for key in ("trainable_parameters", "rows", "merge", "merged_layers", "revived_by_plain_merge"):
            assert fsdp["adapters"].get(key) == ddp["adapters"].get(key), (run, key)
        logs = {
            s: [json.loads(line)["loss"] for line in (tmp_path / f"{run}-{s}" / "train_log.jsonl").open()]
            for s in ("ddp", "fsdp")
        }
        assert len(logs["fsdp"]) == 4 and logs["fsdp"] == pytest.approx(logs["ddp"], abs=1e-5), run
        configs = [json.loads((tmp_path / f"{run}-{s}" / "config.json").read_text()) for s in ("ddp", "fsdp")]
        assert configs[0] == configs[1], run
        files = ["model.safetensors"] + (["row_adapters.safetensors"] if run == "rows-unmerged" else [])
        assert (tmp_path / f"{run}-fsdp" / "row_adapters.safetensors").is_file() == (run == "rows-unmerged")
        for file in files:
            a, b = (load_file(str(tmp_path / f"{run}-{s}" / file)) for s in ("ddp", "fsdp"))
            assert sorted(a) == sorted(b), (run, file)
            for name in a:
                assert torch.allclose(a[name].float(), b[name].float(), atol=1e-4), (run, name)
                if name.endswith("proj.weight"):
                    assert torch.equal(a[name] == 0, b[name] == 0), (run, name)
    for rank in (0, 1):
        assert "--strategy ddp" in (tmp_path / f"qlora-fsdp-{rank}.txt").read_text()
