"""Output claims: the places a command refuses to write, --overwrite, and the lock between runs."""

import contextlib
import os
import subprocess
import sys

import pytest

from sparsefit.atomic import mark
from sparsefit.errors import UsageError
from sparsefit.outputs import check_writable_file, claim_output


@pytest.fixture(autouse=True)
def private_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFIT_CACHE", str(tmp_path / "cache"))


def refused(path, match, **kw):
    with pytest.raises(UsageError, match=match):
        claim_output(path, **kw)


def test_a_new_or_empty_directory_is_claimed_and_nothing_is_created(tmp_path):
    with claim_output(tmp_path / "new") as claim:
        assert claim.path == (tmp_path / "new").resolve()
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with claim_output(tmp_path / "empty"):
        pass


def test_places_a_mistake_would_destroy_are_refused(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    refused(tmp_path / "file.txt", "existing file")
    monkeypatch.chdir(tmp_path)
    refused(".", "current directory")
    refused("/", "filesystem root")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    refused("~", "home directory")
    refused(tmp_path / "home", "home directory")


def test_a_directory_holding_the_input_model_is_refused(tmp_path):
    model = tmp_path / "models" / "dense"
    model.mkdir(parents=True)
    mark(tmp_path / "models", "dense")  # even an earlier sparsefit output, even with --overwrite
    refused(tmp_path / "models", "contains the input model", overwrite=True, inputs=(str(model),))
    refused(model, "contains the input model", overwrite=True, inputs=(str(model),))
    with claim_output(tmp_path / "out", inputs=(str(model), "smollm2-135m", None)):
        pass


def test_user_files_are_refused_even_with_overwrite_and_through_a_symlink(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    refused(mine, "did not write", overwrite=True)
    (tmp_path / "link").symlink_to(mine)
    refused(tmp_path / "link", "did not write", overwrite=True, reuse=True)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_an_earlier_output_needs_overwrite_or_reuse(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mark(out, "model.safetensors")
    (out / "model.safetensors").write_bytes(b"x")
    refused(out, "--overwrite")
    with claim_output(out, overwrite=True):
        pass
    with claim_output(out, reuse=True):
        pass
    (out / "NOTES.md").write_text("the user's notes in an earlier output")
    refused(out, r"holds files sparsefit did not write \(NOTES.md\)", overwrite=True)
    refused(out, "NOTES.md", reuse=True)  # a resumed fine-tune would replace the folder at its end
    with claim_output(out, reuse=True, replaces=False):  # a recipe run only adds stage folders
        pass


def test_the_cache_holding_the_builtin_models_is_refused(tmp_path):
    refused(tmp_path / "cache" / "models" / "smollm2-135m", "sparsefit's cache", overwrite=True)


@contextlib.contextmanager
def held_by_another_process(path, **kw):
    """Another process that has claimed `path` (and holds its lock) until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from sparsefit.outputs import claim_output\n"
         f"c = claim_output({str(path)!r}, **{kw!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_process_cannot_claim_a_locked_output(tmp_path):
    with held_by_another_process(tmp_path / "out"):
        refused(tmp_path / "out", "in use by another sparsefit run")
    with claim_output(tmp_path / "out"):  # the lock died with its process
        pass


def test_the_lock_is_reentrant_within_a_process_and_released_on_exit(tmp_path):
    with claim_output(tmp_path / "out"), claim_output(tmp_path / "out", reuse=True):
        pass
    probe = f"from sparsefit.outputs import claim_output; claim_output({str(tmp_path / 'out')!r})"
    assert subprocess.run([sys.executable, "-c", probe], env=os.environ.copy()).returncode == 0


def test_result_files_are_checked_before_the_work(tmp_path):
    check_writable_file(None, "--json")
    check_writable_file(tmp_path / "deep" / "r.json", "--json")
    with pytest.raises(UsageError, match="is a directory"):
        check_writable_file(tmp_path, "--json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="cannot write into"):
        check_writable_file(tmp_path / "f" / "r.json", "--json")  # a file where a folder should be


def test_leftovers_of_a_killed_write_are_ours_and_cleaned(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mark(out, "model.safetensors", "checkpoints")
    (out / ".sparsefit.tmp-ab12cd34").write_text("{")  # a marker update cut short
    (out / ".checkpoints.trash-99aa").mkdir()  # a deletion cut short
    (out / ".model.safetensors.staging-x1").mkdir()
    (tmp_path / ".out.staging-zz9").mkdir()  # a publish of the whole output cut short
    with claim_output(out, overwrite=True):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".sparsefit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


def test_a_second_run_is_told_the_output_is_busy_before_anything_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mark(out, "x")
    (out / "x").write_text("1")
    with held_by_another_process(out, overwrite=True):
        refused(out, "in use")  # not "pass --overwrite"
