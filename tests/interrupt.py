"""Ctrl-C for tests: interrupt a running `vl3 batch` once its first record is written.

    stderr, seconds = interrupt_after_first_record(process, out)   # seconds: from SIGINT to exit
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def interrupt_after_first_record(p: subprocess.Popen, out: Path, timeout: float = 120) -> tuple[str, float]:
    deadline = time.monotonic() + timeout
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = p.communicate(timeout=60)
    return stderr, time.monotonic() - sent
