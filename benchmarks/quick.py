"""The main job, `sparsefit run quick`, end to end: wall time and each stage's metrics.

One fresh `sparsefit run quick` process into a new run directory (the builtin model already
cached), timed from start to exit; the run's report gives the self-text, WikiText-2 and GSM8K
answer perplexities after each evaluation stage, and how much of the one-shot loss the recovery
won back on self-text perplexity: (one-shot - recovered) / (one-shot - dense). Run it alone:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/quick.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from environment import environment
from sparsefit.atomic import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to sparsefit run")
    parser.add_argument("--out", default="benchmarks/results/quick.json")
    parser.add_argument("--keep", default=None, metavar="DIR", help="run into DIR (a new folder) and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep) if args.keep else Path(tmp) / "q"
        command = [sys.executable, "-m", "sparsefit.cli", "run", "quick", "--output", str(run_dir)]
        command += [x for pair in args.set for x in ("--set", pair)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"sparsefit run quick failed:\n{proc.stderr[-3000:]}")
        report = json.loads((run_dir / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    keep = ("seconds", "sparsity", "self_ppl", "ppl", "answer_ppl", "tokens_per_second")
    dense, pruned, recovered = (stages[n]["self_ppl"] for n in ("dense", "oneshot-eval", "recovered"))
    result = {
        "benchmark": "quick",
        "environment": environment(),
        "overrides": args.set,
        "wall_seconds": wall,
        "stages": {name: {k: s.get(k) for k in keep} for name, s in stages.items()},
        "self_ppl": {"dense": dense, "oneshot": pruned, "recovered": recovered},
        "recovered_fraction_of_loss": (pruned - recovered) / (pruned - dense),
    }
    write_json(args.out, result)
    print(
        f"quick: {wall / 60:.1f} min; self-text ppl dense {dense:.2f}, one-shot {pruned:.2f}, recovered "
        f"{recovered:.2f} ({100 * result['recovered_fraction_of_loss']:.0f}% of the loss won back)"
    )


if __name__ == "__main__":
    main()
