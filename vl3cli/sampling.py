"""Frame-timestamp selection for videos: pure arithmetic, no decoding.

Contract (vl3's rule, see shared/VIDEOLLAMA3.md):

- The window is ``[start, end)`` in seconds, ``start`` defaulting to 0 and ``end`` to the
  clip's duration (an ``end`` past the duration is clamped to it).
- Candidates are ``start + k / fps`` for k = 0, 1, ... while inside the window. When the
  source frame times are known (the frames' presentation times, so variable frame rates
  are honoured), each candidate becomes the source frame shown at that time, reported at
  that frame's own start (clipped to ``start``), and a candidate showing the same source
  frame as an earlier one is dropped (fps above the clip's own gives each source frame once,
  at no extra cost: candidates are never all built).
- More than ``max_frames`` candidates -> ``max_frames`` of them, evenly spaced: candidate
  ``floor(i * n / max_frames)`` for i = 0..max_frames-1 (the first one is always kept).
- Fewer than ``min_frames`` candidates -> ``min_frames`` frames evenly spaced over the
  window, never more than the window holds: the window's source frames are chosen with the
  same ``floor(i * n / k)`` rule (their times are the source frames' start times, the first
  clipped to ``start``). Without known frame times the window is split into k equal parts.
- So the count is never larger than the number of source frames in the window, and a
  one-frame video gives exactly one frame.

``frame_index`` maps a timestamp to the source frame shown at that time (the last frame
starting at or before it). ``resolve_frame_bounds`` is the one rule that combines the user's
``--min-frames`` / ``--max-frames`` with the checkpoint's defaults. Messages name the command
line options (``--fps``, ``--min-frames``, ``--max-frames``, ``--start``, ``--end``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from vl3cli.errors import UsageError

# Float slack when comparing timestamps: frame times come from rational time bases.
EPS = 1e-6
MAX_FPS = 1e6  # frames per second to sample at most: beyond any camera (slow motion is 240-1000 fps)


def check_bounds(fps: float, min_frames: int, max_frames: int) -> None:
    """Raise UsageError for sampling options that cannot be satisfied."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise UsageError(f"--fps must be a positive number, got {fps!r}")
    if fps > MAX_FPS:
        raise UsageError(f"--fps must be at most {MAX_FPS:g} (got {fps:g}): more than any video's frame rate")
    if min_frames < 1:
        raise UsageError(f"--min-frames must be at least 1, got {min_frames}")
    if max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1, got {max_frames}")
    if max_frames < min_frames:
        raise UsageError(f"--max-frames ({max_frames}) is smaller than --min-frames ({min_frames})")


def resolve_frame_bounds(
    min_frames: int | None, max_frames: int | None, default_min: int, default_max: int
) -> tuple[int, int]:
    """``(min_frames, max_frames)`` from the user's values (None: not given) and the defaults.

    A bound the user gives is used as given; a default bound yields to it. So ``--max-frames 1``
    alone lowers the default minimum (4) to 1, and ``--min-frames 300`` alone raises the default
    maximum (180) to 300. When both are given they are both kept, and ``check_bounds`` refuses
    a maximum below the minimum.
    """
    if min_frames is None:
        cap = default_max if max_frames is None else max(max_frames, 1)
        min_frames = min(default_min, cap)
    if max_frames is None:
        max_frames = max(default_max, min_frames)
    return min_frames, max_frames


def resolve_window(duration: float, start: float | None, end: float | None) -> tuple[float, float]:
    """Return the ``(start, end)`` window in seconds, checked against the clip's duration."""
    s = 0.0 if start is None else float(start)
    e = duration if end is None else min(float(end), duration)
    if s < 0:
        raise UsageError(f"--start must be >= 0 seconds, got {s:g}")
    if end is not None and float(end) <= s:
        raise UsageError(f"--end ({float(end):g}s) must be after --start ({s:g}s)")
    if s >= duration:
        raise UsageError(f"--start ({s:g}s) is at or past the end of the video ({duration:.3f}s)")
    return s, e


def window_frame_times(frame_times: Sequence[float], start: float, end: float) -> list[float]:
    """Times of the source frames visible in ``[start, end)``: the frame shown at ``start``
    (reported at ``start``) followed by every frame starting inside the window."""
    first = max(frame_index(frame_times, start), 0)
    times = [start]
    for t in frame_times[first + 1 :]:
        if t >= end - EPS:
            break
        times.append(float(t))
    return times


def _spread(n: int, k: int) -> list[int]:
    """k indices out of range(n), evenly spaced, starting at 0 (requires k <= n)."""
    return [(i * n) // k for i in range(k)]


def sample_timestamps(
    duration: float,
    frame_times: Sequence[float] | None = None,
    *,
    fps: float = 1.0,
    min_frames: int = 4,
    max_frames: int = 180,
    start: float | None = None,
    end: float | None = None,
) -> list[float]:
    """Timestamps (seconds from the start of the file) of the frames to use.

    ``duration`` is the clip's length in seconds (> 0 unless the clip has one frame);
    ``frame_times`` the sorted start times of its source frames when known.
    """
    check_bounds(fps, min_frames, max_frames)
    if frame_times is not None and len(frame_times) == 1:  # one picture: shown from the window's start
        return [resolve_window(duration, start, end)[0]] if duration > 0 else [0.0]
    if duration <= 0:
        if frame_times:
            return [0.0]
        raise UsageError(f"cannot sample a video of duration {duration!r}s")
    s, e = resolve_window(duration, start, end)

    span = e - s
    count = max(1, math.ceil(span * fps - EPS))  # candidates s + k / fps, never all built (fps may be 1e9)
    if frame_times:
        candidates = _distinct_frames(frame_times, s, fps, count)
    elif count > max_frames:
        return [s + k / fps for k in _spread(count, max_frames)]
    else:
        candidates = [s + k / fps for k in range(count)]
    n = len(candidates)

    if n > max_frames:
        return [candidates[i] for i in _spread(n, max_frames)]
    if n >= min_frames:
        return candidates
    if frame_times:
        clip = window_frame_times(frame_times, s, e)
        return [clip[i] for i in _spread(len(clip), min(min_frames, len(clip)))]
    return [s + span * i / min_frames for i in range(min_frames)]


def _distinct_frames(frame_times: Sequence[float], s: float, fps: float, count: int) -> list[float]:
    """The source frames that candidates ``s + k / fps`` (k < count) show, each once, at their own
    start (clipped to ``s``). Jumps from one frame's candidates to the next frame's, so the cost
    follows the frames used, not fps x duration."""
    times, k = [], 0
    while k < count:
        i = frame_index(frame_times, s + k / fps)
        times.append(max(float(frame_times[i]), s))  # the time of the frame used
        if i + 1 >= len(frame_times):
            break
        # the first candidate showing a later frame: s + k / fps >= frame_times[i + 1] - EPS
        nxt = max(k + 1, math.ceil((frame_times[i + 1] - EPS - s) * fps) - 1)
        while nxt < count and frame_index(frame_times, s + nxt / fps) <= i:  # float rounding: step on
            nxt += 1  # a few steps at most: MAX_FPS keeps 1 / fps far above the times' rounding
        k = nxt
    return times


def frame_index(frame_times: Sequence[float], t: float) -> int:
    """Index of the source frame shown at time ``t``: the last one starting at or before it."""
    return max(bisect.bisect_right(frame_times, t + EPS) - 1, 0)
