"""Where results go, opened so that a file that is not ours is never changed.

`--out` names a regular file, `-` (stdout), or something that is not a regular file (a FIFO,
`/dev/stdout` on a terminal or a pipe, `/dev/full`): `Target.of(out)` says which.

- A stream (stdout, FIFO, device) is written to and never read: no resume, no repair.
- A regular file is "ours" when it is empty or every line is a vl3 JSONL record (a JSON object
  that starts as vl3 writes one, `{"id": ` or, before ids, `{"path": `, with the record's
  `path`, `text` and `error` fields). Only then may vl3 append to it, resume from it, or cut
  off a last line that a crash left unterminated (when that line starts like a record, or,
  after a record, is a shorter start of one or NUL bytes only). Anything else is refused, the
  file left byte-identical, unless the user asks for `--overwrite`.
- A record is one line of valid UTF-8: a string holding lone surrogates (a file name that is not
  UTF-8, as Python's surrogateescape reads it) has them written as `\\udcff`-style JSON escapes,
  which `json.loads` turns back into the same string, so resume matches it. A record that
  cannot be written at all becomes an error record for its item; the run goes on.
- `read_records` reads line by line with a bounded line length, so a large file that is not
  ours (a video passed as `--out` by a shell glob) is refused after its first line, never read whole.
- `--out x.parquet` (batch only) writes Parquet instead (parquet.py): a regular file only; it is
  ours when empty or when it is Parquet with exactly the record's columns and types; it is only
  ever replaced whole, by a rename at the end of the run (`opened`). A replaced file (Parquet,
  or JSONL rewritten by `--retry-failed`) is the target of a link (the link is kept) and keeps
  its permission bits.
- describe / ask open a regular `--out` file only when their first result is written
  (`opened_on_write`): a run that fails before it has an answer leaves no file, or the file as it
  was; text, JSON and `--overwrite` write a temporary file renamed over the target at the end.
- A temporary file is hidden in the target's folder under a short name (`temp_name`: any name
  the target may have fits). Where the folder allows no new file but the target may be written,
  text, JSON and JSONL are rewritten in place; Parquet is refused before the model loads
  (`check_writable`).
- A regular file is written unbuffered, each write whole or not at all (`WholeWrites`): a write
  that fails part way (a full disk, `ulimit -f`) is cut off again, so no half record is left.
- A stream that cannot encode a character (`PYTHONIOENCODING=ascii`) gets its JSON escape
  (`\\u00e9`) instead: JSON and JSONL stay valid and lossless, text readable.
- A batch run holds `exclusive(target)` from reading what is done to its last record, so two
  runs never write one file at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import UsageError, Vl3Error
from .output import Result, to_json

RECORD_FIELDS = ("path", "text", "error")
RECORD_START = (b'{"id": ', b'{"path": ')  # how a record line begins (ours: json.dumps of Result.to_dict())
MAX_LINE = 64 * 1024 * 1024  # a longer first line is not one of ours (the file is not read whole to find out)
MAX_RECORD_LINE = 1024**3  # once a file is ours: its records may be longer (a huge prompt's, written twice)


@dataclass(frozen=True)
class Target:
    path: Path | None  # None: stdout
    regular: bool  # a regular file (existing or to be created): can be read back and resumed

    @classmethod
    def of(cls, out: str | os.PathLike | None) -> Target:
        if out is None or str(out) == "-":
            return cls(None, False)
        if str(out) == "":  # Path("") is "." (the current folder)
            raise UsageError("--out is empty: give a file name or -")
        path = Path(out)
        if _is_parquet(path):
            from .parquet import require_pyarrow

            require_pyarrow()
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            if not path.parent.is_dir():
                raise UsageError(f"--out {out}: the folder {path.parent} does not exist") from None
            return cls(path, True)
        except OSError as e:
            raise UsageError(f"--out {out}: {e.strerror}") from None
        if stat.S_ISDIR(mode):
            raise UsageError(f"--out {out} is a folder; give a file name")
        if stat.S_ISBLK(mode):  # a disk: writing there would overwrite what it holds
            raise UsageError(f"--out {out} is a block device; give a file name, a pipe or -")
        if _is_parquet(path) and not stat.S_ISREG(mode):
            raise UsageError(f"--out {out}: Parquet needs a regular file (use JSONL to write to a stream)")
        return cls(path, stat.S_ISREG(mode))

    @property
    def parquet(self) -> bool:
        return self.path is not None and _is_parquet(self.path)

    @property
    def name(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    def exists_nonempty(self) -> bool:
        return self.regular and self.path.exists() and self.path.stat().st_size > 0


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def not_ours(path: Path) -> UsageError:
    return UsageError(f"{path} exists and is not a vl3 results file (use --overwrite to replace it)")


def _is_record(line: bytes) -> dict | None:
    if not line.startswith(RECORD_START):
        return None
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(record, dict) and all(k in record for k in RECORD_FIELDS):
        return record
    return None


def _cut_short(line: bytes, after_record: bool) -> bool:
    """Whether an unterminated last line is what a crash mid-write leaves: the start of a record
    (not a whole JSON value: that was written whole, by whoever wrote it), or (after a record, so
    the file is ours) a shorter start of one, or a tail of NUL bytes."""
    if line.startswith(RECORD_START):
        return _record_start(line)
    return after_record and (any(start.startswith(line) for start in RECORD_START) or not line.strip(b"\0"))


def _record_start(line: bytes) -> bool:
    """Whether `line` is the start of a record cut short: not a whole JSON value, and its keys so
    far are record fields, each once (another program's `{"id": 17, "name": ...` is not)."""
    from .output import SCHEMA

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut in two at the end is a cut; elsewhere it is not ours
        if e.end < len(line) - 3:
            return False
        text = line[: e.start].decode("utf-8")
    decoder, fields, at, seen = json.JSONDecoder(), set(SCHEMA) | {"timings"}, 1, set()
    try:
        json.loads(text)
        return False  # whole: not a record (`_is_record` said so), and not cut short
    except ValueError:
        pass
    while True:  # key, ':', value, ',' ... until the text runs out
        at = _skip_space(text, at)
        if at >= len(text):
            return True
        try:
            key, at = decoder.raw_decode(text, at)
        except ValueError:
            return not text[at:].strip(' "abcdefghijklmnopqrstuvwxyz_')  # a key cut short
        if not isinstance(key, str) or key not in fields or key in seen:
            return False
        seen.add(key)
        at = _skip_space(text, at)
        if at >= len(text):
            return True
        if text[at] != ":":
            return False
        at = _skip_space(text, at + 1)
        if at >= len(text):
            return True
        try:
            _, at = decoder.raw_decode(text, at)
        except ValueError:
            return True  # the value is where the line was cut
        at = _skip_space(text, at)
        if at >= len(text):
            return True
        if text[at] != ",":
            return False
        at += 1


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t":
        at += 1
    return at


def unwritable(result: Result, error: Exception) -> Result:
    """The error record that stands for a record that cannot be written: the item and request
    (what resume keys on) and the reason."""
    keep = ("id", "path", "media", "segment_start", "segment_end", "prompt", "system", "model", "dtype", "device",
            "quantize", "options")  # fmt: skip
    return Result(**{k: getattr(result, k) for k in keep}, error=f"cannot write this record: {error}")


def read_records(path: Path) -> list[dict]:
    """The records of a vl3 JSONL (or Parquet) file; refuses (UsageError) a file that is not one.

    A last line without its newline is mended: a whole record gets its newline; a half record
    (a crash mid-write: it begins like a record) is cut off. Every other line must be a record.
    """
    if _is_parquet(path):
        from . import parquet

        return parquet.read_records(path)
    records: list[dict] = []
    cut = newline = None
    with open(path, "rb") as f:
        while line := f.readline(limit := MAX_RECORD_LINE if records else MAX_LINE):
            record = _is_record(line) if len(line) < limit else None
            if record is not None:
                records.append(record)
                newline = not line.endswith(b"\n")
            elif not line.endswith(b"\n") and len(line) < limit and _cut_short(line, bool(records)):
                cut = f.tell() - len(line)
            else:
                raise not_ours(path)
    if cut is not None:
        with open(path, "r+b") as f:
            f.truncate(cut)
    elif newline:
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def check_replaceable(target: Target, fmt: str, overwrite: bool) -> None:
    """describe / ask: may results in `fmt` go to `target`? JSONL appends to a vl3 file; text and
    JSON replace a file, which needs --overwrite unless it is empty."""
    if target.parquet:
        raise UsageError(f"--out {target.path}: Parquet output is for `vl3 batch`; describe and ask write text, JSON or JSONL")
    if overwrite or not target.exists_nonempty():
        return
    if fmt == "jsonl":
        read_records(target.path)  # refuses what is not ours; repairs a cut-short last line
        return
    raise UsageError(f"{target.path} exists (use --overwrite to replace it, or --format jsonl to append to a vl3 JSONL file)")


def temp_name(path: Path) -> Path:
    """The temporary file that replaces `path`: hidden in its folder, named after its start and a
    hash of its whole name, so it stays short (NAME_MAX) whatever the target's name."""
    digest = hashlib.blake2b(os.fsencode(path.name), digest_size=4).hexdigest()
    return path.with_name(f".{path.name[:32]}.{digest}.vl3-tmp")


def claim(tmp: Path) -> Path:
    """`tmp` as a new empty file of ours: whatever is there (a stale temporary file, or a link
    planted to send the write elsewhere) is removed first, and the file is created exclusively,
    never through a link. PermissionError where the folder allows no new file."""
    try:
        tmp.unlink()  # a link goes, not what it points to
    except FileNotFoundError:
        pass
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
    return tmp


def _folder_writable(path: Path) -> bool:
    return os.access(path.parent, os.W_OK | os.X_OK)


def check_writable(target: Target) -> None:
    """Before the model loads: can the results be written to `target`? A new file needs a folder
    that allows creating it; an existing one, write permission; Parquet (always replaced by a
    temporary file) a folder that allows creating that file."""
    if not target.regular:
        return
    path = Path(os.path.realpath(target.path))
    if target.parquet and path.exists() and not _folder_writable(path):
        raise Vl3Error(f"cannot write {target.path}: Parquet is written to a temporary file next to it, and the folder "
                       f"{path.parent} does not allow creating files (write to another folder, or use JSONL)")  # fmt: skip
    if path.exists():
        if not os.access(path, os.W_OK):
            raise Vl3Error(f"cannot write to {target.path}: Permission denied")
    elif not _folder_writable(path):
        raise Vl3Error(f"cannot create {target.path}: the folder {path.parent} does not allow creating files")


class WholeWrites:
    """A regular file written unbuffered (UTF-8), each `write` whole or not at all: after a write
    that fails part way (a full disk, `ulimit -f`) the file is cut back to where it began, so
    it never ends in half a record or half an answer."""

    encoding = "utf-8"

    def __init__(self, path: Path, mode: str):
        self.f = open(path, mode + "b", buffering=0)  # noqa: SIM115 -- closed by close()

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        start = self.f.tell()
        try:
            while data:
                data = data[self.f.write(data) :]
        except OSError:
            self.f.truncate(start)
            self.f.seek(start)
            raise

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.f.close()


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def escaped(text: str, encoding: str) -> str:
    """`text` with every character that `encoding` cannot write replaced by its JSON escape
    (`\\u00e9`; a pair of them above U+FFFF): inside a JSON string that is the same string."""

    def one(m: re.Match) -> str:
        try:
            m.group().encode(encoding)
        except UnicodeEncodeError:
            return json.dumps(m.group())[1:-1]
        return m.group()

    return _NON_ASCII.sub(one, text)


class Sink:
    """A text stream whose write errors (a full disk, /dev/full) name the output: one clear line."""

    def __init__(self, stream: IO[str], name: str):
        self.stream, self.name = stream, name

    def write(self, text: str) -> None:
        try:
            self._guard(self.stream.write, text)
        except UnicodeEncodeError:  # a stream in an encoding without some character (PYTHONIOENCODING=ascii); nothing was written
            self._guard(self.stream.write, escaped(text, getattr(self.stream, "encoding", None) or "ascii"))

    def flush(self) -> None:
        self._guard(self.stream.flush)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def write_record(self, result: Result) -> Result:
        """One JSONL line, flushed at once; returns the record written (an error record when
        `result` could not be serialised)."""
        try:
            line = to_json(result)
        except (TypeError, ValueError) as e:  # a value JSON cannot hold
            result = unwritable(result, e)
            line = to_json(result)
        self.write(line + "\n")
        self.flush()
        return result

    def _guard(self, call, *args) -> None:
        try:
            call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise Vl3Error(f"cannot write to {self.name}: {e.strerror or e}") from e


@contextmanager
def opened(target: Target, replace: bool) -> Iterator[Sink]:
    """The stream for `target`: stdout; a stream opened for writing; a regular file appended to
    (`replace`: emptied first); a Parquet file rewritten with its records so far and the new
    ones, renamed over the target on the way out. The caller has checked the file is ours."""
    if target.path is None:
        yield Sink(sys.stdout, "stdout")
        return
    if target.parquet:
        from .parquet import ParquetSink

        with ParquetSink(target.path, keep=not replace) as sink:
            yield sink
        return
    mode = "w" if replace and target.regular else "a"
    try:
        if target.regular:
            f = WholeWrites(target.path, mode)
        else:
            f = open(target.path, mode, encoding="utf-8")  # noqa: SIM115 -- closed below, with its error named
    except OSError as e:
        raise Vl3Error(f"cannot write to {target.path}: {e.strerror or e}") from e
    sink = Sink(f, str(target.path))
    try:
        yield sink
    finally:
        sink._guard(f.close)


class _LateFile:
    """A regular file opened at its first write, so a run that fails before it has a result leaves
    no file and never empties one. `replace`: written as a temporary file next to the target (a
    link's target; the link stays) that `close` renames over it, keeping its permission bits
    (where the folder allows no new file, the target is rewritten in place); else appended to. A
    write that failed (a full disk) leaves the target as it was (in place: its whole answers)."""

    def __init__(self, path: Path, replace: bool):
        self.path = Path(os.path.realpath(path)) if replace else path
        self.tmp = temp_name(self.path) if replace else None
        self.f: WholeWrites | None = None
        self.failed = False

    def _open(self) -> WholeWrites:
        if self.tmp is None:
            return WholeWrites(self.path, "a")
        try:
            return WholeWrites(claim(self.tmp), "w")
        except PermissionError:  # a writable file in a folder that allows no new file
            if not self.path.exists():
                raise
            self.tmp = None
            return WholeWrites(self.path, "w")

    def write(self, text: str) -> None:
        try:
            if self.f is None:
                self.f = self._open()
            self.f.write(text)
        except OSError:
            self.failed = True
            raise

    def flush(self) -> None:
        if self.f is not None:
            try:
                self.f.flush()
            except OSError:
                self.failed = True
                raise

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self.f is None:
            return
        try:
            self.f.close()
        except OSError:
            self.failed = True
            raise
        finally:
            if self.tmp is not None:
                if self.failed:
                    self.tmp.unlink(missing_ok=True)
                else:
                    replace_file(self.tmp, self.path)


@contextmanager
def opened_on_write(target: Target, replace: bool) -> Iterator[Sink]:
    """describe / ask: like `opened`, but a regular file is created, appended to or replaced only
    once something is written (see `_LateFile`); what was written by the time the run ends, also
    by an error or Ctrl-C, is kept."""
    if target.path is None or not target.regular or target.parquet:
        with opened(target, replace) as sink:
            yield sink
        return
    late = _LateFile(target.path, replace)
    sink = Sink(late, str(target.path))
    try:
        yield sink
    finally:
        sink._guard(late.close)


def create_empty(target: Target) -> None:
    """An output file with no records yet (an empty shard still leaves its file, a valid one)."""
    if not (target.regular and not target.path.exists()):
        return
    if target.parquet:
        from .parquet import ParquetSink

        with ParquetSink(target.path, keep=False):
            pass
    else:
        target.path.touch()


def rewrite_without(path: Path, drop) -> None:
    """Rewrite vl3 file `path` without the records for which `drop(record)` is true (atomically)."""
    if _is_parquet(path):
        from . import parquet

        parquet.rewrite_without(path, drop)
        return
    path = Path(os.path.realpath(path))  # a link's target is rewritten; the link stays

    def kept(lines):
        for line in lines:
            record = _is_record(line)
            if record is None or not drop(record):
                yield line

    tmp = temp_name(path)
    try:
        dst = open(claim(tmp), "wb")  # noqa: SIM115 -- closed below
    except PermissionError:  # the folder allows no new file: rewrite in place
        with open(path, "r+b") as f:
            lines = list(kept(f))
            f.seek(0)
            f.writelines(lines)
            f.truncate()
        return
    try:
        with open(path, "rb") as src, dst:
            dst.writelines(kept(src))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_file(tmp, path)


@contextmanager
def exclusive(target: Target) -> Iterator[None]:
    """Held for a whole batch run on a regular `--out`, from reading what is done to the last
    record: a second run on the same file (any link to it) is refused with one line instead of
    answering the same items again, or renaming a rewritten file over the records the first run
    is appending. An advisory lock (`flock`) on a hidden file next to the target, named like its
    temporary file, removed on the way out; where the folder allows no new file, on the target
    itself (which is then rewritten in place, never replaced)."""
    if not target.regular:
        yield
        return
    import fcntl

    path = Path(os.path.realpath(target.path))
    lock = path.with_name(temp_name(path).name[: -len(".vl3-tmp")] + ".vl3-lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            ours = True
        except PermissionError:
            fd, ours = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), False
        except OSError as e:
            raise Vl3Error(f"cannot lock {target.path} for this run: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() if ours else ""
            os.close(fd)
            pid = f" (process {holder})" if holder.isdigit() else ""
            raise Vl3Error(f"{target.path} is being written by another vl3 run{pid}; wait for it to end, "
                           "or write to another file") from None  # fmt: skip
        if not ours:
            break
        try:  # the lock file is still the one at its name (a run ending meanwhile removes it)
            if os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        if ours:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if ours:
            try:
                lock.unlink()  # before the lock goes: a run waiting on this file then tries again
            except OSError:
                pass
        os.close(fd)


def replace_file(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` (a real path), keeping `path`'s permission bits when it exists."""
    try:
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
