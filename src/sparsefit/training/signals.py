"""Graceful stop: SIGTERM or Ctrl-C during fine-tuning finishes the current step, checkpoints, exits.

The first signal only sets a flag the loop reads after each step. A repeat within `GRACE` seconds
counts as the same request (SLURM signals every process of a job and torchrun forwards the signal
again); a later one acts at once (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process), so a
stuck run can still be stopped. A signal the parent process set to be ignored stays ignored. The
previous handlers come back when the block ends; outside the main thread nothing is installed.

Under torchrun, a signal to the launcher reaches every worker, and the launcher kills them after
its shutdown timeout (30 s by default): a checkpoint must fit in it, or be frequent enough.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

GRACE = 2.0  # seconds in which a repeated signal is the same request


class StopRequest:
    """A context manager that records the first SIGTERM / SIGINT instead of dying from it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            name = signal.Signals(signum).name
            print(f"\n{name} received: finishing this step and writing a checkpoint (again to stop now)", flush=True)
            return
        if time.monotonic() - self._first < GRACE:
            return
        self._restore(signum)
        signal.raise_signal(signum)

    def _restore(self, signum: int) -> None:
        previous = self._previous.pop(signum, signal.SIG_DFL)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)  # None: set outside Python

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s in list(self._previous):
            self._restore(s)
