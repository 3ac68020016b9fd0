"""`report_to`: the loop's log records reach each tracker, read back through the tracker's own reader."""

import importlib.util
import json
import struct

import pytest
import torch

from sparsefit.errors import UsageError
from sparsefit.training import FinetuneConfig, finetune
from sparsefit.training import trackers as trackers_module
from sparsefit.training.loop import LOG_FILE
from sparsefit.training.trackers import TRACKING_DIR, check_tracker
from tests.conftest import run_cli, tiny_model

BASE = dict(dataset="gsm8k", format="plain", seq_len=64, batch_size=2, lr=5e-3, bf16="false", seed=3, max_steps=4)


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"the {module} package is not installed")


def log_records(out):
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def train(tokenizer, out, **options):
    return finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE, **options), out, progress=False)


@_needs("tensorboard")
def test_tensorboard_events_hold_the_logged_losses(tokenizer, data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    metrics = train(tokenizer, out, report_to="tensorboard")
    records = log_records(out)
    assert metrics["config"]["report_to"] == "tensorboard"
    events = EventAccumulator(str(out / TRACKING_DIR / "tensorboard"))  # in the final model folder
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in records] == [0, 1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in records], rel=1e-6)
    assert "train/tokens_per_second" in events.Tags()["scalars"]


@_needs("tensorboard")
def test_a_resumed_run_continues_the_tensorboard_curve(tokenizer, data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "resumed"
    cfg = FinetuneConfig(**BASE, checkpoint_every=2, report_to="tensorboard")
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):  # a kill in the 4th step: steps 0-2 logged, the checkpoint after step 2
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model("llama"), tokenizer, cfg, out, progress=False)
    finally:
        torch.optim.AdamW.step = original
    finetune(tiny_model("llama"), tokenizer, cfg, out, resume=True, progress=False)
    events = EventAccumulator(str(out / TRACKING_DIR / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    records = log_records(out)
    assert [e.step for e in loss] == [r["step"] for r in records] == [0, 1, 2, 3]  # step 2 once, not twice
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)


@_needs("mlflow")
def test_mlflow_file_store_holds_the_logged_losses(tokenizer, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "mlflow"
    train(tokenizer, out, report_to="mlflow")
    client = MlflowClient(tracking_uri=(out / TRACKING_DIR / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("sparsefit").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    records = log_records(out)
    assert [m.step for m in history] == [r["step"] for r in records]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in records], rel=1e-9)
    assert json.loads(run.data.params["lr"]) == BASE["lr"] and run.info.status == "FINISHED"


@_needs("wandb")
def test_wandb_offline_run_holds_the_logged_losses(tokenizer, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wandb"
    train(tokenizer, out, report_to="wandb")
    (run_file,) = (out / TRACKING_DIR / "wandb").glob("offline-run-*/run-*.wandb")  # carried into the model folder
    history = _wandb_history(run_file)
    records = log_records(out)
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    assert [h["train/loss"] for h in history] == pytest.approx([r["loss"] for r in records], rel=1e-9)


def _wandb_history(path):
    """The history rows of an offline run's .wandb file: wandb's record log (a header, then records in
    32 KiB blocks, each with a 7-byte header: checksum, length, kind) of wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
            part = b""
    return rows


@_needs("trackio")
def test_trackio_database_holds_the_logged_losses(tokenizer, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    import trackio.utils

    assert trackio.utils.TRACKIO_DIR == tmp_path / "trackio", "trackio was imported before TRACKIO_DIR was set"
    from trackio.sqlite_storage import SQLiteStorage

    out = tmp_path / "trackio-run"
    train(tokenizer, out, report_to="trackio")
    logs = sorted(SQLiteStorage.get_logs("sparsefit", out.name), key=lambda row: row["step"])
    records = log_records(out)
    assert [row["step"] for row in logs] == [r["step"] for r in records]
    assert [row["train/loss"] for row in logs] == pytest.approx([r["loss"] for r in records], rel=1e-9)


def test_a_missing_tracker_library_is_a_one_line_error_before_training(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(trackers_module.REQUIREMENTS, "wandb", ("no_such_tracker_module", "wandb"))
    with pytest.raises(UsageError, match=r"pip install 'sparsefit\[wandb\]'"):
        check_tracker("wandb")
    out = tmp_path / "o"
    code, _, err = run_cli(["finetune", "--model", str(tiny_checkpoint), "--output", str(out), "--report-to", "wandb"],
                           capsys)  # fmt: skip
    assert code == 2 and "sparsefit[wandb]" in err and err.count("\n") == 1, err
    assert not out.exists()  # refused before the output was claimed or the model loaded


@_needs("tensorboard")
def test_a_recipe_run_reports_its_fine_tune_and_evaluations(tiny_checkpoint, data_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ppl = {"kind": "evaluate", "tasks": ["perplexity"], "seq_len": 64, "max_windows": 1}
    stage = {"kind": "finetune", "name": "ft", "format": "plain", "seq_len": 64, "batch_size": 2, "max_steps": 2,
             "bf16": "false"}  # fmt: skip
    recipe = tmp_path / "r.yaml"
    stages = [{**ppl, "name": "before"}, stage, {**ppl, "name": "after"}]
    recipe.write_text(json.dumps({"name": "r", "model": str(tiny_checkpoint), "stages": stages}))
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["run", str(recipe), "--output", str(run_dir), "--report-to", "tensorboard"], capsys)
    assert code == 0, err
    events = EventAccumulator(str(run_dir / "02-ft" / TRACKING_DIR / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in log_records(run_dir / "02-ft")], rel=1e-6
    )
    evals = EventAccumulator(str(run_dir / TRACKING_DIR / "tensorboard"))  # the run's evaluations, one curve
    evals.Reload()
    results = [json.loads((run_dir / f / "stage.json").read_text())["result"] for f in ("01-before", "03-after")]
    measured = [r["ppl"] for r in results]
    assert [(e.step, e.value) for e in evals.Scalars("eval/ppl")] == [
        (1, pytest.approx(measured[0], rel=1e-6)),
        (3, pytest.approx(measured[1], rel=1e-6)),
    ]
    code, out, err = run_cli(["run", str(recipe), "--output", str(run_dir)], capsys)  # no tracker now
    assert code == 0 and "ft: complete, skipped" in out, err


def test_a_recipe_with_a_missing_tracker_library_stops_before_its_first_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(trackers_module.REQUIREMENTS, "mlflow", ("no_such_tracker_module", "mlflow"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "report_to": "mlflow", "stages": [{"kind": "finetune"}]}))
    code, _, err = run_cli(["run", str(recipe), "--output", str(tmp_path / "run")], capsys)
    assert code == 2 and "sparsefit[mlflow]" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
