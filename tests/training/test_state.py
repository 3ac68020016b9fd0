"""Checkpoints of the fine-tuning loop: versioned folders, manifests, damaged ones, changed options,
a stop signal, a torn log, non-finite weights, a full disk."""

import errno
import json
import signal

import pytest
import torch

from sparsefit.errors import Interrupted, SparsefitError, UsageError
from sparsefit.training import FinetuneConfig, finetune
from sparsefit.training import state as state_module
from sparsefit.training.loop import CHECKPOINTS_DIR, LOG_FILE
from sparsefit.training.state import damage, find_checkpoint, published_steps
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("default_signals")  # SIGINT may start ignored

BASE = dict(dataset="gsm8k", format="plain", seq_len=64, batch_size=2, lr=5e-3, bf16="false", seed=3, max_steps=8)


def signal_at_step(model, step, signum=signal.SIGTERM):
    """Deliver `signum` to this process during training step `step` (its first forward)."""
    calls = {"n": 0}

    def hook(module, args):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step + 1:
                signal.raise_signal(signum)

    return model.base_model.register_forward_pre_hook(hook)  # the backbone runs in every training forward


def losses(out):
    return [json.loads(line)["loss"] for line in (out / LOG_FILE).read_text().splitlines()]


def stopped_run(tokenizer, out, step, keep=2, every=2):
    model = tiny_model("llama")
    signal_at_step(model, step)
    cfg = FinetuneConfig(**BASE, checkpoint_every=every, keep_checkpoints=keep)
    with pytest.raises(Interrupted) as info:
        finetune(model, tokenizer, cfg, out, progress=False)
    return info.value


def test_sigterm_finishes_the_step_checkpoints_and_resume_matches_an_uninterrupted_run(tokenizer, data_dir, tmp_path):
    full = finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "full", progress=False)
    err = stopped_run(tokenizer, tmp_path / "run", step=4)  # signalled inside step 4: steps 0-4 are done
    assert err.exit_code == 143 and "SIGTERM after step 5" in str(err) and "--resume" in str(err)
    assert published_steps(tmp_path / "run" / CHECKPOINTS_DIR) == [5, 4]  # 5 written on the signal
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    resumed = finetune(
        tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", resume=True, progress=False
    )
    assert resumed["resumed_from"] == 5 and resumed["tokens"] == full["tokens"]
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert not (tmp_path / "run" / CHECKPOINTS_DIR).exists()


def test_ctrl_c_exits_130(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    signal_at_step(model, 1, signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        finetune(model, tokenizer, FinetuneConfig(**BASE), tmp_path / "run", progress=False)
    assert info.value.exit_code == 130 and "SIGINT" in str(info.value)


def test_only_the_newest_checkpoints_are_kept(tokenizer, data_dir, tmp_path):
    stopped_run(tokenizer, tmp_path / "run", step=6, keep=2, every=1)
    root = tmp_path / "run" / CHECKPOINTS_DIR
    assert published_steps(root) == [7, 6]
    assert all(damage(root / f"step-{s:08d}") is None for s in (6, 7))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tokenizer, data_dir, tmp_path, capsys):
    stopped_run(tokenizer, tmp_path / "run", step=5)  # checkpoints 4 and 6
    root = tmp_path / "run" / CHECKPOINTS_DIR
    newest = root / "step-00000006" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # a torn file
    folder, warnings = find_checkpoint(root)
    assert folder.name == "step-00000004" and "step-00000006" in warnings[0] and "bytes" in warnings[0]
    flipped = root / "step-00000004" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1
    flipped.write_bytes(bytes(data))  # same size, other content
    assert "checksum" in damage(root / "step-00000004")
    with pytest.raises(SparsefitError, match="no whole checkpoint"):
        finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", resume=True, progress=False)
    assert published_steps(root) == [6, 4]  # damaged checkpoints are never deleted by a resume


def test_resume_falls_back_and_warns(tokenizer, data_dir, tmp_path, capsys):
    stopped_run(tokenizer, tmp_path / "run", step=5)
    (tmp_path / "run" / CHECKPOINTS_DIR / "step-00000006" / "manifest.json").unlink()
    metrics = finetune(
        tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", resume=True, progress=False
    )
    out = capsys.readouterr().out
    assert "step-00000006 is damaged (no readable manifest)" in out and metrics["resumed_from"] == 4


def test_resume_with_other_options_names_the_fields(tokenizer, data_dir, tmp_path):
    stopped_run(tokenizer, tmp_path / "run", step=3)
    cfg = FinetuneConfig(**{**BASE, "lr": 1e-3, "seed": 4}, checkpoint_every=5)  # the interval may change
    with pytest.raises(UsageError, match=r"differs from the checkpoint's in lr \(0.005 -> 0.001\), seed \(3 -> 4\);"):
        finetune(tiny_model("llama"), tokenizer, cfg, tmp_path / "run", resume=True, progress=False)


def test_a_torn_last_log_line_is_dropped_with_a_warning(tokenizer, data_dir, tmp_path, capsys):
    stopped_run(tokenizer, tmp_path / "run", step=3)
    log = tmp_path / "run" / LOG_FILE
    log.write_text(log.read_text() + '{"step": 4, "loss": 2.')
    finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", resume=True, progress=False)
    assert "not a whole log record" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(8))


