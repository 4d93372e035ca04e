"""Long videos cut into timed segments: fixed windows or shots -> (start, end) spans. Pure arithmetic.

- `windows(duration, seconds)`: consecutive windows of `seconds` covering the clip; the last one
  may be shorter (a tail shorter than 1% of a window, or than a millisecond, joins the one before).
- `scene_spans(cuts, duration, min_segment, max_segment)`: the shots between detected cuts; a shot
  shorter than `min_segment` merges into its shorter neighbour (repeatedly, shortest first; a heap,
  so a video with a cut at every frame is not quadratic), one longer than `max_segment` is split
  into equal parts no longer than it. A `min_segment` above `max_segment` yields to it (the default
  2 s with `--max-segment 1`; both given, the options refuse it).
- `parse_segments(text)`: the `--segments` value: a number of seconds (at least `MIN_WINDOW`), or "scenes".
- A window past the end of the clip is refused as `--start` past the end; more than `MAX_WINDOWS`
  segments (an absurdly short --segments / --max-segment for the video's length) are refused too.

Spans are `(start, end)` in seconds from the start of the file, sorted, contiguous and covering
`[clip start, clip end)`; each becomes one request, sampled with the usual fps / frame-bound rules
inside its own window. Bounds between the two ends are rounded to the nanosecond (`PLACES`), so
records say 2.1, not 2.0999999999999996 (float sums of 0.7, or a cut's time through a float time
base); that is far below sampling's slack of a microsecond, so the frames chosen stay the same.
"""

from __future__ import annotations

import heapq
import math

from .errors import UsageError
from .sampling import resolve_window

EPS = 1e-3  # seconds: spans shorter than this are not worth a request
MIN_WINDOW = 0.1  # seconds: the shortest --segments / --max-segment (a frame or two of most videos)
MAX_WINDOWS = 100_000  # segments of one video (a 2.8-hour video in 0.1 s windows); more is refused
MIN_SEGMENT = 2.0  # scenes: default --min-segment (seconds); shorter shots merge with a neighbour
MAX_SEGMENT = 60.0  # scenes: default --max-segment (seconds); longer shots are split
SCENE_THRESHOLD = 10.0  # scenes: default --scene-threshold (FFmpeg scdet's score, 0-100) that makes a cut
PLACES = 9  # decimals kept of an inner bound: float noise goes, frame times stay within 1e-9 s


def span_key(span: tuple) -> tuple:
    """How resume compares a segment with a record's: to the microsecond (sampling's own slack), so
    that records written before bounds were rounded (`2.0999999999999996`) still match."""
    return tuple(None if x is None else round(x, 6) for x in span)


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


def check_max_segment(seconds: float) -> None:
    """A --max-segment shorter than `MIN_WINDOW` is refused (as a --segments window would be)."""
    if seconds < MIN_WINDOW:
        raise UsageError(f"--max-segment must be at least {MIN_WINDOW:g} seconds (got {seconds:g})")


def _check_count(count: int, option: str) -> None:
    if count > MAX_WINDOWS:
        raise UsageError(f"{option} would cut this video into {count:,} segments, more than {MAX_WINDOWS:,}: use longer ones")


def windows(duration: float, seconds: float, start: float = 0.0, end: float | None = None) -> list[tuple[float, float]]:
    """Windows of `seconds` over `[start, end)` (end: the duration); the last may be shorter."""
    start, end = resolve_window(duration, start, end)
    count = max(1, math.ceil((end - start) / seconds - 1e-9))
    _check_count(count, f"--segments {seconds:g}")
    bounds = [start] + [round(start + k * seconds, PLACES) for k in range(1, count)] + [end]  # each from k: no drift
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
    if max_segment is not None:
        check_max_segment(max_segment)
        min_segment = min(min_segment, max_segment)
    inner = sorted({round(c, PLACES) for c in cuts if start + EPS < c < end - EPS})
    spans = _merge_short(list(zip([start, *inner], [*inner, end])), min_segment)
    if max_segment is None:
        return spans
    parts = [max(1, math.ceil((e - s) / max_segment - 1e-9)) for s, e in spans]
    _check_count(sum(parts), f"--max-segment {max_segment:g}")
    out = []
    for (s, e), n in zip(spans, parts):
        cuts = [s] + [round(s + (e - s) * k / n, PLACES) for k in range(1, n)] + [e]  # the last part ends at the shot's end
        out += list(zip(cuts, cuts[1:]))
    return out


def _merge_short(spans: list[tuple[float, float]], min_segment: float) -> list[tuple[float, float]]:
    """Merge the shortest span shorter than `min_segment` into its shorter neighbour (the earlier one
    on a tie; the first span of equal shortest length goes first) until none is left or one span
    remains. A heap of (length, start) with stale entries skipped, over a linked list of spans."""
    n = len(spans)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    before, after = list(range(-1, n - 1)), [*range(1, n), -1]  # neighbours' indices; -1: none
    alive = [True] * n
    heap = [(e - s, s, i) for i, (s, e) in enumerate(spans)]
    heapq.heapify(heap)
    left = n
    while left > 1:
        length, _, i = heapq.heappop(heap)
        if not alive[i] or ends[i] - starts[i] != length:  # merged away, or grown since
            continue
        if length >= min_segment:
            break
        p, q = before[i], after[i]
        if p < 0 or (q >= 0 and ends[q] - starts[q] < ends[p] - starts[p]):
            a, b = i, q
        else:
            a, b = p, i
        ends[a], alive[b], after[a] = ends[b], False, after[b]  # a absorbs b, its right neighbour
        if after[b] >= 0:
            before[after[b]] = a
        left -= 1
        heapq.heappush(heap, (ends[a] - starts[a], starts[a], a))
    return [(s, e) for s, e, live in zip(starts, ends, alive) if live]
