"""Atomic, durable writes: files, published directories, the foreign-directory guard, kill recovery."""

import json
import os
import stat
from pathlib import Path

import pytest

from sparsefit import atomic
from sparsefit.atomic import MARKER, clean_stale, staging_dir, write_json
from sparsefit.errors import UsageError


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_files_and_published_directories_honour_the_umask(tmp_path, umask_027):
    write_json(tmp_path / "a.json", {"x": 1})
    assert mode(tmp_path / "a.json") == 0o640
    with staging_dir(tmp_path / "out") as stage:
        (stage / "w.bin").write_bytes(b"1")
        os.chmod(stage / "w.bin", 0o600)  # as some writers create their files
        (stage / "sub").mkdir()
        (stage / "sub" / "f").write_text("x")
    assert mode(tmp_path / "out") == 0o750 and mode(tmp_path / "out" / "sub") == 0o750
    assert mode(tmp_path / "out" / "w.bin") == 0o640 and mode(tmp_path / "out" / "sub" / "f") == 0o640


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    write_json(tmp_path / "r.json", {"v": 1})
    write_json(tmp_path / "r.json", {"v": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_block_keeps_the_old_directory_and_removes_the_staging(tmp_path):
    with staging_dir(tmp_path / "out") as stage:
        (stage / "v").write_text("old")
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "out") as stage:
        (stage / "v").write_text("new")
        raise RuntimeError("killed half way")
    assert (tmp_path / "out" / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publishing_replaces_every_file_and_carries_only_the_named_ones(tmp_path):
    with staging_dir(tmp_path / "out") as stage:
        for name in ("model-1.safetensors", "model-2.safetensors", "train_log.jsonl"):
            (stage / name).write_text("old")
    with staging_dir(tmp_path / "out", carry=("train_log.jsonl",)) as stage:
        (stage / "model.safetensors").write_text("new")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [MARKER, "model.safetensors", "train_log.jsonl"]  # no stale shard of the old output


def test_a_carried_folder_keeps_its_files_and_links(tmp_path):
    with staging_dir(tmp_path / "out") as stage:  # as a tracker leaves it: nested files, a relative link
        (stage / "tracking" / "run-1").mkdir(parents=True)
        (stage / "tracking" / "run-1" / "events").write_text("curve")
        (stage / "tracking" / "latest-run").symlink_to("run-1")
        (stage / "stale.bin").write_text("old")
    with staging_dir(tmp_path / "out", carry=("tracking",)) as stage:
        (stage / "model.safetensors").write_text("new")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model.safetensors", "tracking"]
    assert (out / "tracking" / "run-1" / "events").read_text() == "curve"
    assert (out / "tracking" / "latest-run").is_symlink() and (out / "tracking" / "latest-run" / "events").is_file()


@pytest.mark.parametrize("content", ["file", "dir"])
def test_a_directory_sparsefit_did_not_write_is_never_replaced(tmp_path, content):
    target = tmp_path / "mine"
    if content == "file":
        target.write_text("user data")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("user data")
    with pytest.raises(UsageError, match="refusing to replace"), staging_dir(target) as stage:
        (stage / "x").write_text("x")
    assert (target.read_text() if content == "file" else (target / "notes.txt").read_text()) == "user data"


def test_without_the_exchange_a_kill_between_the_renames_is_undone_at_the_next_start(tmp_path, monkeypatch):
    with staging_dir(tmp_path / "out") as stage:
        (stage / "v").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        if Path(src).parent == tmp_path and Path(src).name.startswith(".out.staging-"):
            raise KeyboardInterrupt  # the process dies between moving the old aside and the new in
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt), staging_dir(tmp_path / "out") as stage:
        (stage / "v").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not (tmp_path / "out").exists()  # neither name holds it now ...
    clean_stale(tmp_path / "out")  # ... until the next run claims the output
    assert (tmp_path / "out" / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # and the fallback publishes normally
    with staging_dir(tmp_path / "out") as stage:
        (stage / "v").write_text("new")
    assert (tmp_path / "out" / "v").read_text() == "new"


def test_clean_stale_removes_staging_left_by_a_kill(tmp_path):
    (tmp_path / ".out.staging-abc").mkdir()
    (tmp_path / ".out.staging-abc" / "half.bin").write_bytes(b"x")
    (tmp_path / ".other.staging-abc").mkdir()
    clean_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.staging-abc"]


def test_crash_point_kills_only_the_named_phase_on_its_count(monkeypatch):
    killed = []
    monkeypatch.setattr(atomic.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv("SPARSEFIT_CRASH_AT", "checkpoint:begin@2")
    monkeypatch.setattr(atomic, "_crash_counts", {})
    atomic.crash_point("checkpoint:begin")
    atomic.crash_point("final:staged")
    assert killed == []
    atomic.crash_point("checkpoint:begin")
    assert len(killed) == 1
