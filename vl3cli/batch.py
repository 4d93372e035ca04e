"""Batch runs over many files: input expansion, sharding, resume, the writing loop, progress.

- Inputs: folders (walked recursively, following links but never entering a directory twice,
  filtered by extension), files (always taken), glob patterns (filtered by extension), URLs,
  and `--files-from` lists (one path or URL per line, taken as is; `-` reads stdin). An input
  that yields nothing is a usage error. The list is de-duplicated (by real path, resolved as the
  OS opens the file: `a.png`, `./a.png`, `/abs/a.png` and a link to it are one item, spelled
  the way that sorts first) and sorted, so every run and machine sees the same order.
- Lists (`--files-from`, `--manifest`) are split at "\n" only (a "\r" before it dropped), never
  at U+2028, U+0085 and the other separators `str.splitlines` knows, which JSON strings and file
  names may hold; bytes that are not UTF-8 are read with surrogateescape, as Python reads file
  names and stdin (a manifest line holding some is that line's error record).
- `--shard K/N` (0 <= K < N) keeps the paths whose stable hash (BLAKE2b of the path string)
  is K modulo N: N machines given the same inputs split them without overlap or gaps, and a
  file keeps its shard when the dataset grows.
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

import glob
import hashlib
import heapq
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from .errors import UsageError
from .fetch import is_url
from .outfile import Sink, Target, read_records, rewrite_without
from .output import Result, is_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif", "avif")
VIDEO_EXTS = ("mp4", "mov", "mkv", "avi", "webm", "m4v", "mpg", "mpeg", "wmv", "flv", "3gp", "ts")
DEFAULT_EXTS = IMAGE_EXTS + VIDEO_EXTS
MODES = ("resume", "retry-failed", "overwrite")
SPACE = " \t\r\v\f"  # what is stripped around a listed path: ASCII blanks only (a name may end in U+0085)


def parse_exts(values: Iterable[str] | None) -> frozenset[str]:
    """`--ext mp4,mov --ext .jpg` -> {"mp4", "mov", "jpg"}; nothing given -> the defaults."""
    exts = {e.strip().lstrip(".").lower() for v in values or () for e in v.split(",") if e.strip()}
    return frozenset(exts or DEFAULT_EXTS)


def _has_ext(name: str, exts: frozenset[str]) -> bool:
    return name.rpartition(".")[2].lower() in exts and "." in name


def _walk(folder: str, exts: frozenset[str], onerror: Callable[[OSError], None]) -> Iterable[str]:
    """Files under `folder`, following links but entering each real directory once, by the route
    whose spelling sorts first (whatever order the file system lists entries in), so a file
    reached by several routes is found under its sorted-first spelling; a folder that cannot be
    read is passed to `onerror` (its OSError names it).

    Routes are taken in the order of their spelling with a "/" after it (a heap): a longer route
    sorts after the route it extends, so when a directory is first taken from the heap, no route
    to it that sorts before can turn up later (as in a shortest-path search). Comparing "a/" and
    "a-b/" rather than "a" and "a-b" makes the files' spellings sort the way the routes do."""
    heap = [(os.path.join(folder, ""), folder)]
    walked: set[str] = set()  # real directories entered (this also ends link loops)
    while heap:
        _, root = heapq.heappop(heap)
        real = os.path.realpath(root)
        if real in walked:  # reached before by a route that sorts first
            continue
        walked.add(real)
        for name, is_dir in _listing(root, onerror):
            path = os.path.join(root, name)
            if is_dir:
                heapq.heappush(heap, (os.path.join(path, ""), path))
            elif _has_ext(name, exts):
                yield path


def _listing(folder: str, onerror: Callable[[OSError], None]) -> list[tuple[str, bool]]:
    """(name, whether it is a directory once links are followed) for the entries of `folder` that
    are not hidden, sorted into folders and files as os.walk does; [] after passing a listing
    error to `onerror`."""
    try:
        with os.scandir(folder) as entries:
            return [(e.name, _is_dir(e)) for e in entries if not e.name.startswith(".")]
    except OSError as e:
        onerror(e)
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # as os.walk: an entry that cannot be examined is taken for a file
        return False


def _note(errors: dict[str, str], top: str, error: OSError) -> None:
    errors.setdefault(error.filename or top, error.strerror or str(error))


