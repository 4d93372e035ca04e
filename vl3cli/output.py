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

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Protocol

TIMING_KEYS = ("load_s", "media_s", "encode_s", "prefill_s", "decode_s", "total_s")


@dataclass
class Result:
    """One answer (or one failure) for one media file and one prompt.

    Timings are the time spent producing this record; work shared between records (the model
    load, decoding and encoding one media file for several questions) is counted on the first
    record that paid for it, so sums over a JSONL file are true totals.
    """

    path: str
    kind: str | None = None  # "image" | "video" | None when the file could not be read
    prompt: str | None = None
    text: str | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    frames: int | None = None
    timestamps: list[float] | None = None
    resized: list[int] | None = None  # [width, height] fed to the vision encoder
    visual_tokens: int | None = None
    visual_tokens_kept: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length"
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    warnings: list[str] = field(default_factory=list)  # e.g. a video cut short: only part of it was read
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["timings"] = {k: round(float(self.timings.get(k, 0.0)), 4) for k in TIMING_KEYS}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def to_json(result: Result, indent: int | None = None) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False, indent=indent)


def write_text(results: Sequence[Result], out: IO[str]) -> None:
    """Plain answers; with several questions each answer follows a `Q: question` line."""
    for i, r in enumerate(results):
        if len(results) > 1:
            out.write(("\n" if i else "") + f"Q: {r.prompt}\n")
        out.write((r.text or "") + "\n")
    out.flush()


def write_json(results: Sequence[Result], out: IO[str]) -> None:
    """One JSON object, or an array of them when there are several records."""
    if len(results) == 1:
        out.write(to_json(results[0], indent=2) + "\n")
    else:
        out.write(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2) + "\n")
    out.flush()


def write_jsonl(results: Sequence[Result], out: IO[str]) -> None:
    for r in results:
        out.write(to_json(r) + "\n")
        out.flush()


WRITERS = {"text": write_text, "json": write_json, "jsonl": write_jsonl}


def write_results(results: Sequence[Result], fmt: str, out_path: str | Path | None, stdout: IO[str]) -> None:
    """Write `results` in `fmt` to `out_path` (replaced) or to `stdout`."""
    writer = WRITERS[fmt]
    if out_path is None:
        writer(results, stdout)
        return
    with open(out_path, "w", encoding="utf-8") as f:
        writer(results, f)


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


def error_result(path: str, error: BaseException, model: str | None = None, prompt: str | None = None) -> Result:
    """The record of an item that failed: its path, the model, the prompt and why."""
    message = str(error) if type(error).__module__.startswith("vl3cli") else f"{type(error).__name__}: {error}"
    return Result(path=path, model=model, prompt=prompt, error=message)
