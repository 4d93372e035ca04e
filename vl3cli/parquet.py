"""Parquet output for `vl3 batch --out results.parquet`: the JSONL records as typed columns.

- Schema (`schema()`): one column per record field (output.SCHEMA, in order), typed from the
  `Result` and `Options` annotations; `options` is a struct of `Options.record()`'s fields,
  `timings` a struct of output.TIMING_KEYS and `media_info` a list of structs (MEDIA_INFO), so `pyarrow.parquet.read_table(path).to_pylist()`
  gives back the records a JSONL file holds.
- Ours: an empty file, or a Parquet file with exactly `schema()`'s columns (the same names and
  types; their order aside). Anything else -- someone's table that happens to have `path`,
  `text` and `error` columns too -- is refused (UsageError) and never opened for writing.
- Strings are UTF-8 in Parquet: a lone surrogate (a file name that is not UTF-8, read with
  surrogateescape) is stored as the text `\\udcff` of its JSON escape (`escape`) and turned back
  when vl3 reads the file (`unescape`), so resume matches it. Backslashes are doubled only
  where they come before such an escape or before text that looks like one (`\\udc80` typed
  as text is stored `\\\\udc80`), so every string reads back as it was written, and any
  other string is stored as it is.
- Writing (`ParquetSink`): a hidden temporary file beside the target's real path (a link is
  followed, and kept; `outfile.temp_name`: a short name) gets the target's records so far (unless the run replaces them), then the
  new ones in row groups, each record converted on its own first (one that cannot be becomes
  an error record, `outfile.unwritable`); `close()` -- at the end of a run, after Ctrl-C, after
  an error -- completes it and renames it over the target, with the target's permission bits. The target is therefore always a whole Parquet file, the old one or the new
  one; a run killed outright (SIGKILL, power loss) leaves the old one, and the next run redoes
  the items it lost. For very long runs that may be killed, JSONL keeps every finished line.

pyarrow is imported here only (the `parquet` and `ray` extras install it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

from .errors import Vl3Error
from .options import Options
from .outfile import claim, not_ours, replace_file, temp_name, unwritable
from .output import SCHEMA, TIMING_KEYS, Result

ROW_GROUP = 1000  # records buffered before they are written as one row group
# An entry of `media_info` (pipeline.visual_info), one per medium of a record with several.
MEDIA_INFO = {"path": "str", "kind": "str", "width": "int", "height": "int", "duration": "float", "frames": "int",
              "timestamps": "list[float]", "resized": "list[int]", "visual_tokens": "int", "visual_tokens_kept": "int"}  # fmt: skip


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise Vl3Error("--out *.parquet needs pyarrow: pip install 'vl3cli[parquet]' (or write JSONL)") from None
    return pa, pq


def require_pyarrow() -> None:
    _pyarrow()


def _arrow_type(annotation: str):
    """The Arrow type of a dataclass field annotation such as "int | None" or "list[float] | None"."""
    pa, _ = _pyarrow()
    name = annotation.removesuffix(" | None")
    scalars = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    if name in scalars:
        return scalars[name]
    if name.startswith("list[") and name.endswith("]"):
        return pa.list_(_arrow_type(name[5:-1]))
    raise TypeError(f"no Parquet column type for a field of type {annotation!r}")


@lru_cache(maxsize=1)
def schema():
    pa, _ = _pyarrow()
    request = [pa.field("prompt", pa.string())]
    request += [pa.field(f.name, _arrow_type(f.type)) for f in fields(Options) if f.name != "system"]
    medium = pa.struct([pa.field(name, _arrow_type(kind)) for name, kind in MEDIA_INFO.items()])
    structs = {"options": pa.struct(request), "timings": pa.struct([pa.field(k, pa.float64()) for k in TIMING_KEYS]),
               "media_info": pa.list_(medium)}  # fmt: skip
    types = {f.name: f.type for f in fields(Result)}
    return pa.schema([pa.field(name, structs.get(name) or _arrow_type(types[name])) for name in SCHEMA])


@contextmanager
def _opened(path: Path) -> Iterator:
    """The `pyarrow.parquet.ParquetFile` of a vl3 Parquet file, open for the block; refuses anything else."""
    pa, pq = _pyarrow()
    with open(path, "rb") as f:  # a file object: pyarrow encodes a path as strict UTF-8, as a name may not be
        try:
            file = pq.ParquetFile(f)
        except (pa.ArrowException, OSError):
            raise not_ours(path) from None
        if _columns(file.schema_arrow) != _columns(schema()):
            raise not_ours(path)
        yield file


def _columns(arrow_schema) -> dict:
    return {f.name: f.type for f in arrow_schema}


# A run of backslashes before a lone surrogate, or before the text of a surrogate's escape; and
# when reading back, a run of backslashes before such an escape's text.
_TO_ESCAPE = re.compile(r"(\\*)([\ud800-\udfff])|(\\+)(ud[89a-f][0-9a-f]{2})")
_ESCAPED = re.compile(r"(\\+)u(d[89a-f][0-9a-f]{2})")


def escape(value):
    """`value` (a record, or anything in one) with every lone surrogate in its strings written as
    the text of its JSON escape (`\\udcff`): Parquet strings must be UTF-8.

    So that `unescape` can tell an escape from text that looks like one, the backslashes before
    either are doubled (as a C string doubles them): after a run of backslashes, `\\udcff`
    is an escape when the run is odd, text when it is even. A string without such a run (any
    string with no backslash) is stored as it is, as vl3 stored it before it doubled any, so
    files written then resume as they did."""
    if isinstance(value, str):
        return _TO_ESCAPE.sub(_escape_run, value)
    if isinstance(value, dict):
        return {k: escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape(v) for v in value]
    return value


def _escape_run(match: re.Match) -> str:
    backslashes, surrogate, before_text, text = match.groups()
    if surrogate:
        return 2 * backslashes + f"\\u{ord(surrogate):04x}"
    return 2 * before_text + text


def unescape(value):
    """The inverse of `escape`: an odd run of backslashes before `udXXX` (XXX: a surrogate's
    hex digits) is half of them and the surrogate, an even one half of them and the text."""
    if isinstance(value, str):
        return _ESCAPED.sub(_unescape_run, value) if "\\u" in value else value
    if isinstance(value, dict):
        return {k: unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape(v) for v in value]
    return value


def _unescape_run(match: re.Match) -> str:
    backslashes, digits = match.groups()
    half = "\\" * (len(backslashes) // 2)
    return half + (chr(int(digits, 16)) if len(backslashes) % 2 else "u" + digits)


def read_records(path: Path) -> list[dict]:
    """The records of a vl3 Parquet file (an empty file has none); refuses (UsageError) anything else."""
    if path.stat().st_size == 0:
        return []
    with _opened(path) as file:
        return [unescape(r) for r in file.read().to_pylist()]


def rewrite_without(path: Path, drop) -> None:
    """Rewrite vl3 Parquet file `path` without the records for which `drop(record)` is true (atomically)."""
    records = [r for r in read_records(path) if not drop(r)]
    with ParquetSink(path, keep=False) as sink:
        for record in records:
            sink.add(record)


class ParquetSink:
    """Records written to a temporary Parquet file that `close()` renames over the target."""

    def __init__(self, path: Path, keep: bool):
        pa, pq = _pyarrow()
        self.path = Path(os.path.realpath(path))  # a link's target is replaced; the link stays
        self.tmp = temp_name(self.path)
        self.tables: list = []  # converted records not yet written (one table each)
        with ExitStack() as reading:
            old = reading.enter_context(_opened(path)) if keep and path.exists() and path.stat().st_size > 0 else None
            try:
                self.file = open(claim(self.tmp), "wb")  # noqa: SIM115 -- closed by close(); a file object, as in _opened
            except OSError as e:
                raise Vl3Error(f"cannot write {path}: cannot create its temporary file {self.tmp.name} in {self.tmp.parent}: {e}") from e
            try:
                self.writer = pq.ParquetWriter(self.file, schema())
                for batch in old.iter_batches() if old is not None else ():
                    self.tables.append(pa.Table.from_batches([batch]).select(schema().names).cast(schema()))
                    self._flush_full()
            except BaseException:
                self._discard()
                raise

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def isatty(self) -> bool:
        return False

    def write_record(self, result: Result) -> Result:
        """Add one record; returns the record added (an error record when `result` does not fit
        the schema)."""
        try:
            self.add(result.to_dict())
        except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError are ValueError / TypeError
            result = unwritable(result, e)
            self.add(result.to_dict())
        return result

    def add(self, record: dict) -> None:
        """Convert one record (raising if it does not fit the schema, nothing added) and queue it."""
        pa, _ = _pyarrow()
        self.tables.append(pa.Table.from_pylist([escape(record)], schema=schema()))
        self._flush_full()

    def _flush_full(self) -> None:
        if sum(t.num_rows for t in self.tables) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        pa, _ = _pyarrow()
        if self.tables:
            table = pa.concat_tables(self.tables)
            self.tables = []
            try:
                self.writer.write_table(table)
            except OSError as e:
                raise Vl3Error(f"cannot write to {self.tmp}: {e}") from e

    def close(self) -> None:
        """Complete the file and put it in the target's place (the target is untouched until then)."""
        try:
            self._flush()
            self.writer.close()
            self.file.close()
        except BaseException:
            self._discard()
            raise
        replace_file(self.tmp, self.path)

    def _discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