def expand_inputs(
    inputs: Iterable[str],
    files_from: str | None,
    exts: frozenset[str],
    stdin: IO[str] | None = None,
    unreadable: dict[str, str] | None = None,
) -> list[str]:
    """The sorted, de-duplicated list of files and URLs to process.

    An input that yields nothing (no such path, a folder or glob without files of `exts`) is a
    UsageError; so is a folder INPUT that cannot be read. A folder inside one that cannot be read
    goes into `unreadable` ({folder: why}, for the caller's error records; None: a UsageError).
    Files are one item however they are spelled (`a.png`, `./a.png`, `/abs/a.png`, a link to
    it): the first spelling in sorted order stands for them (`local_path` tidies each first).
    """
    found: set[str] = set()
    ext_list = "/".join(sorted(exts))
    for item in inputs:
        if is_url(item):
            found.add(item)
        elif os.path.isdir(item):
            errors: dict[str, str] = {}  # folder -> why it cannot be read
            files = list(_walk(item, exts, partial(_note, errors, item)))
            if item in errors or (errors and unreadable is None):
                folder, why = next(iter(errors.items()))
                raise UsageError(f"cannot read the folder {folder}: {why}")
            if unreadable is not None:
                unreadable.update(errors)
            if not files and not errors:
                raise UsageError(f"{item} holds no {ext_list} files (see --ext)")
            found.update(files)
        elif os.path.isfile(item):
            found.add(item)
        elif glob.has_magic(item):
            matches = [m for m in glob.glob(item, recursive=True) if os.path.isfile(m) and _has_ext(m, exts)]
            if not matches:
                raise UsageError(f"no {ext_list} files match {item}")
            found.update(matches)
        else:
            raise UsageError(f"no such file or folder: {item}")
    if files_from is not None:
        listed = {line.strip(SPACE) for line in read_lines(files_from, "--files-from", stdin) if line.strip(SPACE)}
        if not listed:
            raise UsageError(f"--files-from {files_from} lists no files")
        found.update(listed)
    unique: dict[str, str] = {}  # real path (or URL) -> the spelling kept
    for path in sorted(p if is_url(p) else local_path(p) for p in found):
        unique.setdefault(path if is_url(path) else file_key(path), path)
    return sorted(unique.values())


def read_lines(name: str, option: str, stdin: IO[str] | None = None) -> list[str]:
    """The lines of list file `name` (`-`: stdin), split at "\n" only (a "\r" before it dropped),
    so that U+2028, U+0085 and the like stay inside their line (`str.splitlines` splits there).
    Bytes that are not UTF-8 become lone surrogates (surrogateescape), as in file names."""
    try:
        if name == "-":
            stream = stdin or sys.stdin
            raw = getattr(stream, "buffer", None)  # bytes: no newline translation, no strict decoding
            text = raw.read().decode("utf-8", "surrogateescape") if raw is not None else stream.read()
        else:
            text = Path(name).read_bytes().decode("utf-8", "surrogateescape")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {option} {name}: {getattr(e, 'strerror', None) or e}") from e
    return [line.removesuffix("\r") for line in text.split("\n")]


def local_path(path: str) -> str:
    """`path` tidied (`./a.png` -> `a.png`, `d/sub/../a.png` -> `d/a.png`) when the tidy spelling
    opens the same file, else as given. `os.path.normpath` drops `..` as text, which is wrong
    after a link: the OS takes `link/..` to the parent of the link's target."""
    tidy = os.path.normpath(path)
    if tidy == path:
        return path
    there = os.path.exists(path)
    if there != os.path.exists(tidy) or (there and os.path.realpath(path) != os.path.realpath(tidy)):
        return path
    return tidy


def file_key(path: str) -> str:
    """What makes two spellings one file: its real path (`os.path.realpath` resolves links first
    and `..` after them, as the OS does); a path that opens nothing, as given, made absolute."""
    if os.path.exists(path):
        return os.path.realpath(path)
    return os.path.join(os.getcwd(), path)


@dataclass(frozen=True)
class Entry:
    """One item of a batch: a file, or a manifest line (several media, or none, and its own prompt).

    A manifest line that cannot be used keeps its place as an entry with `error` set: it becomes
    an error record (named by its id, else by `file:line`), and the run goes on.
    """

    media: tuple[str, ...]
    prompt: str | None = None
    id: str | None = None
    error: str | None = None

    @property
    def shard_key(self) -> str:
        if self.id is not None:
            return self.id
        return self.media[0] if len(self.media) == 1 else json.dumps(list(self.media))


MANIFEST_KEYS = ("id", "media", "prompt")


