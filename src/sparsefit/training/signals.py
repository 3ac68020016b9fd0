"""Graceful stop: SIGTERM or Ctrl-C during fine-tuning finishes the current step, checkpoints, exits.

The first signal only sets a flag the loop reads after each step; a second one acts at once
(Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process), so a stuck run can still be stopped.
The previous handlers come back when the block ends. Outside the main thread nothing is installed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """A context manager that records the first SIGTERM / SIGINT instead of dying from it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            print(f"\n{name} received: finishing this step and writing a checkpoint (again to stop now)", flush=True)
            return
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
