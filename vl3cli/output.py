"""Results and how they are written: the `Result` record, text / JSON / JSONL writers, and a
streaming detokeniser.

One `Result` is produced per (media, question). Its `to_dict()` is the JSON schema every
format shares; the field order is fixed so JSONL files diff cleanly. stdout only ever carries
these results; everything else (progress, warnings, timings) goes to stderr.

`StreamDecoder` turns a growing list of token ids into text pieces for a terminal. A byte-level
BPE token can end in the middle of a multi-byte UTF-8 character; the decoder holds such a tail
back until the character is complete, so a stream never shows U+FFFD for a split character.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap
from dataclasses import dataclass, field, fields
from typing import IO, Protocol

TIMING_KEYS = ("load_s", "media_s", "encode_s", "prefill_s", "decode_s", "total_s")


@dataclass
class Result:
    """One answer (or one failure) for one media file and one prompt.

    Timings are the time spent producing this record; work shared between records (the model
    load, decoding and encoding one media file for several questions) is counted on the first
    record that paid for it, so sums over a JSONL file are true totals.
    """

    id: str | None = None  # the item's id (a manifest line's), if it has one
    path: str | None = None  # the media file or URL when there is exactly one
    media: list[str] = field(default_factory=list)  # every media file or URL of the prompt, in order
    kind: str | None = None  # "image" | "video" | "text" (no media) | "multiple"; None when unreadable
    segment_start: float | None = None  # the window of a long video this answer is about (s), when segmenting
    segment_end: float | None = None
    prompt: str | None = None  # the prompt used
    system: str | None = None
    text: str | None = None
    model: str | None = None
    dtype: str | None = None  # e.g. "bfloat16": what the model computed in
    device: str | None = None  # e.g. "cpu", "cuda:0"
    quantize: str | None = None  # "int8" | "int4" | None
    width: int | None = None  # as displayed
    height: int | None = None
    duration: float | None = None
    frames: int | None = None
    timestamps: list[float] | None = None
    resized: list[int] | None = None  # [width, height] fed to the vision encoder
    media_info: list[dict] | None = None  # several media: each one's path, kind, size, frames, ... as above
    visual_tokens: int | None = None  # all media together
    visual_tokens_kept: int | None = None
    prompt_tokens: int | None = None
    prompt_tokens_cached: int | None = None  # of those, how many came from a prefix computed once (0: none)
    generated_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length"
    options: dict | None = None  # the request: Options.record(prompt as given)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    warnings: list[str] = field(default_factory=list)  # e.g. "clip.mp4: only the first 41.2 s could be read"
    error: str | None = None
    # Not written: the error as raised, and how the answer came about (pipeline.Answer: prompt
    # ids, generated ids, visuals) for callers that continue the conversation.
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    state: object | None = field(default=None, repr=False, compare=False)

    def raise_error(self) -> None:
        """Raise this record's error (as the Vl3Error it was, where it was one)."""
        from .errors import Vl3Error

        if self.error is not None:
            raise self.exception if isinstance(self.exception, Vl3Error) else Vl3Error(self.error)


    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        data = {f: copy.copy(getattr(self, f)) for f in SCHEMA}  # lists and dicts not shared
        data["timings"] = {k: round(float(self.timings.get(k, 0.0)), 4) for k in TIMING_KEYS}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        return cls(**{k: v for k, v in data.items() if k in SCHEMA})


SCHEMA = tuple(f.name for f in fields(Result) if f.name not in ("exception", "state"))  # written, in order


_SURROGATE = re.compile("[\ud800-\udfff]")


def is_text(value: str) -> bool:
    """Whether `value` is Unicode text, which a tokenizer takes: no lone surrogate (a byte that is
    not UTF-8 on a command line or stdin, read with surrogateescape; a JSON escape such as "\\ud800")."""
    return _SURROGATE.search(value) is None


def charge_shared_work(first: Result, others) -> None:
    """Work several records shared (loading the model) goes on the one written first: a record
    among `others` that finished earlier and paid for it hands it over (total_s moves with it)."""
    for other in others:
        paid = other.timings.get("load_s") or 0.0
        if paid and first is not other:
            first.timings["load_s"] = first.timings.get("load_s", 0.0) + paid
            first.timings["total_s"] = first.timings.get("total_s", 0.0) + paid
            other.timings["load_s"], other.timings["total_s"] = 0.0, other.timings.get("total_s", paid) - paid


def to_json(result: Result, indent: int | None = None) -> str:
    """`result` as JSON that encodes as UTF-8: lone surrogates (a file name that is not UTF-8, as
    Python's surrogateescape reads it) become JSON escapes, which json.loads reads back as they were."""
    text = json.dumps(result.to_dict(), ensure_ascii=False, indent=indent)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_CONTROL = dict.fromkeys(c for c in range(0x20) if c not in (0x09, 0x0A)) | dict.fromkeys(range(0x7F, 0xA0))


def terminal_safe(text: str) -> str:
    """Model text without control characters (escape sequences, bells, carriage returns), for a terminal."""
    return text.translate(_CONTROL)