def read_manifest(manifest: str, default_prompt: str | None = None, stdin: IO[str] | None = None) -> list[Entry]:
    """The entries of a JSONL manifest: `{"id": ..., "media": "a.jpg" | ["a.jpg", "b.mp4"] | [], "prompt": ...}`.

    `id` is optional; media paths are relative to the manifest's folder (or URLs); a line
    without `prompt` gets `default_prompt` (None: describe its media). Lines are numbered as
    `read_lines` splits them; one that is not UTF-8 is that line's error record.
    """
    lines = read_lines(manifest, "--manifest", stdin)
    lines[0] = lines[0].removeprefix("\ufeff")  # a UTF-8 BOM
    folder = "." if manifest == "-" else os.path.dirname(manifest) or "."
    entries: list[Entry] = []
    ids: dict[str, int] = {}
    unnamed: dict[tuple, int] = {}  # what resume keys a line without an id by (real media, prompt) -> line
    for n, line in enumerate(lines, 1):
        if not line.strip(SPACE):
            continue
        where = f"{manifest}:{n}"
        if bad := _not_utf8(line):
            entries.append(Entry((), id=where, error=f"{where}: {bad}"))
            continue
        try:
            data = json.loads(line)
        except ValueError as e:  # json.JSONDecodeError
            entries.append(Entry((), id=where, error=f"{where}: {e}"))
            continue
        try:
            entry = _entry(data, folder, default_prompt)
        except ValueError as e:
            entries.append(Entry(_named_media(data, folder), id=where, error=f"{where}: {e}"))
            continue
        if entry.id is not None:
            if entry.id in ids:
                entry = Entry(entry.media, entry.prompt, where, f"{where}: id {entry.id!r} is already used on line {ids[entry.id]}")
            else:
                ids[entry.id] = n
        elif (same := (tuple(media_key(m) for m in entry.media), entry.prompt)) in unnamed:
            why = f"{where}: the same item as line {unnamed[same]} (give each line an id to ask twice)"
            entry = Entry(entry.media, entry.prompt, where, why)
        else:
            unnamed[same] = n
        entries.append(entry)
    if not entries:
        raise UsageError(f"--manifest {manifest} lists no items")
    return entries


def _entry(data, folder: str, default_prompt: str | None) -> Entry:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(data) - set(MANIFEST_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(MANIFEST_KEYS)})")
    item_id, media, prompt = data.get("id"), data.get("media", []), data.get("prompt", default_prompt)
    if item_id is not None and not _valid_id(item_id):
        raise ValueError("id must be a string or a (finite) number")
    media = [media] if isinstance(media, str) else media
    if media is None:
        media = []
    if not isinstance(media, list) or not all(isinstance(m, str) and m for m in media):
        raise ValueError("media must be a path or URL, or a list of them")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    if prompt is not None and not is_text(prompt):
        raise ValueError("prompt is not valid Unicode text (it holds a lone surrogate, such as the JSON escape \\ud800)")
    if not media and not (prompt or "").strip():
        raise ValueError("an item without media needs a prompt")
    # A number id is written back as a string, the way Python writes the number (1.5 -> "1.5",
    # 1e20 -> "1e+20"): the same manifest gives the same ids, so resume matches them.
    return Entry(_paths(media, folder), prompt, None if item_id is None else str(item_id))


def _valid_id(item_id) -> bool:
    if isinstance(item_id, bool):
        return False
    return isinstance(item_id, (str, int)) or (isinstance(item_id, float) and math.isfinite(item_id))


def _paths(media: list[str], folder: str) -> tuple[str, ...]:
    return tuple(m if is_url(m) or os.path.isabs(m) else local_path(os.path.join(folder, m)) for m in media)


def _not_utf8(line: str) -> str | None:
    """Why a manifest line (read with surrogateescape) is not UTF-8 text, or None if it is."""
    if is_text(line):
        return None
    bad = next(c for c in line if "\ud800" <= c <= "\udfff")
    byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if "\udc80" <= bad <= "\udcff" else ""
    return f"the line is not valid UTF-8{byte}: save the manifest as UTF-8"


def _named_media(data, folder: str) -> tuple[str, ...]:
    """The media a line that cannot be used names (a path, or a list of paths), for its error record."""
    media = data.get("media") if isinstance(data, dict) else None
    media = [media] if isinstance(media, str) else media
    if isinstance(media, list) and media and all(isinstance(m, str) and m for m in media):
        return _paths(media, folder)
    return ()


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"K/N" -> (K, N) with 0 <= K < N."""
    if text is None:
        return None
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)  # ASCII digits only: `str.isdigit` takes "²", int() does not
    try:
        k, n = (int(g) for g in match.groups()) if match else (0, 0)
    except ValueError:  # more digits than int() reads
        k, n = 0, 0
    if not 0 <= k < n:
        raise UsageError(f"--shard {text}: expected K/N with 0 <= K < N, e.g. 0/4 ... 3/4 (Slurm: $SLURM_ARRAY_TASK_ID/N)")
    return k, n


def in_shard(path: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard[1] == shard[0]


def record_key(record: dict) -> str:
    """What makes two records answers to the same request: the item (its id, else its path), the
    request's options (prompt as given, decoding, media), the system prompt, the model and its
    quantization, and the segment. The same function keys planned items (as would-be records)."""
    item = record.get("id")
    if item is None:
        item = [media_key(m) for m in record.get("media") or ([record["path"]] if record.get("path") is not None else [])]
    parts = [item, record.get("options"), record.get("system"), model_key(record.get("model")), record.get("quantize"),
             record.get("segment_start"), record.get("segment_end")]  # fmt: skip
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


def media_key(media) -> str:
    """What resume compares of a medium: a local file by its real path (`a.png`, `./a.png`,
    `/abs/a.png` and a link to it are one file across runs, as within one, as long as it is where
    the record says from here); a URL, or a file that is gone, as written."""
    if isinstance(media, str) and not is_url(media) and os.path.exists(media):
        return os.path.realpath(media)
    return media


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
