"""Per-request options: everything that changes an answer besides the model and the inputs.

`Options` holds the decoding settings, the media sampling settings and the system prompt under
the command-line names (`max_new_tokens` is `--max-new-tokens`), with the command line's
defaults. The command line, the Python API (`vl3cli.load(...).describe(path, fps=2)`), the
server and the Ray engine all build one with `Options.from_kwargs(**options)`, so values are
checked once, in one place, and errors name the command-line option (`UsageError`).

`None` for `fps`, `min_frames` and `max_frames` means "the checkpoint's value"; `media(processor)`
resolves them: a bound that is not given follows the given one (`--max-frames 1` alone lowers
the minimum to 1; `--min-frames 200` alone raises the maximum to 200).

`record(prompt)` is what a record stores of the request, and what resume compares (batch.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .decoding import INT64_MAX, INT64_MIN, DecodingParams
from .errors import UsageError
from .output import is_text
from .sampling import check_bounds
from .segments import SCENE_THRESHOLD, check_max_segment, parse_segments

_KIND_NAMES = {float: "a number", int: "a whole number", bool: "true or false", str: "text"}


@dataclass(frozen=True)
class Options:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    system: str | None = None
    fps: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    max_visual_tokens: int | None = None
    prune: bool = True
    prune_threshold: float = 0.1
    segments: str | None = None  # "30.0" (seconds per window) or "scenes"; None: the whole clip at once
    min_segment: float | None = None  # scenes: shorter shots merge (default MIN_SEGMENT)
    max_segment: float | None = None  # scenes: longer shots split (default MAX_SEGMENT)
    scene_threshold: float = SCENE_THRESHOLD  # scenes: FFmpeg scdet's score (0-100) that makes a cut

    def __post_init__(self):
        if self.segments is not None and not isinstance(self.segments, bool):  # 30, "30", "30.0" -> "30.0"
            object.__setattr__(self, "segments", str(parse_segments(str(self.segments))))
        for f in fields(self):  # one spelling per value (2 and 2.0 are one fps), so records and resume agree
            value = getattr(self, f.name)
            if value is None:
                continue
            kind = {"float": float, "int": int, "bool": bool, "str": str}[f.type.split(" | ")[0]]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise UsageError(f"--{f.name.replace('_', '-')} must be {_KIND_NAMES[kind]} (got {value!r})")
            object.__setattr__(self, f.name, kind(value))
        self.decoding  # noqa: B018 -- DecodingParams checks the decoding values
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            raise UsageError(f"--seed must be between {INT64_MIN} and {INT64_MAX} (got {self.seed})")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise UsageError(f"--fps must be a positive number (got {self.fps:g})")
        if self.fps is not None:
            check_bounds(self.fps, 1, 1)  # at most MAX_FPS, refused before a model loads
        if self.system is not None and not is_text(self.system):
            raise UsageError("--system: the text is not valid UTF-8 (set the terminal to UTF-8, or retype it)")
        for name in ("min_frames", "max_frames", "max_visual_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.min_frames is not None and self.max_frames is not None and self.min_frames > self.max_frames:
            raise UsageError(f"--min-frames ({self.min_frames}) is above --max-frames ({self.max_frames})")
        if self.start is not None and not (math.isfinite(self.start) and self.start >= 0):
            raise UsageError(f"--start must be 0 or more seconds (got {self.start:g})")
        if self.end is not None and not (math.isfinite(self.end) and self.end > 0):
            raise UsageError(f"--end must be more than 0 seconds (got {self.end:g})")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise UsageError(f"--end ({self.end:g}s) must be after --start ({self.start:g}s)")
        if not (math.isfinite(self.prune_threshold) and self.prune_threshold >= 0):
            raise UsageError(f"--prune-threshold must be 0 or more (got {self.prune_threshold:g})")
        for name in ("min_segment", "max_segment"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds (got {value:g})")
            if value is not None and self.segments != "scenes":
                raise UsageError(f"--{name.replace('_', '-')} is for --segments scenes")
        if self.max_segment is not None:
            check_max_segment(self.max_segment)  # no video can take it: refused before a model loads
        if self.min_segment is not None and self.max_segment is not None and self.min_segment > self.max_segment:
            raise UsageError(f"--min-segment ({self.min_segment:g}s) is above --max-segment ({self.max_segment:g}s)")
        if not 0 < self.scene_threshold <= 100:
            raise UsageError(f"--scene-threshold must be above 0 and at most 100 (got {self.scene_threshold:g})")
        if self.scene_threshold != SCENE_THRESHOLD and self.segments != "scenes":
            # unused otherwise; refused rather than stored, so that it never changes what resume compares
            raise UsageError("--scene-threshold is for --segments scenes")

    @classmethod
    def from_kwargs(cls, **kwargs) -> Options:
        """Options from keyword arguments named as on the command line; unknown names are a UsageError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**kwargs)

    def replace(self, **kwargs) -> Options:
        """A copy with some options changed (validated like the original)."""
        return Options.from_kwargs(**{**asdict(self), **kwargs})

    @property
    def decoding(self) -> DecodingParams:
        return DecodingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
        )  # fmt: skip

    def media(self, processor):
        """`MediaOptions` for a checkpoint's processor config (its fps / frame bounds fill the gaps)."""
        from .preprocess import MediaOptions
        from .sampling import resolve_frame_bounds

        fps = self.fps if self.fps is not None else processor.fps
        lo, hi = resolve_frame_bounds(self.min_frames, self.max_frames, processor.min_frames, processor.max_frames)
        return MediaOptions(
            fps=fps, min_frames=lo, max_frames=hi, start=self.start, end=self.end,
            max_visual_tokens=self.max_visual_tokens, prune=self.prune, prune_threshold=self.prune_threshold,
        )  # fmt: skip

    @property
    def segment_seconds(self) -> float | None:
        """Fixed windows' length (None: not segmenting, or segmenting by scenes)."""
        return None if self.segments in (None, "scenes") else float(self.segments)

    def record(self, prompt: str | None) -> dict:
        """The request as a record's `options` field: the prompt as given (None = the default
        prompt for the media's kind) and every option above but `system` (a field of its own)."""
        values = asdict(self)
        del values["system"]
        return {"prompt": prompt, **values}
