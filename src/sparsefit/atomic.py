"""Durable, atomic writes: a kill at any instant leaves the old state or the new one, never neither.

A file is written under a temporary name beside its target, flushed and fsync'ed, renamed over
the target, and the parent directory is fsync'ed so the rename itself survives a power loss.
A directory is built in a hidden staging sibling, fsync'ed file by file, and published in one
step: an atomic exchange with the old directory (Linux `renameat2(RENAME_EXCHANGE)`), after which
the old copy is deleted. Where the exchange is unavailable, the old directory is renamed aside
first; `clean_stale` (run when a command claims its output) puts it back if a kill came between
the two renames, and deletes what killed runs left behind (temporary files, staging folders,
folders half deleted: a folder is deleted by renaming it out of sight first).

Every directory sparsefit writes holds a `.sparsefit` marker listing the entries it wrote there.
A directory holding anything else is never replaced or deleted here: those are the user's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sparsefit.errors import UsageError

MARKER = ".sparsefit"
# Every name sparsefit gives a file or folder on its way in or out is `.TARGET.KIND-RANDOM`:
# a temporary file, a folder being built, an old copy moved aside, a folder being deleted.
_STAGING, _OLD, _TRASH, _TMP = ".staging-", ".old-", ".trash-", ".tmp-"
_TRANSIENT = re.compile(r"\.(?P<target>.+)\.(?P<kind>staging|old|trash|tmp)-[A-Za-z0-9_]+")


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def crash_point(phase: str) -> None:
    """Fault injection for the kill tests: `SPARSEFIT_CRASH_AT=PHASE[@N]` SIGKILLs this process the
    N-th time (default 1st) it reaches `phase`. Costs one environment lookup otherwise."""
    spec = os.environ.get("SPARSEFIT_CRASH_AT")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != phase:
        return
    count = _crash_counts.get(phase, 0) + 1
    _crash_counts[phase] = count
    if count == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; their renames are as durable as they get
        pass
    finally:
        os.close(fd)


def seal_tree(root: str | os.PathLike) -> None:
    """Give every file and directory below `root` the umask's permissions (some writers create
    0600 files) and fsync them: files first, then directories bottom-up."""
    umask = current_umask()
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):  # a link has no permissions of its own (and may point outside)
                continue
            os.chmod(path, 0o666 & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(dirpath, 0o777 & ~umask)
        fsync_dir(dirpath)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` atomically and durably; the file gets the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path`, atomically and durably."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The marker of a directory sparsefit wrote (None when there is none or it does not parse)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("entries"), list) else None


def mark(directory: str | os.PathLike, *entries: str) -> None:
    """Mark `directory` as sparsefit's and record `entries` (top-level names) as written by it,
    beside those recorded before. Only recorded entries are ever replaced or deleted."""
    from sparsefit import __version__

    known = (read_marker(directory) or {}).get("entries", [])
    names = sorted(set(known) | set(entries))
    write_json(Path(directory) / MARKER, {"written_by": "sparsefit", "version": __version__, "entries": names})


def is_ours(path: str | os.PathLike) -> bool:
    return read_marker(path) is not None


def is_empty_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and not any(Path(path).iterdir())


def foreign_entries(directory: str | os.PathLike) -> list[str]:
    """Top-level names in `directory` that sparsefit did not record writing (all of them without a
    marker); a killed write's leftovers of a recorded entry are sparsefit's too."""
    known = set((read_marker(directory) or {}).get("entries", [])) | {MARKER}

    def ours(name: str) -> bool:
        transient = _TRANSIENT.fullmatch(name)
        return name in known or (transient is not None and transient["target"] in known)

    return sorted(p.name for p in Path(directory).iterdir() if not ours(p.name))


def check_replaceable(path: str | os.PathLike) -> None:
    """A UsageError unless `path` is absent, an empty directory, or holds only what sparsefit wrote."""
    path = Path(path)
    if not path.exists() or is_empty_dir(path):
        return
    if not path.is_dir():
        raise UsageError(f"refusing to replace '{path}': it is a file; choose another output path")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(
            f"refusing to replace '{path}': it holds files sparsefit did not write ({shown}); "
            "move them out or choose another output path"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish_dir(stage: Path, final: Path, label: str = "dir") -> None:
    """Put the complete, fsync'ed directory `stage` at `final` in one step; delete what was there.

    `label` names the crash points (`LABEL:staged`, `LABEL:exchanged`, `LABEL:published`)."""
    crash_point(f"{label}:staged")
    if not final.exists():
        os.replace(stage, final)
        fsync_dir(final.parent)
    elif _exchange(stage, final):
        fsync_dir(final.parent)
        crash_point(f"{label}:exchanged")
        shutil.rmtree(stage)  # now the old directory
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_OLD}", dir=final.parent))
        os.replace(final, old / "d")  # a kill from here until the next fsync: clean_stale restores it
        os.replace(stage, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    crash_point(f"{label}:published")


def discard_dir(path: str | os.PathLike) -> None:
    """Delete a folder sparsefit wrote: one rename takes it out of sight, then it is removed, so a
    kill never leaves a half-deleted folder under its name (`clean_stale` finishes the removal)."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}{_TRASH}{secrets.token_hex(4)}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(final: str | os.PathLike) -> None:
    """Finish what killed runs left around `final`: delete its temporary files, staging folders and
    folders being deleted; put back an old copy a killed publish had moved aside (only when `final`
    itself is missing), else delete that copy."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for p in sorted(final.parent.glob(f".{glob.escape(final.name)}.*-*")):
        transient = _TRANSIENT.fullmatch(p.name)
        if transient is None or transient["target"] != final.name:
            continue
        if transient["kind"] == "old" and not final.exists() and (p / "d").is_dir():
            os.replace(p / "d", final)
            fsync_dir(final.parent)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def clean_stale_in(directory: str | os.PathLike) -> None:
    """`clean_stale` for every target in `directory` (a run directory, a fine-tune's checkpoints)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    targets = {m["target"] for p in directory.iterdir() if (m := _TRANSIENT.fullmatch(p.name))}
    for target in sorted(targets):
        clean_stale(directory / target)


def remove_old_temporaries(directory: str | os.PathLike, older_than: float) -> None:
    """Delete the temporary files killed `write_bytes` calls left in `directory`, once older than
    `older_than` seconds: a younger one may be another process's write in progress, which
    `clean_stale_in` would break (it serves folders one command owns)."""
    now = time.time()
    for p in Path(directory).iterdir():
        transient = _TRANSIENT.fullmatch(p.name)
        if transient is not None and transient["kind"] == "tmp":
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than:
                    p.unlink()


def make_dir(path: str | os.PathLike) -> Path:
    """mkdir -p with the umask's permissions, durable (the new entries are fsync'ed)."""
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in reversed(missing):
        fsync_dir(p.parent)
    return path


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, carry: Iterable[str] = (), label: str = "dir") -> Iterator[Path]:
    """Yield an empty staging directory that replaces `final` only if the block succeeds.

    The staging directory gets the marker and the umask's permissions; `carry` names files or
    folders of the existing `final` to keep (files hard-linked into the new directory, so the old
    one stays whole until the exchange; a folder's links stay links). A `final` holding files
    sparsefit did not write is refused before any work. `label` names the crash points of the
    publish (see `publish_dir`).
    """
    final = Path(final)
    check_replaceable(final)
    make_dir(final.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}{_STAGING}", dir=final.parent))
    try:
        yield stage
        for name in carry:
            src = final / name
            if (stage / name).exists():
                continue
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, stage / name, symlinks=True, copy_function=_link_or_copy)
            elif src.is_file():
                _link_or_copy(src, stage / name)
        mark(stage, *(p.name for p in stage.iterdir()))
        seal_tree(stage)  # mkdtemp made the folder 0700: it gets the umask's permissions here
        publish_dir(stage, final, label)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
