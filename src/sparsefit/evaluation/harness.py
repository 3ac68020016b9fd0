"""lm-evaluation-harness on an already-loaded model, offline with local task definitions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from sparsefit.cache import cache_root
from sparsefit.data.sources import data_dir
from sparsefit.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The zero-shot suite of the Adaptive Sparse Trainer table (needs its data reachable).
ZERO_SHOT_SUITE = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def local_task_dir() -> Path | None:
    """Write `gsm8k_local`, the harness's own gsm8k task pointed at the data folder's `gsm8k`
    (`SPARSEFIT_DATA_DIR`, by default `~/.cache/sparsefit/data`).

    The task includes the installed `gsm8k.yaml` and only swaps the dataset source, so prompt,
    stops, filters and metric stay the harness's.
    """
    root = data_dir()
    if not (root / "gsm8k" / "test.jsonl").is_file():
        return None
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    task = {
        "include": str(builtin),
        "task": "gsm8k_local",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(root / "gsm8k" / f"{s}.jsonl") for s in ("train", "test")}},
    }
    out = cache_root() / "harness_tasks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gsm8k_local.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return out


def run_harness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    chat: bool = False,
    max_length: int = 2048,
    log_samples: bool = False,
) -> dict:
    """`lm_eval.simple_evaluate` on `model` as loaded (no second load); the harness's own numbers."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("--harness needs lm-evaluation-harness: pip install 'sparsefit[eval]'") from None
    if include_path and not os.path.isdir(include_path):
        raise UsageError(f"--include-path '{include_path}' is not a directory of task YAML files")
    paths = [p for p in (include_path, local_task_dir()) if p]
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"unknown harness task(s) {', '.join(unknown)}; check the name, or pass --include-path with their YAML"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=chat,
        log_samples=log_samples,
    )
    result = {"task": "harness", "tasks": tasks, "results": out["results"], "n_samples": out.get("n-samples")}
    if log_samples:
        result["samples"] = out["samples"]
    return result
