"""The long run of the readers' fuzz test (tests/test_fuzz_readers.py): SCALE times the cases of the
CI slice, on fresh random draws, counted from hypothesis' own statistics. Every case must load
correctly or end in one clean error; a failure is an unexpected exception, an error of the wrong
kind, or a case whose peak memory grew past the test's bound.

    python benchmarks/fuzz.py [--scale 10]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from environment import ROOT, environment
from sparsefit.atomic import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=10, help="times the CI slice's cases (default 10)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz.json"))
    args = p.parse_args()
    env = environment()
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
            "tests/test_fuzz_readers.py"]  # fmt: skip
    start = time.perf_counter()
    child_env = {**os.environ, "SPARSEFIT_FUZZ_SCALE": str(args.scale), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=child_env)
    seconds = time.perf_counter() - start
    out = done.stdout + done.stderr
    found = re.findall(r"(\d+) passing, (\d+) failing, and (\d+) invalid test cases", out)
    counts = {k: sum(int(f[i]) for f in found) for i, k in enumerate(("passing", "failing", "invalid"))}
    summary = re.findall(r"=+ (.*(?:passed|failed).*) =+", out)
    result = {"benchmark": "fuzz", "environment": env, "scale": args.scale, "seconds": seconds,
              "pytest_exit_code": done.returncode, "pytest_summary": summary[-1] if summary else None,
              "cases": counts}  # fmt: skip
    write_json(args.out, result)
    print(result["pytest_summary"], counts, f"{seconds:.0f} s")
    if done.returncode:
        print(out[-4000:])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
