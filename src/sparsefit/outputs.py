"""Where a command may write, and the lock that keeps two runs out of one place.

`claim_output` runs before any work: it resolves the path, refuses places a mistake would
destroy (a file, `.`, `/`, the home directory, a directory holding the input model, a non-empty
directory sparsefit did not write, an earlier sparsefit output without `--overwrite`), takes an
exclusive lock on the path for the rest of the process, and cleans the staging folders a killed
run left there. Locks (`sparsefit.cache`) are keyed by the resolved path, not held inside it, so
directories can be exchanged wholesale while the lock stays put.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from sparsefit.atomic import check_replaceable, clean_stale, clean_stale_in, is_empty_dir, is_ours
from sparsefit.cache import acquire_lock, cache_root
from sparsefit.errors import UsageError


def resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def is_main_process() -> bool:
    """Under torchrun every rank runs the command; only rank 0 writes, so only it checks and locks
    the output (the others would race its writes; if it refuses, torchrun stops them)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Claim:
    """A checked, locked output path; a context manager that releases the lock on exit."""

    path: Path
    lock: FileLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output(
    path: str | os.PathLike,
    flag: str = "--output",
    overwrite: bool = False,
    reuse: bool = False,
    replaces: bool = True,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> Claim:
    """Check that `path` may receive this command's output and lock it; a UsageError otherwise.

    `reuse`: an earlier sparsefit output there is continued (a resumed fine-tune, a recipe rerun);
    `overwrite`: it is replaced. `replaces`: the command publishes `path` as a whole (all but a
    recipe run), so it may hold nothing sparsefit did not write. `inputs` are model specs; a local
    one may not live inside `path`, and `path` may not lie in sparsefit's cache (builtin models).
    The lock comes before the checks of what `path` holds: a second run is told the output is busy.
    """
    given = str(path)
    path = resolve(path)
    if not is_main_process():
        return Claim(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} '{given}' is an existing file; pass a directory path")
    forbidden = {Path("/"): "the filesystem root", Path.home().resolve(): "your home directory"}
    forbidden[Path.cwd().resolve()] = "the current directory"
    if path in forbidden:
        raise UsageError(f"{flag} '{given}' is {forbidden[path]}; pass a new directory, e.g. {flag} out/model")
    cache = resolve(cache_root())  # builtin models live here
    if path == cache or cache in path.parents:
        raise UsageError(f"{flag} '{given}' is inside sparsefit's cache ({cache}); write the output elsewhere")
    for spec in inputs:
        if spec is None or not Path(str(spec)).expanduser().exists():
            continue  # a builtin name or a hub id: no local directory of the user's
        source = resolve(spec)
        if source == path or path in source.parents:
            raise UsageError(f"{flag} '{given}' contains the input model '{spec}'; write the output elsewhere")
    busy = f"{flag} '{given}' is in use by another sparsefit run; wait for it or choose another output"
    claim = Claim(path, acquire_lock(str(path), busy))
    try:
        clean_stale(path)  # what a killed run left beside the output, and inside it
        if is_ours(path):
            clean_stale_in(path)
        if path.is_dir() and not is_empty_dir(path):
            if not is_ours(path):
                raise UsageError(
                    f"{flag} '{given}' is a non-empty directory sparsefit did not write (or an older sparsefit "
                    "wrote before outputs were marked); pass a new or empty directory"
                )
            if not (overwrite or reuse):
                raise UsageError(f"{flag} '{given}' holds an earlier sparsefit output; pass --overwrite to replace it")
            if replaces:
                check_replaceable(path)  # files a user added to an earlier output are never deleted
    except BaseException:
        claim.release()
        raise
    return claim


def check_writable_file(
    path: str | os.PathLike | None, flag: str, output: str | os.PathLike | None = None, inputs: tuple = ()
) -> None:
    """A file the command writes at its end (`--json`): fail now, not after the work. It may not
    land inside the command's `output` directory or a local input model (it would replace their files)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} '{path}' is a directory; pass a file path such as result.json")
    target = resolve(p)
    places = [(output, "the output directory")] if output is not None else []
    places += [
        (spec, "the input model") for spec in inputs if spec is not None and Path(str(spec)).expanduser().exists()
    ]
    for place, what in places:
        root = resolve(place)
        if target == root or root in target.parents:
            raise UsageError(f"{flag} '{path}' lies inside {what} '{place}'; write it elsewhere")
    probe = p.parent
    while not probe.exists():
        probe = probe.parent
    try:  # a real file, not os.access: root passes every permission check but not a read-only mount
        if not probe.is_dir():
            raise NotADirectoryError(probe)
        tempfile.TemporaryFile(dir=probe).close()
    except OSError:
        raise UsageError(f"{flag} '{path}': cannot write into '{probe}'; pass a writable location") from None
