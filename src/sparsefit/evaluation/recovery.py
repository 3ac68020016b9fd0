"""Recovery against a dense baseline: metric / baseline metric, as the seeds report it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sparsefit.errors import UsageError

# Flat metrics of our own result JSONs; harness results are compared metric by metric.
METRICS = ("ppl", "strict_match", "flexible_match")


def load_baseline(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"baseline file '{path}' not found; pass the --json of an earlier `sparsefit eval`")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"baseline file '{path}' is not JSON ({type(err).__name__})") from None
    if not isinstance(data, dict) or not (set(METRICS) & set(data) or isinstance(data.get("results"), dict)):
        raise UsageError(
            f"baseline file '{path}' holds no evaluation result (no {', '.join(METRICS)} or 'results'); "
            "pass the --json of an earlier `sparsefit eval`"
        )
    for key in METRICS:
        if isinstance(data.get(key), float) and not math.isfinite(data[key]):
            raise UsageError(f"baseline file '{path}' has {key} {data[key]}; evaluate the baseline model again")
    return data


def _numeric(d: dict) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}


def recovery(result: dict, baseline: dict) -> dict[str, float]:
    """Ratios result/baseline for every metric both share (for ppl, above 1 means worse)."""
    ratios = {}
    for key in METRICS:
        if isinstance(result.get(key), (int, float)) and isinstance(baseline.get(key), (int, float)) and baseline[key]:
            ratios[key] = result[key] / baseline[key]
    base_results = baseline.get("results") if isinstance(baseline.get("results"), dict) else {}
    for task, metrics in (result.get("results") or {}).items():
        base = base_results.get(task) if isinstance(base_results.get(task), dict) else {}
        for name, value in _numeric(metrics).items():
            if _numeric(base).get(name):
                ratios[f"{task}/{name}"] = value / base[name]
    if not ratios:
        raise UsageError("the baseline shares no metric with this evaluation; evaluate the same task on both models")
    return ratios
