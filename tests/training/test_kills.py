"""Fault injection through the CLI: fine-tunes SIGKILLed at every phase of a checkpoint and of the
final save, and at random instants, then resumed; SIGTERM; two runs into one output.

After every kill the output holds a whole checkpoint no older than the last one seen, `--resume`
continues from the last published checkpoint (or the one before), the loss trajectory equals an
uninterrupted run's, and the user's files around the output are untouched.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsefit.training.state import find_checkpoint, read_trainer_state
from tests.conftest import tiny_model, write_data_dir

STEPS = 10
TRAIN = ["--batch-size", "2", "--seq-len", "64", "--format", "plain", "--bf16", "false", "--lr", "5e-3", "--seed", "3"]
# Steps of the run the random kills hit: more than 20 launches of well under a second each can train
# on a fast CPU, so that the run never finishes before its last kill.
LONG = 1200


class World:
    """A tiny model, data and the losses of uninterrupted runs, shared by the tests of this module."""

    def __init__(self, root: Path, tokenizer) -> None:
        self.root = root
        self.model = root / "tiny"
        tiny_model("llama").save_pretrained(self.model)
        tokenizer.save_pretrained(self.model)
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "SPARSEFIT_CACHE": str(root / "cache"),
            "SPARSEFIT_DATA_DIR": str(write_data_dir(root / "data")),
        }
        self.env.pop("SPARSEFIT_CRASH_AT", None)
        self.reference = {}

    def argv(self, out, steps, extra):
        return [sys.executable, "-m", "sparsefit.cli", "finetune", "--model", str(self.model), "--output", str(out),
                "--max-steps", str(steps), *TRAIN, *extra]  # fmt: skip

    def launch(self, out, *extra, steps=STEPS, log):
        sink = open(log, "w")  # noqa: SIM115 - the child holds it; closed when the test's tmp dir goes
        return subprocess.Popen(self.argv(out, steps, extra), env=self.env, stdout=sink, stderr=subprocess.STDOUT)

    def run(self, out, *extra, steps=STEPS, crash=None):
        env = {**self.env, **({"SPARSEFIT_CRASH_AT": crash} if crash else {})}
        return subprocess.run(self.argv(out, steps, extra), env=env, capture_output=True, text=True)

    def losses_of_uninterrupted(self, steps):
        if steps not in self.reference:
            out = self.root / f"reference-{steps}"
            proc = self.run(out, steps=steps)
            assert proc.returncode == 0, proc.stderr[-2000:]
            self.reference[steps] = losses(out)
        return self.reference[steps]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    return World(tmp_path_factory.mktemp("kills"), tokenizer)


@pytest.fixture
def area(tmp_path):
    """A folder with a user's file beside the output, which nothing may touch."""
    (tmp_path / "notes.txt").write_text("the user's own file")
    return tmp_path


def untouched(area, settled=True):
    """The user's file is intact; once a run has completed (`settled`), no staging folder is left."""
    assert (area / "notes.txt").read_text() == "the user's own file"
    if settled:
        assert not [p for p in area.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def published(out):
    folder, _ = find_checkpoint(out / "checkpoints")
    return read_trainer_state(folder)["step"] if folder else None


def finished(out):
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


# Checkpoints every 2 steps. Each launch resumes the last and is killed at the first time it reaches
# the phase; the step of the newest whole checkpoint afterwards (None: the run finished).
CHAIN = [
    ("checkpoint:published", 2),  # step 2 renamed into place, older ones not yet pruned
    ("checkpoint:begin", 2),  # the staging folder of step 4 exists, nothing written in it
    ("checkpoint:mid-data", 2),  # step 4's weights written, the optimizer state not yet
    ("checkpoint:staged", 2),  # step 4 complete and fsync'ed, not yet renamed into place
    ("checkpoint:pruned", 4),  # step 4 published and step 2 kept (the newest two stay)
    ("final:staged", 8),  # the final model complete in its staging folder, not yet exchanged
    ("final:exchanged", None),  # the final model in place, the old folder not yet deleted
]


def test_a_kill_at_each_phase_of_a_save_resumes_from_the_last_published_checkpoint(world, area):
    out = area / "run"
    for phase, after in CHAIN:
        proc = world.run(out, "--checkpoint-every", "2", "--resume", crash=phase)
        assert proc.returncode == -signal.SIGKILL, (phase, proc.stderr[-2000:])
        assert published(out) == after, phase
        assert (finished(out) is not None) == (after is None), phase
        untouched(area, settled=False)
    proc = world.run(out, "--checkpoint-every", "2", "--resume")
    assert proc.returncode == 0 and "nothing to resume" in proc.stdout
    assert finished(out)["resumed_from"] == 8
    assert losses(out) == pytest.approx(world.losses_of_uninterrupted(STEPS), abs=1e-6)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".sparsefit"]
    untouched(area)