def test_a_fresh_run_into_an_unfinished_one_needs_resume_or_overwrite(tokenizer, data_dir, tmp_path):
    stopped_run(tokenizer, tmp_path / "run", step=3)
    with pytest.raises(UsageError, match="--overwrite"):
        finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", progress=False)
    metrics = finetune(
        tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", overwrite=True, progress=False
    )
    assert metrics["resumed_from"] is None and len(losses(tmp_path / "run")) == 8


def test_a_finished_run_is_not_resumed(tokenizer, data_dir, tmp_path):
    finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", progress=False)
    with pytest.raises(UsageError, match="finished fine-tune"):
        finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", resume=True, progress=False)


def test_non_finite_weights_are_never_checkpointed(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    weight = model.model.layers[1].mlp.up_proj.weight
    calls = {"n": 0}

    def poison(module, args):  # during step 3 a weight turns to inf (as a bad update would leave it)
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 4:
            with torch.no_grad():
                weight[0, 0] = float("inf")

    model.model.layers[1].register_forward_pre_hook(poison)
    cfg = FinetuneConfig(**BASE, checkpoint_every=2, max_grad_norm=0.0)
    with pytest.raises(SparsefitError, match="became") as info:
        finetune(model, tokenizer, cfg, tmp_path / "run", progress=False)
    assert "step-00000002" in str(info.value)
    assert published_steps(tmp_path / "run" / CHECKPOINTS_DIR) == [2]  # the good one, and nothing after it


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one(tokenizer, data_dir, tmp_path, monkeypatch):
    real = state_module.save_file
    calls = {"n": 0}

    def disk_full(tensors, path, *a, **k):
        calls["n"] += "optimizer" in str(path)
        if "optimizer" in str(path) and calls["n"] == 2:  # the second checkpoint's optimizer file
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(state_module, "save_file", disk_full)
    with pytest.raises(OSError) as info:
        finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE, checkpoint_every=2), tmp_path / "run",
                 progress=False)  # fmt: skip
    assert info.value.errno == errno.ENOSPC
    root = tmp_path / "run" / CHECKPOINTS_DIR
    assert published_steps(root) == [2] and damage(root / "step-00000002") is None
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # no staging folder left behind
    monkeypatch.setattr(state_module, "save_file", real)
    metrics = finetune(
        tiny_model("llama"), tokenizer, FinetuneConfig(**BASE, checkpoint_every=2), tmp_path / "run", resume=True,
        progress=False,
    )  # fmt: skip
    assert metrics["resumed_from"] == 2


def test_a_checkpoint_a_kill_cut_short_is_cleaned_when_the_run_resumes(tokenizer, data_dir, tmp_path):
    stopped_run(tokenizer, tmp_path / "run", step=3)
    stale = tmp_path / "run" / CHECKPOINTS_DIR / ".step-00000006.staging-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), tmp_path / "run", resume=True, progress=False)
    assert not stale.exists()


def test_a_full_disk_is_one_line_from_the_cli(tiny_checkpoint, data_dir, tmp_path, monkeypatch, capsys):
    from sparsefit.cli import main

    def disk_full(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state_module, "save_file", disk_full)
    argv = ["finetune", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--max-steps", "4",
            "--checkpoint-every", "2", "--batch-size", "2", "--seq-len", "64", "--format", "plain"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("sparsefit: error:")]
    assert "no space left on the device writing" in line and "--resume" in line and "Traceback" not in err


def test_the_fingerprint_names_a_local_model_one_way(tmp_path, monkeypatch):
    from sparsefit.training.loop import options_fingerprint

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    config = FinetuneConfig(teacher="m", kl_weight=1.0)
    relative = options_fingerprint("./m", config, 1)
    assert relative == options_fingerprint(str(tmp_path / "m"), config, 1)
    assert relative["teacher"] == relative["model"] == str(tmp_path / "m")
    assert options_fingerprint("smollm2-135m", config, 1)["model"] == "smollm2-135m"


def test_a_signal_in_the_last_step_stops_the_caller_after_the_final_model(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    signal_at_step(model, BASE["max_steps"] - 1)
    with pytest.raises(Interrupted, match="after the final model was written") as info:
        finetune(model, tokenizer, FinetuneConfig(**BASE), tmp_path / "run", progress=False)
    assert info.value.exit_code == 143
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["completed"]


def test_a_file_added_to_the_output_during_training_keeps_the_work(tokenizer, data_dir, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "run"
    calls = {"n": 0}

    def user_drops_a_file(module, args):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 3:
            (out / "notes.txt").write_text("mine")

    model.base_model.register_forward_pre_hook(user_drops_a_file)
    with pytest.raises(UsageError, match=r"notes\.txt.*step-00000008.*--resume"):
        finetune(model, tokenizer, FinetuneConfig(**BASE), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and published_steps(out / CHECKPOINTS_DIR) == [8]
    (out / "notes.txt").rename(tmp_path / "notes.txt")
    metrics = finetune(tiny_model("llama"), tokenizer, FinetuneConfig(**BASE), out, resume=True, progress=False)
    assert metrics["resumed_from"] == 8 and (out / "model.safetensors").is_file()


def test_a_non_finite_optimizer_state_is_never_written(tmp_path):
    from sparsefit.models.finite import NonFiniteError
    from sparsefit.training.state import save_training_state

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.state[model.weight]["exp_avg_sq"][0, 0] = float("nan")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(NonFiniteError, match=r"tensor 0.exp_avg_sq holds 1 NaN or infinite value"):
        save_training_state(tmp_path / "ck", model, None, optimizer, scheduler, {"step": 1})
    assert published_steps(tmp_path / "ck") == []
