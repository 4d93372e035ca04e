"""Signals for tests: interrupt a running `vl3` once it has written something.

    stderr, seconds = interrupt_after_first_record(process, out)   # seconds: from SIGINT to exit
    stderr, seconds = signal_when(process, lambda: out.exists(), signal.SIGTERM)
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def signal_when(p: subprocess.Popen, ready: Callable[[], bool], sig: int = signal.SIGINT, timeout: float = 120) -> tuple[str, float]:
    """Send `sig` to `p` once `ready()` is true; its stderr and the seconds from the signal to its exit."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(sig)
    sent = time.monotonic()
    _, stderr = p.communicate(timeout=60)
    return stderr, time.monotonic() - sent


def interrupt_after_first_record(p: subprocess.Popen, out: Path, timeout: float = 120) -> tuple[str, float]:
    return signal_when(p, lambda: out.exists() and out.read_text().count("\n") >= 1, signal.SIGINT, timeout)
