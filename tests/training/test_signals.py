"""StopRequest: the first signal is a request, a quick repeat is the same one, a late one acts."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sparsefit.training.signals import StopRequest

pytestmark = pytest.mark.usefixtures("default_signals")  # SIGINT may start ignored


def test_a_signal_is_a_request_and_a_quick_repeat_is_the_same_one():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # as SLURM and torchrun both deliver it
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=os.environ.copy())  # fmt: skip


def test_a_late_repeat_stops_at_once_and_an_ignored_signal_stays_ignored():
    late = run("""
        import signal, time
        from sparsefit.training import signals
        signals.GRACE = 0.0
        with signals.StopRequest():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.01)
            signal.raise_signal(signal.SIGTERM)
            print("survived")
    """)
    assert late.returncode == -signal.SIGTERM and "survived" not in late.stdout
    ignored = run("""
        import signal
        from sparsefit.training.signals import StopRequest
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)
            print("requested" if stop.requested else "ignored")
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
    """)
    assert ignored.returncode == 0 and ignored.stdout.split() == ["ignored", "True"]
