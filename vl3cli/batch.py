"""Batch runs over many items: resume, the writing loop, signals, progress.

Its items come from inputs.py (folders, lists, manifests, shards); cli/batch.py joins the two.

- The output JSONL is the run's state (outfile.py says which files are ours). One line is
  appended and flushed per record. Records are keyed by `record_key` (item, prompt, options,
  system prompt, model, segment): items whose key already has a record are skipped before any
  model work (`resume`); `retry-failed` also redoes items whose record is an error (their old
  error lines are dropped, so each item keeps one record); `overwrite` starts an empty file.
  A stream (`--out -`, a FIFO) is written to and never read: no resume.
- SIGINT / SIGTERM / SIGHUP: the first one stops at the next check (between tokens, between
  items), abandoning the unfinished items, which the next run redoes; a second one stops at
  once, except while a line is being written; while the run only waits (for records from a Ray
  cluster, `StopSignal.waiting`) the first one stops at once. The output is always valid (a
  Parquet file is completed), and the exit status is 128 + the first signal's number.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .inputs import media_key
from .outfile import Sink, Target, read_records, rewrite_without
from .output import Result

MODES = ("resume", "retry-failed", "overwrite")


def record_key(record: dict) -> str:
    """What makes two records answers to the same request: the item (its id, else its path), the
    request's options (prompt as given, decoding, media), the system prompt, the model and its
    quantization, and the segment. The same function keys planned items (as would-be records).
    The scene threshold counts only with `--segments scenes`: older vl3 stored any value given
    without it (now refused), and it changed nothing."""
    item = record.get("id")
    if item is None:
        item = [media_key(m) for m in record.get("media") or ([record["path"]] if record.get("path") is not None else [])]
    options = record.get("options")
    if isinstance(options, dict) and options.get("segments") != "scenes":
        options = {k: v for k, v in options.items() if k != "scene_threshold"}
    parts = [item, options, record.get("system"), model_key(record.get("model")), record.get("quantize"),
             record.get("segment_start"), record.get("segment_end")]  # fmt: skip
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


def model_key(model: str | None) -> str | None:
    """What resume compares of a record's `model`: a local folder by its real path (`ckpt`,
    `ckpt/`, `./ckpt`, `/abs/ckpt` and a link to it are one model, in records of any vl3
    version, as long as the folder is where the label says from here); a Hub id as written."""
    if isinstance(model, str) and os.path.isdir(os.path.expanduser(model)):
        return os.path.realpath(os.path.expanduser(model))
    return model


@dataclass
class Plan:
    todo: list  # the items to run, in order
    done: int = 0  # skipped: already have a result
    failed_before: int = 0  # skipped: have an error record (not retried)


def plan(items: list[tuple[str, object]], target: Target, mode: str) -> Plan:
    """Which of `items` ((key, item) pairs) to run given `target`'s records and the mode.

    Only a regular file can be resumed; a stream (stdout, FIFO, device) gets every item. A file
    that is not ours is refused (unless `overwrite`). `retry-failed` drops the old error records
    of the items it redoes, so each item keeps one record. Items are pairs, not a dict, so that
    two items with one key are both run (a dict would keep one of them silently).
    """
    if not target.regular:
        return Plan([item for _, item in items])
    if mode == "overwrite" or not target.path.exists():
        return Plan([item for _, item in items])
    status: dict[str, bool] = {}  # key -> has a successful record
    for record in read_records(target.path):
        key = record_key(record)
        status[key] = status.get(key, False) or record.get("error") is None
    done = [k for k, _ in items if status.get(k)]
    failed = [k for k, _ in items if status.get(k) is False]
    if mode == "retry-failed":
        if failed:
            redo = set(failed)
            rewrite_without(target.path, lambda record: record.get("error") is not None and record_key(record) in redo)
        return Plan([item for k, item in items if not status.get(k)], done=len(done))
    return Plan([item for k, item in items if k not in status], done=len(done), failed_before=len(failed))


def plan_segments(items: list[tuple[str, object]], target: Target, mode: str) -> Plan:
    """`plan` for a run that cuts videos into segments: records are per segment. An item is done
    as a whole when its records (with `retry-failed`, its successful ones) reach from --start to
    --end or the video's end without a gap (`_tiled`): it is skipped without reading its file
    again. Otherwise `todo` holds (item, segments to skip) pairs: the (start, end) windows that
    already have a record (with `retry-failed`, a successful one; their error records are
    dropped), and its file is read to find the rest. An item whose file failed as a whole (a
    record without a segment) counts as failed earlier, unless `retry-failed`."""
    if not target.regular or mode == "overwrite" or not target.path.exists():
        return Plan([(item, frozenset()) for _, item in items])
    done: dict[str, set] = {k: set() for k, _ in items}
    failed: dict[str, set] = {k: set() for k, _ in items}
    reach: dict[str, tuple[float, float]] = {}  # where each item's segments must run: (start, end) in seconds
    for record in read_records(target.path):
        key = record_key({**record, "segment_start": None, "segment_end": None})
        if key in done:
            span = (record.get("segment_start"), record.get("segment_end"))
            (done if record.get("error") is None else failed)[key].add(span)
            if span[0] is not None and isinstance(record.get("duration"), (int, float)):
                reach[key] = _reach(record, reach.get(key))
    whole = (None, None)  # a record without a segment: an image, or a file that failed before any segment
    if mode == "retry-failed":
        retried = {k for k, spans in failed.items() if spans}
        if retried:
            rewrite_without(target.path, lambda r: r.get("error") is not None
                            and record_key({**r, "segment_start": None, "segment_end": None}) in retried)  # fmt: skip
        todo = [(item, frozenset(done[k] - {whole})) for k, item in items
                if whole not in done[k] and not _tiled(done[k], reach.get(k))]  # fmt: skip
        return Plan(todo, done=sum(len(v) for v in done.values()))
    todo = [(item, frozenset((done[k] | failed[k]) - {whole})) for k, item in items
            if whole not in done[k] | failed[k] and not _tiled(done[k] | failed[k], reach.get(k))]  # fmt: skip
    return Plan(todo, done=sum(len(v) for v in done.values()), failed_before=sum(len(v) for v in failed.values()))


def _reach(record: dict, before: tuple[float, float] | None) -> tuple[float, float]:
    """The stretch an item's segments tile: from --start to --end or the video's end. A file
    found cut short records its shorter duration on the last segment, so the least one counts."""
    options = record.get("options") or {}
    start = options.get("start") or 0.0
    end = min(record["duration"], options["end"]) if isinstance(options.get("end"), (int, float)) else record["duration"]
    return (start, end) if before is None else (start, min(end, before[1]))


def _tiled(spans: set, reach: tuple[float, float] | None, eps: float = 1e-6) -> bool:
    """Whether `spans` (start, end) cover `reach` end to end without a gap: every segment of the
    video has its record, so a resumed run need not read the file again (segments tile their
    stretch exactly: each starts where the one before ends)."""
    if reach is None:
        return False
    at, end = reach
    for s, e in sorted(span for span in spans if span[0] is not None):
        if abs(s - at) > eps:
            return False
        at = e
    return at >= end - eps


class StopSignal:
    """SIGINT / SIGTERM / SIGHUP handling for the batch loop (a context manager); a signal that is
    ignored (`nohup`, a background job) stays ignored.

    The first signal sets `requested`; `check()` (called by the pipeline between tokens and
    stages) then raises KeyboardInterrupt. A second signal raises at once unless a line is
    being written (`writing`), so the output never holds half a record. Inside `waiting()` (a
    caller blocked on others' work, such as the Ray engine waiting for records) the first
    signal raises at once too.
    """

    def __init__(self):
        self.requested = False
        self.writing = False
        self.blocked = False  # inside waiting()
        self.signum = signal.SIGINT  # the first signal received
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signum = signum
        if (self.requested or self.blocked) and not self.writing:
            self.requested = True
            raise KeyboardInterrupt
        if not self.requested:
            why = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
            print(f"\nStopping{why}: the current item is abandoned (press Ctrl-C again to stop at once).", file=sys.stderr)
        self.requested = True

    def check(self) -> None:
        if self.requested and not self.writing:
            raise KeyboardInterrupt

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """A block in which the caller only waits: a signal raises KeyboardInterrupt there at once."""
        self.check()
        self.blocked = True
        try:
            yield
        finally:
            self.blocked = False


@dataclass
class Summary:
    total: int  # items selected (after sharding)
    done_before: int
    failed_before: int
    ok: int = 0
    failed: int = 0
    interrupted: bool = False
    signum: int = signal.SIGINT  # what interrupted the run
    seconds: float = 0.0
    segments: bool = False  # records are per segment: counts are of segments, the total is of files

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.signum
        return 1 if self.failed or self.failed_before else 0

    def line(self) -> str:
        left = 0 if self.segments else self.total - self.done_before - self.failed_before - self.ok - self.failed
        parts = [f"{self.ok} ok", f"{self.failed} failed"]
        if self.done_before:
            parts.append(f"{self.done_before} already done")
        if self.failed_before:
            parts.append(f"{self.failed_before} failed earlier (use --retry-failed)")
        if left:
            parts.append(f"{left} left")
        head = "Interrupted" if self.interrupted else "Done"
        items = "item" if self.total == 1 else "items"
        if self.segments:
            items += ", segments"
        return f"{head}: {self.total} {items}: " + ", ".join(parts) + f" in {self.seconds:.1f}s"


def write_results(
    results: Iterable[Result],
    sink: Sink,
    summary: Summary,
    stop: StopSignal,
    on_item: Callable[[Result], None] | None = None,
) -> Summary:
    """Append one record per result (a JSONL line flushed at once, or a Parquet row), in the order the results come.

    KeyboardInterrupt (from `stop.check()` inside the producer, or a second Ctrl-C) abandons the
    unfinished items and ends the loop; every line written is whole.
    """
    start = time.perf_counter()
    try:
        for result in results:
            stop.writing = True
            result = sink.write_record(result)  # an error record when it could not be written as it was
            stop.writing = False
            if result.ok:
                summary.ok += 1
            else:
                summary.failed += 1
            if on_item:
                on_item(result)
            stop.check()
    except KeyboardInterrupt as e:
        summary.interrupted = True
        summary.signum = stop.signum if stop.requested else getattr(e, "signum", signal.SIGINT)
    summary.seconds = time.perf_counter() - start
    return summary


def progress_bar(total: int | None, completed: int):
    """A Rich progress bar on stderr (a terminal only; logs get the summary line): counts,
    ok/failed, elapsed and ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]} failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    task = progress.add_task("vl3 batch", total=total, completed=completed, ok=0, failed=0)
    return progress, task
