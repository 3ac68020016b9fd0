"""sparsefit's cache folder and the named locks kept in it.

Both the builtin models (filled once, under a lock) and the output checks (one run per output
path) use these, so they sit below both. Locks are files under `$SPARSEFIT_CACHE/locks`, keyed
by a hash of their name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from filelock import FileLock, Timeout

from sparsefit.atomic import make_dir
from sparsefit.errors import UsageError


def cache_root() -> Path:
    """`SPARSEFIT_CACHE`, default `~/.cache/sparsefit`."""
    return Path(os.environ.get("SPARSEFIT_CACHE", Path.home() / ".cache" / "sparsefit")).expanduser()


def _lock_file(key: str) -> Path:
    try:
        folder = make_dir(cache_root() / "locks")
    except OSError as err:
        raise UsageError(
            f"cannot create the lock folder {cache_root() / 'locks'} ({err.strerror}); "
            "set SPARSEFIT_CACHE to a writable folder"
        ) from None
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lock"


def acquire_lock(key: str, busy: str, wait: bool = False) -> FileLock:
    """Take the exclusive lock named `key` (re-entrant within a process; `release()` it when done).

    Another process holding it: a UsageError with `busy` at once, or, with `wait`, a wait for it.
    """
    lock = FileLock(_lock_file(key), timeout=0, is_singleton=True, thread_local=False)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise UsageError(busy) from None
    return lock
