"""Experiment trackers (`report_to`): the loop's log records, step by step, sent to TensorBoard,
Weights & Biases, Trackio or MLflow through each library's own API, from the main process only.

Every tracker writes under `OUTPUT/tracking/` (carried into the final model folder), so a run's
curves stay with its model and nothing needs a server:

- tensorboard: event files in `tracking/tensorboard/` (`tensorboard --logdir OUTPUT/tracking`);
- wandb: an offline run in `tracking/wandb/` unless WANDB_MODE says otherwise (`wandb sync` uploads it);
- mlflow: a file store in `tracking/mlruns/` unless MLFLOW_TRACKING_URI names another store;
- trackio: its local database (TRACKIO_DIR, by default in the Hugging Face cache), project `sparsefit`.

A resumed run continues the same TensorBoard folder (events of the steps it redoes are purged);
the other trackers start a new run named after the step it resumes from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Protocol

from sparsefit.atomic import discard_dir, mark, read_marker
from sparsefit.errors import UsageError

TRACKING_DIR = "tracking"
PROJECT = "sparsefit"
# tracker -> (the module it imports, the sparsefit extra that installs it)
REQUIREMENTS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_tracker(name: str) -> None:
    """A UsageError naming the extra to install when tracker `name`'s library is missing (before any work)."""
    if name == "none":
        return
    module, extra = REQUIREMENTS[name]
    if importlib.util.find_spec(module) is None:
        raise UsageError(
            f"tracker '{name}' (--report-to / report_to) needs the package '{module}', which is not installed: "
            f"pip install 'sparsefit[{extra}]'"
        )


def claim_tracking_dir(parent: Path, fresh: bool) -> None:
    """Record PARENT/tracking as sparsefit's, emptied when `fresh`; one that sparsefit did not write
    (by the marker of PARENT) is refused, never written into or deleted."""
    folder = parent / TRACKING_DIR
    if folder.exists() and TRACKING_DIR not in (read_marker(parent) or {}).get("entries", []):
        raise UsageError(f"'{folder}' holds files sparsefit did not write; move it out to use a tracker here")
    if fresh:
        discard_dir(folder)
    mark(parent, TRACKING_DIR)


def numeric(record: dict) -> dict[str, float]:
    """The numbers of a log record (every tracker takes scalars), without the step itself."""
    return {
        k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def open_tracker(name: str, output_dir: Path, config: dict, start_step: int = 0) -> Tracker | None:
    """Tracker `name` (None for "none") for the run writing `output_dir`, named after that folder, writing
    under its TRACKING_DIR; `config` is logged as the run's parameters, `start_step` > 0 on a resume."""
    if name == "none":
        return None
    check_tracker(name)
    folder, run_name = output_dir / TRACKING_DIR, output_dir.name
    folder.mkdir(parents=True, exist_ok=True)
    if start_step > 0 and name != "tensorboard":
        run_name = f"{run_name} (resumed at step {start_step})"
    opener = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio, "mlflow": _MLflow}[name]
    return opener(folder, run_name, config, start_step)


class _TensorBoard:
    def __init__(self, folder: Path, run_name: str, config: dict, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events an interrupted run wrote past its checkpoint
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step or None)
        if start_step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _RunHandle:
    """Trackers whose `init` returns a run object with `log(values, step=)` and `finish()` (wandb, trackio)."""

    run: object

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _WandB(_RunHandle):
    def __init__(self, folder: Path, run_name: str, config: dict, start_step: int) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"  # nothing leaves the machine unless asked
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=run_name,
            dir=str(folder),
            config=config,
            mode=mode,
            reinit="create_new",
        )


class _Trackio(_RunHandle):
    def __init__(self, folder: Path, run_name: str, config: dict, start_step: int) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or PROJECT, name=run_name, config=config)


class _MLflow:
    def __init__(self, folder: Path, run_name: str, config: dict, start_step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: MLflow 3 keeps it (in maintenance mode) behind an opt-in
            uri = (folder / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, json.dumps(v)[:500]) for k, v in sorted(config.items())]  # MLflow caps a value's length
        self.client.log_batch(self.run_id, params=params)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
