"""The per-step training log, `train_log.jsonl`: one JSON record per logged step, also sent to the
run's experiment tracker (`trackers`) when it has one."""

from __future__ import annotations

import json
from pathlib import Path

from sparsefit.atomic import write_text
from sparsefit.training.trackers import Tracker, numeric

LOG_FILE = "train_log.jsonl"


def read_log(path: Path, warn: bool = True) -> list[dict]:
    """The records of a training log. A line that does not parse (the torn end of a log that a power
    loss or a full disk cut short) is dropped, with a warning when `warn`."""
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            valid = isinstance(record, dict) and isinstance(record.get("step"), int)
        except ValueError:
            valid = False
        if valid:
            records.append(record)
        elif warn:
            print(f"warning: {path}:{n} is not a whole log record (a torn write); dropped", flush=True)
    return records


class TrainLog:
    """The per-step JSONL log (main process only); a resumed run drops the lines of steps it redoes.
    Each record's numbers also go to `tracker` as `train/<key>` at the record's step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int, tracker: Tracker | None = None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if not enabled:
            return
        kept = [r for r in read_log(path) if r["step"] < resume_step] if resume_step > 0 and path.is_file() else []
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log({f"train/{k}": v for k, v in numeric(record).items()}, record["step"])

    def close(self) -> None:
        """Flush and close the tracker (before the final save carries its files along)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