def test_a_kill_after_the_final_publish_leaves_the_finished_model(world, area):
    out = area / "run"
    proc = world.run(out, "--checkpoint-every", "2", crash="final:published")
    assert proc.returncode == -signal.SIGKILL and finished(out)["completed"] and published(out) is None
    assert losses(out) == pytest.approx(world.losses_of_uninterrupted(STEPS), abs=1e-6)
    untouched(area)


def wait_for_training(log, proc, timeout=120):
    """Block until the run has claimed its output and loaded its model (it says where it starts from)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        text = Path(log).read_text() if Path(log).exists() else ""
        if "starting from step" in text or "resuming from" in text:
            return
        time.sleep(0.02)


def test_twenty_kills_at_random_instants_lose_nothing(world, area):
    """Each launch is killed at a random instant: one in four while starting (claiming the output,
    cleaning what the last kill left, loading), the others while training and checkpointing every step."""
    out, rng, log = area / "run", random.Random(0), area / "log.txt"
    seen, kills = 0, 0
    while kills < 20:
        proc = world.launch(out, "--checkpoint-every", "1", "--resume", steps=LONG, log=log)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 3.0))
        else:
            wait_for_training(log, proc)
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # it finished before the kill came
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        kills += 1
        step = published(out)
        assert step is None or step >= seen, (step, seen)  # a published checkpoint is never lost
        seen = step or seen
        untouched(area, settled=False)
    assert kills == 20 and seen > 0
    # The rest of the run checkpoints rarely, to keep the test short (a resumed run may change it).
    proc = world.run(out, "--checkpoint-every", "200", "--resume", steps=LONG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert finished(out)["resumed_from"] == seen
    assert losses(out) == pytest.approx(world.losses_of_uninterrupted(LONG), abs=1e-6)
    untouched(area)


def test_sigterm_checkpoints_and_exits_143_then_resumes(world, area):
    out = area / "run"
    proc = world.launch(out, log=area / "log.txt")
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    text = (area / "log.txt").read_text()
    errors = [line for line in text.splitlines() if line.startswith("sparsefit: error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and "Traceback" not in text
    step = published(out)
    assert step is not None and 0 < step < STEPS
    proc = world.run(out, "--resume")
    assert proc.returncode == 0 and finished(out)["resumed_from"] == step
    assert losses(out) == pytest.approx(world.losses_of_uninterrupted(STEPS), abs=1e-6)


def test_a_second_run_into_the_same_output_fails_at_once(world, area):
    out = area / "run"
    first = world.launch(out, steps=40, log=area / "first.txt")
    deadline = time.monotonic() + 120
    while not (out / ".sparsefit").exists() and time.monotonic() < deadline:  # the first one holds the lock
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # held mid-run, however fast this machine trains
    try:
        second = world.run(out, "--overwrite")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"sparsefit: error: --output '{out}' is in use by another sparsefit run; wait for it or choose another output"
    ]
    assert first.wait(timeout=300) == 0, (area / "first.txt").read_text()[-2000:]
    assert finished(out)["steps"] == 40
