"""Recovery against a dense baseline: metric / baseline metric, as the seeds report it."""

from __future__ import annotations

import json
from pathlib import Path

from sparsefit.errors import UsageError

# Flat metrics of our own result JSONs; harness results are compared metric by metric.
METRICS = ("ppl", "strict_match", "flexible_match")


def load_baseline(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"baseline file '{path}' not found; pass the --json of an earlier `sparsefit eval`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"baseline file '{path}' is not JSON ({err.msg})") from None


def _numeric(d: dict) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}


def recovery(result: dict, baseline: dict) -> dict[str, float]:
    """Ratios result/baseline for every metric both share (for ppl, above 1 means worse)."""
    ratios = {}
    for key in METRICS:
        if isinstance(result.get(key), (int, float)) and baseline.get(key):
            ratios[key] = result[key] / baseline[key]
    for task, metrics in (result.get("results") or {}).items():
        base = (baseline.get("results") or {}).get(task, {})
        for name, value in _numeric(metrics).items():
            if _numeric(base).get(name):
                ratios[f"{task}/{name}"] = value / base[name]
    if not ratios:
        raise UsageError("the baseline shares no metric with this evaluation; evaluate the same task on both models")
    return ratios
