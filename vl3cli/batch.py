"""Batch runs over many files: input expansion, sharding, resume, the item loop, progress.

- Inputs: folders (walked recursively, filtered by extension), files (always taken), glob
  patterns (filtered by extension) and `--files-from` lists (one path per line, taken as is;
  `-` reads stdin). The list is de-duplicated and sorted, so every run and every machine sees
  the same order.
- `--shard K/N` (0 <= K < N) keeps the paths whose stable hash (BLAKE2b of the path string)
  is K modulo N: N machines given the same inputs split them without overlap or gaps, and a
  file keeps its shard when the dataset grows.
- The output JSONL is the run's state. One line is appended and flushed per item. On start
  an unterminated last line (a crash mid-write) is cut off; items that already have a record
  are skipped before any model work (`resume`); `retry-failed` also redoes items whose record
  is an error (their old error lines are dropped, so each item keeps one record);
  `overwrite` starts an empty file.
- SIGINT / SIGTERM: the first one stops at the next check (between tokens, between items),
  abandoning the unfinished item, which the next run redoes; a second one stops at once,
  except while a line is being written. The file is always valid JSONL.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .errors import UsageError
from .fetch import is_url
from .output import Result, error_result, to_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif", "avif")
VIDEO_EXTS = ("mp4", "mov", "mkv", "avi", "webm", "m4v", "mpg", "mpeg", "wmv", "flv", "3gp", "ts")
DEFAULT_EXTS = IMAGE_EXTS + VIDEO_EXTS
MODES = ("resume", "retry-failed", "overwrite")


def parse_exts(values: Iterable[str] | None) -> frozenset[str]:
    """`--ext mp4,mov --ext .jpg` -> {"mp4", "mov", "jpg"}; nothing given -> the defaults."""
    exts = {e.strip().lstrip(".").lower() for v in values or () for e in v.split(",") if e.strip()}
    return frozenset(exts or DEFAULT_EXTS)


def _has_ext(name: str, exts: frozenset[str]) -> bool:
    return name.rpartition(".")[2].lower() in exts and "." in name


def _walk(folder: str, exts: frozenset[str]) -> Iterable[str]:
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (os.path.join(root, f) for f in files if not f.startswith(".") and _has_ext(f, exts))


def expand_inputs(inputs: Iterable[str], files_from: str | None, exts: frozenset[str], stdin: IO[str] | None = None) -> list[str]:
    """The sorted, de-duplicated list of files to process. An input matching nothing is a UsageError."""
    found: set[str] = set()
    for item in inputs:
        if is_url(item):
            found.add(item)
        elif os.path.isdir(item):
            found.update(_walk(item, exts))
        elif os.path.isfile(item):
            found.add(item)
        elif glob.has_magic(item):
            matches = [m for m in glob.glob(item, recursive=True) if os.path.isfile(m) and _has_ext(m, exts)]
            if not matches:
                raise UsageError(f"no {'/'.join(sorted(exts))} files match {item}")
            found.update(matches)
        else:
            raise UsageError(f"no such file or folder: {item}")
    if files_from is not None:
        try:
            lines = (stdin or sys.stdin).read().splitlines() if files_from == "-" else Path(files_from).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read --files-from {files_from}: {e.strerror}") from e
        found.update(line.strip() for line in lines if line.strip())
    return sorted({p if is_url(p) else os.path.normpath(p) for p in found})  # normpath would mangle URLs


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"K/N" -> (K, N) with 0 <= K < N."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise UsageError(f"--shard {text}: expected K/N with 0 <= K < N, e.g. 0/4 ... 3/4 (Slurm: $SLURM_ARRAY_TASK_ID/N)")
    return int(k), int(n)


def in_shard(path: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard[1] == shard[0]


def read_records(out: Path) -> tuple[dict[str, bool], int]:
    """{path: has a successful record} from an existing JSONL, and the number of bad lines.

    An unterminated last line (a crash mid-write) is cut off the file so appending stays valid.
    """
    if not out.exists():
        return {}, 0
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    status: dict[str, bool] = {}
    bad = 0
    for line in data.splitlines():
        try:
            record = json.loads(line)
            path = record["path"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        status[path] = status.get(path, False) or record.get("error") is None
    return status, bad


def drop_failed(out: Path, paths: set[str]) -> None:
    """Rewrite `out` without the records of `paths` (atomically: temp file + rename)."""
    tmp = out.with_name(out.name + ".tmp")
    with open(out, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for line in src:
            try:
                if json.loads(line).get("path") in paths:
                    continue
            except (ValueError, AttributeError):
                continue
            dst.write(line)
    os.replace(tmp, out)


@dataclass
class Plan:
    todo: list[str]
    done: int = 0  # skipped: already have a result
    failed_before: int = 0  # skipped: have an error record (not retried)


def plan(items: list[str], out: Path | None, mode: str) -> Plan:
    """Which items to run given the existing output file and the mode; prepares the file."""
    if out is None:
        return Plan(list(items))
    out.touch()  # an empty shard still leaves its (empty) file; a bad --out fails before the model loads
    if mode == "overwrite":
        out.write_bytes(b"")
        return Plan(list(items))
    status, bad = read_records(out)
    if bad:
        print(f"warning: {out}: ignored {bad} unreadable line(s)", file=sys.stderr)
    done = [p for p in items if status.get(p)]
    failed = [p for p in items if status.get(p) is False]
    if mode == "retry-failed":
        if failed:
            drop_failed(out, set(failed))
        return Plan([p for p in items if not status.get(p)], done=len(done))
    return Plan([p for p in items if p not in status], done=len(done), failed_before=len(failed))


class StopSignal:
    """SIGINT/SIGTERM handling for the batch loop (a context manager).

    The first signal sets `requested`; `check()` (called by the pipeline between tokens and
    stages) then raises KeyboardInterrupt. A second signal raises at once unless a line is
    being written (`writing`), so the output never holds half a record.
    """

    def __init__(self):
        self.requested = False
        self.writing = False
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and not self.writing:
            raise KeyboardInterrupt
        if not self.requested:
            print("\nStopping: the current item is abandoned (press Ctrl-C again to stop at once).", file=sys.stderr)
        self.requested = True

    def check(self) -> None:
        if self.requested and not self.writing:
            raise KeyboardInterrupt


@dataclass
class Summary:
    total: int  # items selected (after sharding)
    done_before: int
    failed_before: int
    ok: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.failed_before else 0

    def line(self) -> str:
        left = self.total - self.done_before - self.failed_before - self.ok - self.failed
        parts = [f"{self.ok} ok", f"{self.failed} failed"]
        if self.done_before:
            parts.append(f"{self.done_before} already done")
        if self.failed_before:
            parts.append(f"{self.failed_before} failed earlier (use --retry-failed)")
        if left:
            parts.append(f"{left} left")
        head = "Interrupted" if self.interrupted else "Done"
        return f"{head}: {self.total} items: " + ", ".join(parts) + f" in {self.seconds:.1f}s"


Process = Callable[[str, Callable[[], None]], Result]


def run_items(
    todo: list[str],
    process: Process,
    sink: IO[str],
    summary: Summary,
    stop: StopSignal,
    error_fields: dict | None = None,
    on_item: Callable[[str, Result], None] | None = None,
    debug: bool = False,
) -> Summary:
    """Process `todo` one item at a time; see `write_results`.

    A failing item becomes an error record and the loop goes on.
    """

    def results() -> Iterator[Result]:
        for path in todo:
            stop.check()
            try:
                yield process(path, stop.check)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 -- a bad item must not end a 100,000-file run
                if debug:
                    import traceback

                    traceback.print_exc()
                yield error_result(path, e, **(error_fields or {}))

    return write_results(results(), sink, summary, stop, on_item)


def write_results(
    results: Iterable[Result],
    sink: IO[str],
    summary: Summary,
    stop: StopSignal,
    on_item: Callable[[str, Result], None] | None = None,
) -> Summary:
    """Append one JSONL line per result, flushed at once, in the order the results come.

    KeyboardInterrupt (from `stop.check()` inside the producer, or a second Ctrl-C) abandons the
    unfinished items and ends the loop; every line written is whole.
    """
    start = time.perf_counter()
    try:
        for result in results:
            stop.writing = True
            sink.write(to_json(result) + "\n")
            sink.flush()
            stop.writing = False
            if result.ok:
                summary.ok += 1
            else:
                summary.failed += 1
            if on_item:
                on_item(result.path, result)
            stop.check()
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.seconds = time.perf_counter() - start
    return summary


def progress_bar(total: int, completed: int):
    """A Rich progress bar on stderr: counts, ok/failed, elapsed and ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]} failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task("vl3 batch", total=total, completed=completed, ok=0, failed=0)
    return progress, task
