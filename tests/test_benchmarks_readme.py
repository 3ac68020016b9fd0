"""benchmarks/README.md is what benchmarks/report.py makes of benchmarks/results/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_readme_is_generated_from_the_results():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
