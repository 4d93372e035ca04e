"""The process around a command: SIGTERM / SIGHUP stopping it as Ctrl-C does, standard streams
closed at start-up, and which threads the exit waits for (used by app.main and app.run)."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading

from .. import hub
from ..errors import Vl3Error


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt so that the same clean-up
    runs: the answers finished so far are kept (a temporary file renamed into place, a Parquet
    file completed); the exit status is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Terminations:
    """While a command runs, SIGTERM and SIGHUP raise `Terminated` (a signal that is ignored, as
    under `nohup`, stays ignored); `received` is the first one. Typer turns a KeyboardInterrupt
    into exit status 130, which `main()` corrects to 128 + this signal's number."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> _Terminations:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    self.previous[sig] = signal.signal(sig, self._raise)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _raise(self, signum, frame) -> None:
        self.received = self.received or signum
        raise Terminated(signum)


def _interrupted(e: BaseException | None) -> int:
    """The exit status of a run stopped by a signal (`e`: its KeyboardInterrupt), after one line on stderr."""
    signum = getattr(e, "signum", signal.SIGINT)
    print("Interrupted." if signum == signal.SIGINT else f"Interrupted ({signal.Signals(signum).name}).", file=sys.stderr)
    return 128 + signum


class ClosedStream(io.TextIOBase):
    """sys.stdin / sys.stdout of a vl3 started with that stream closed (`<&-`, `>&-`): using it is
    one clear error; commands that need it check with `_require` before the model loads."""

    def __init__(self, what: str):
        self.what = what

    def _closed(self, *_):
        raise Vl3Error(f"{self.what} is closed")

    read = readline = write = _closed

    def flush(self) -> None:
        pass


def _standard_streams() -> None:
    """A standard stream closed at start-up gets /dev/null on its descriptor, so that no file vl3
    opens takes descriptor 0, 1 or 2 (where a library's stray output would land in it), and a
    `ClosedStream` in `sys` (stderr: /dev/null, as there is nowhere to report to)."""
    for fd, name, what in ((0, "stdin", "standard input"), (1, "stdout", "standard output"), (2, "stderr", "standard error")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(os.devnull, "w") if fd == 2 else ClosedStream(what))  # noqa: SIM115 -- for the process's life


def _require(name: str) -> None:
    """Refuse (before the model loads) a command whose results or input need stdout / stdin when it is closed."""
    stream = getattr(sys, name)
    if stream is None or isinstance(stream, ClosedStream):
        raise Vl3Error(f"{'standard output' if name == 'stdout' else 'standard input'} is closed")


READER_THREADS = "vl3-media"  # the name prefix of pipeline.Loop's media reader threads


def _must_wait_for(thread: threading.Thread) -> bool:
    """Whether the exit waits for `thread`: not for a daemon, nor for a media reader still decoding
    a file whose answers are no longer wanted (Ctrl-C during a long decode), nor for anything once
    Ctrl-C stopped a model download (its pool's threads; nothing else runs before the model is there)."""
    if hub.ABANDONED.is_set():
        return False
    return thread is not threading.current_thread() and not thread.daemon and not thread.name.startswith(READER_THREADS)