class Writer:
    """Writes results one at a time, as each is ready; `close()` completes the document.

    text: the answer; with several questions each answer follows a `Q: question` line; an answer
    about a segment of a video starts with `[HH:MM:SS.mmm - HH:MM:SS.mmm] `. json: one object, or
    an array when several records are expected (closed by `close()`, so an interrupted run still
    leaves valid JSON). jsonl: one object per line. srt / vtt: one numbered subtitle cue per
    answer, timed by its segment (or the whole clip).
    """

    def __init__(self, fmt: str, out: IO[str], many: bool = False, terminal: bool = False, questions: bool | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt, self.out, self.many, self.terminal = fmt, out, many, terminal
        self.questions = many if questions is None else questions  # several questions: say which one
        self.count = 0

    def header(self, prompt: str | None) -> str:
        """The text format's line before an answer when there are several questions."""
        if self.fmt != "text" or not self.questions:
            return ""
        return ("\n" if self.count else "") + f"Q: {self.clean(prompt or '')}\n"

    def clean(self, text: str) -> str:
        return terminal_safe(text) if self.terminal else text

    def write(self, result: Result, streamed: bool = False) -> None:
        """Write `result`; `streamed`: its header and text are already out (text format)."""
        if self.fmt == "text":
            if not streamed:
                self.out.write(self._text(result))
        elif self.fmt == "jsonl":
            self.out.write(to_json(result) + "\n")
        elif self.fmt in ("srt", "vtt"):
            if self.count == 0 and self.fmt == "vtt":
                self.out.write("WEBVTT\n\n")
            text = f"Q: {result.prompt}\n{result.text or ''}" if self.questions else result.text or ""
            self.out.write(subtitle_cue(self.count + 1, *cue_times(result), text, self.fmt))
        elif self.many:
            body = textwrap.indent(to_json(result, indent=2), "  ")
            self.out.write(("[\n" if self.count == 0 else ",\n") + body)
        else:
            self.out.write(to_json(result, indent=2) + "\n")
        self.count += 1
        self.out.flush()

    def _text(self, result: Result) -> str:
        text = self.clean(result.text or "")
        if result.segment_start is None:
            return self.header(result.prompt) + text + "\n"
        span = f"[{timecode(result.segment_start)} - {timecode(result.segment_end)}] "
        if self.questions:
            return f"{span}Q: {self.clean(result.prompt or '')}\n{text}\n"
        return span + text + "\n"

    def close(self) -> None:
        if self.fmt == "json" and self.many:
            self.out.write("\n]\n" if self.count else "[]\n")
            self.out.flush()
        elif self.fmt == "vtt" and self.count == 0:
            self.out.write("WEBVTT\n\n")
            self.out.flush()


def cue_times(result: Result) -> tuple[float, float]:
    """A subtitle cue's start and end: the record's segment, else its clip of the video."""
    if result.segment_start is not None:
        return result.segment_start, result.segment_end
    start = (result.options or {}).get("start") or 0.0
    end = (result.options or {}).get("end") or result.duration or start
    return start, min(end, result.duration or end)


FORMATS = ("text", "json", "jsonl", "srt", "vtt")


class _Decodes(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class StreamDecoder:
    """Incremental detokeniser: `push(id)` returns the newly stable text (possibly "").

    It decodes a short window of recent ids rather than the whole list (the window restarts at
    the last point where text was emitted) and emits only the suffix that grew, unless that suffix
    ends in U+FFFD, the mark of an incomplete UTF-8 sequence. `finish()` returns whatever is left.
    The concatenation of all pieces equals `tokenizer.decode(all ids)` for byte-level tokenizers.
    """

    def __init__(self, tokenizer: _Decodes):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        done = decode(self.ids[self._prefix : self._read])
        text = decode(self.ids[self._prefix :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        piece = text[len(done) :]
        self._prefix, self._read = self._read, len(self.ids)
        return piece


def error_message(error: BaseException) -> str:
    """An error as a record states it: vl3's own messages as they are, running out of memory as
    such, others with their type."""
    from .errors import out_of_memory

    if memory := out_of_memory(error):
        return memory
    return str(error) if type(error).__module__.startswith("vl3cli") else f"{type(error).__name__}: {error}"


def timecode(seconds: float, separator: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT, text) or HH:MM:SS,mmm (SRT), rounded to the millisecond."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def cue_text(text: str, width: int = 42, vtt: bool = False) -> str:
    """An answer as subtitle lines: wrapped at `width` characters, no blank line (it would end the
    cue), no `-->` (nor `--->`...), no control characters; for WebVTT `&`, `<` and `>` escaped."""
    import textwrap

    lines = []
    text = re.sub(r"-{2,}>", "->", text.translate(_CONTROL))  # no arrow of any length survives; no control bytes
    for paragraph in text.splitlines():
        if paragraph.strip():
            lines += textwrap.wrap(paragraph.strip(), width=width, break_long_words=True) or [""]
    body = "\n".join(lines) or "..."
    if vtt:
        body = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return body


def subtitle_cue(number: int, start: float, end: float, text: str, fmt: str) -> str:
    """One numbered cue of an SRT or WebVTT file, with its trailing blank line. A cue lasts at
    least a millisecond (a clip shorter than that would round to a cue players drop)."""
    end = max(round(end * 1000), round(start * 1000) + 1) / 1000
    if fmt == "srt":
        return f"{number}\n{timecode(start, ',')} --> {timecode(end, ',')}\n{cue_text(text)}\n\n"
    return f"{number}\n{timecode(start)} --> {timecode(end)}\n{cue_text(text, vtt=True)}\n\n"
