"""Long videos cut into timed segments: fixed windows or shots -> (start, end) spans. Pure arithmetic.

- `windows(duration, seconds)`: consecutive windows of `seconds` covering the clip; the last one
  may be shorter (a tail shorter than 1% of a window, or than a millisecond, joins the one before).
- `scene_spans(cuts, duration, min_segment, max_segment)`: the shots between detected cuts; a shot
  shorter than `min_segment` merges into its shorter neighbour (repeatedly, shortest first), one
  longer than `max_segment` is split into equal parts no longer than it.
- `parse_segments(text)`: the `--segments` value: a number of seconds (at least `MIN_WINDOW`), or "scenes".
- A window past the end of the clip is refused as `--start` past the end; more than `MAX_WINDOWS`
  segments (an absurdly short --segments / --max-segment for the video's length) are refused too.

Spans are `(start, end)` in seconds from the start of the file, sorted, contiguous and covering
`[clip start, clip end)`; each becomes one request, sampled with the usual fps / frame-bound rules
inside its own window.
"""

from __future__ import annotations

import math

from .errors import UsageError
from .sampling import resolve_window

EPS = 1e-3  # seconds: spans shorter than this are not worth a request
MIN_WINDOW = 0.1  # seconds: the shortest --segments / --max-segment (a frame or two of most videos)
MAX_WINDOWS = 100_000  # segments of one video (a 2.8-hour video in 0.1 s windows); more is refused
MIN_SEGMENT = 2.0  # scenes: default --min-segment (seconds); shorter shots merge with a neighbour
MAX_SEGMENT = 60.0  # scenes: default --max-segment (seconds); longer shots are split


def parse_segments(text: str | None) -> float | str | None:
    """`--segments 30` -> 30.0; `--segments scenes` -> "scenes"; None stays None."""
    if text is None:
        return None
    if text.strip().lower() in ("scene", "scenes"):
        return "scenes"
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"--segments takes a number of seconds or 'scenes' (got {text!r})") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--segments must be a positive number of seconds (got {text})")
    if seconds < MIN_WINDOW:
        raise UsageError(f"--segments must be at least {MIN_WINDOW:g} seconds (got {text})")
    return seconds


def _check_count(count: int, option: str) -> None:
    if count > MAX_WINDOWS:
        raise UsageError(f"{option} would cut this video into {count:,} segments, more than {MAX_WINDOWS:,}: use longer ones")


def windows(duration: float, seconds: float, start: float = 0.0, end: float | None = None) -> list[tuple[float, float]]:
    """Windows of `seconds` over `[start, end)` (end: the duration); the last may be shorter."""
    start, end = resolve_window(duration, start, end)
    count = max(1, math.ceil((end - start) / seconds - 1e-9))
    _check_count(count, f"--segments {seconds:g}")
    bounds = [start + k * seconds for k in range(count)] + [end]  # each from k, not by adding: no drift
    spans = list(zip(bounds[:-1], bounds[1:]))
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < max(EPS, 0.01 * seconds):
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return spans


def scene_spans(
    cuts: list[float], duration: float, min_segment: float = 0.0, max_segment: float | None = None,
    start: float = 0.0, end: float | None = None,
) -> list[tuple[float, float]]:  # fmt: skip
    """Shots between `cuts` (times where a new shot starts) within `[start, end)`, merged and split."""
    start, end = resolve_window(duration, start, end)
    if max_segment is not None and min_segment > max_segment:
        raise UsageError(f"--min-segment ({min_segment:g}s) is above --max-segment ({max_segment:g}s)")
    if max_segment is not None and max_segment < MIN_WINDOW:
        raise UsageError(f"--max-segment must be at least {MIN_WINDOW:g} seconds (got {max_segment:g})")
    bounds = [start, *sorted(c for c in set(cuts) if start + EPS < c < end - EPS), end]
    spans = list(zip(bounds[:-1], bounds[1:]))
    while len(spans) > 1:
        i = min(range(len(spans)), key=lambda k: spans[k][1] - spans[k][0])
        if spans[i][1] - spans[i][0] >= min_segment:
            break
        if i == 0:
            j = 1
        elif i == len(spans) - 1:
            j = i - 1
        else:  # the shorter neighbour absorbs it
            j = i - 1 if spans[i - 1][1] - spans[i - 1][0] <= spans[i + 1][1] - spans[i + 1][0] else i + 1
        a, b = sorted((i, j))
        spans[a : b + 1] = [(spans[a][0], spans[b][1])]
    if max_segment is None:
        return spans
    parts = [max(1, math.ceil((e - s) / max_segment - 1e-9)) for s, e in spans]
    _check_count(sum(parts), f"--max-segment {max_segment:g}")
    out = []
    for (s, e), n in zip(spans, parts):
        cuts = [s + (e - s) * k / n for k in range(n)] + [e]  # the last part ends exactly at the shot's end
        out += list(zip(cuts, cuts[1:]))
    return out
