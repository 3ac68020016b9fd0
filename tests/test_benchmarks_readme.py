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


def _report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPU = {"model": "x", "cores": 2, "avx512": True, "native_bf16": True, "amx": False}


def test_results_are_aged_and_untraceable_ones_marked_for_a_rerun():
    report = _report()
    head = report.resolve("HEAD")
    parent = head  # a commit of this history; HEAD itself is 0 behind
    assert report.age({"environment": {"commit": parent, "cpu": CPU}}, head) == {"problem": None, "behind": 0}
    dirty = report.age({"environment": {"commit": parent + "+dirty", "cpu": CPU}}, head)
    assert "uncommitted changes" in dirty["problem"]
    assert report.age({}, head)["problem"].startswith("records no environment")
    assert report.age({"environment": {"commit": parent}}, head)["problem"] == "records no CPU"
    assert "not an ancestor" in report.age({"environment": {"commit": "0" * 40, "cpu": CPU}}, head)["problem"]
    results = {"a": {"environment": {"commit": parent + "+dirty", "cpu": CPU}}, "b": {}}
    ages = {k: report.age(r, head) for k, r in results.items()}
    assert [stem for stem, _ in report.to_rerun(results, ages)] == ["a", "b"]
    assert report.age_line(dirty, head, gpu=False).startswith("**Untraceable")


def test_every_result_has_a_rerun_command():
    report = _report()
    assert set(report.RENDER) <= set(report.RERUN)
