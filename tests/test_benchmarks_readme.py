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


def test_strict_refuses_untraceable_and_stale_cpu_results_but_not_a_stale_gpu_one():
    report = _report()
    cpu, gpu = {"cpu": CPU, "device": "cpu"}, {"cpu": CPU, "device": "NVIDIA H200"}
    # real stems, so that each has its re-run command
    results = {"quick": {"environment": cpu}, "runtime": {"environment": cpu}, "oneshot": {"environment": cpu},
               "sparse24_gpu": {"environment": gpu}}  # fmt: skip
    behind = report.STALE_AFTER + 1
    ages = {
        "quick": {"problem": "measured on a tree with uncommitted changes", "behind": 3},
        "runtime": {"problem": None, "behind": report.STALE_AFTER},
        "oneshot": {"problem": None, "behind": behind},
        "sparse24_gpu": {"problem": None, "behind": behind},
    }
    assert [stem for stem, _ in report.to_rerun(results, ages)] == ["oneshot", "quick", "sparse24_gpu"]
    assert report.blocking(results, ages) == [
        f"oneshot ({behind} commits behind)",
        "quick (measured on a tree with uncommitted changes)",
    ]
    table = "\n".join(report.rerun_section(results, ages))
    assert f"| `sparse24_gpu` | stale (over {report.STALE_AFTER} commits behind); needs a GPU | {behind} |" in table
    assert "| `quick` | measured on a tree with uncommitted changes | 3 |" in table and "`runtime`" not in table


def test_a_cpu_that_did_not_record_amx_is_not_said_to_lack_it():
    report = _report()
    assert report._cpu_words({**CPU, "amx": True}).endswith("(native bf16, AMX)")
    assert report._cpu_words({**CPU, "amx": False}).endswith("(native bf16, no AMX)")
    assert report._cpu_words({k: v for k, v in CPU.items() if k != "amx"}).endswith("(native bf16, AMX not recorded)")


def test_every_benchmark_script_records_its_environment():
    """A re-run leaves a traceable result only if the script writes `environment()` (commit, CPU, versions)."""
    report = _report()
    scripts = set(report.SCRIPTS.values())
    silent = sorted(s for s in scripts if "environment(" not in (ROOT / "benchmarks" / s).read_text())
    assert not silent, f"these benchmarks write results without environment(): {silent}"
