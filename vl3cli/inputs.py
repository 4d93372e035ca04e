"""What a batch run takes: its items, from folders, files, globs, URLs, lists and manifests.

The contract: `expand_inputs` and `read_manifest` turn the command line's inputs into a sorted,
de-duplicated list (files, URLs) or `Entry`s, the same on every run and machine, so that shards
and resume (batch.py) see one order; what cannot be used is a UsageError, or for a manifest line
or a folder inside an input, an error entry the run records and goes past. Nothing here opens
media or loads a model: cli/batch.py calls it before the model loads.

- Inputs: folders (walked recursively, following links but never entering a directory twice,
  filtered by extension), files (always taken), glob patterns (filtered by extension), URLs,
  and `--files-from` lists (one path or URL per line, taken as is; `-` reads stdin). An input
  that yields nothing is a usage error. The list is de-duplicated (by real path, resolved as the
  OS opens the file: `a.png`, `./a.png`, `/abs/a.png` and a link to it are one item, spelled
  the way that sorts first) and sorted.
- Lists (`--files-from`, `--manifest`) are split at "\n" only (a "\r" before it dropped), never
  at U+2028, U+0085 and the other separators `str.splitlines` knows, which JSON strings and file
  names may hold; bytes that are not UTF-8 are read with surrogateescape, as Python reads file
  names and stdin (a manifest line holding some is that line's error record).
- `media_key`: what resume compares of a medium (a local file by its real path), across runs as
  `file_key` within one.
- `--shard K/N` (0 <= K < N) keeps the items whose stable hash (BLAKE2b of `Entry.shard_key`:
  the path, or a manifest line's id) is K modulo N: N machines given the same inputs split them
  without overlap or gaps, and a file keeps its shard when the dataset grows.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from .errors import UsageError
from .fetch import is_url
from .output import is_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif", "avif")
VIDEO_EXTS = ("mp4", "mov", "mkv", "avi", "webm", "m4v", "mpg", "mpeg", "wmv", "flv", "3gp", "ts")
DEFAULT_EXTS = IMAGE_EXTS + VIDEO_EXTS
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


def media_key(media) -> str:
    """What resume compares of a medium: a local file by its real path (`a.png`, `./a.png`,
    `/abs/a.png` and a link to it are one file across runs, as within one, as long as it is where
    the record says from here); a URL, or a file that is gone, as written."""
    if isinstance(media, str) and not is_url(media) and os.path.exists(media):
        return os.path.realpath(media)
    return media
