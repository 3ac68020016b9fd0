"""DDP with two CPU processes (gloo): both ranks end with identical weights and intact masks."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_two_cpu_processes_agree_and_keep_masks(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        str(ROOT / "tests" / "training" / "ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["pruned_nonzero"] == ranks[1]["pruned_nonzero"] == 0
    m = ranks[0]["metrics"]
    assert m["world_size"] == 2 and m["revived_weights"] == 0
    assert m["steps"] == 4 and m["tokens"] > 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
