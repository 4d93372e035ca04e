"""Frame-timestamp rule: property tests over durations, frame rates and bounds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vl3cli.errors import UsageError
from vl3cli.options import Options
from vl3cli.preprocess import ProcessorConfig
from vl3cli.sampling import EPS, frame_index, resolve_frame_bounds, sample_timestamps

SETTINGS = settings(max_examples=200, deadline=None)


def source_times(count: int, source_fps: float) -> list[float]:
    return [i / source_fps for i in range(count)]


@SETTINGS
@given(
    count=st.integers(1, 20000),
    source_fps=st.sampled_from([5.0, 10.0, 23.976, 25.0, 30.0, 60.0]),
    fps=st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0, 30.0, 100.0]),
    min_frames=st.integers(1, 8),
    extra=st.integers(0, 300),
)
def test_whole_clip_rule(count, source_fps, fps, min_frames, extra):
    max_frames = min_frames + extra
    duration = count / source_fps
    times = source_times(count, source_fps)
    ts = sample_timestamps(duration, times, fps=fps, min_frames=min_frames, max_frames=max_frames)

    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    assert all(0 <= t < duration for t in ts)
    # never two timestamps on the same source frame
    assert len({frame_index(times, t) for t in ts}) == len(ts)
    if count == 1:
        assert ts == [0.0]
        return
    # candidates k / fps, keeping the first one that shows each source frame, reported at
    # the time that frame starts
    candidates, seen = [], set()
    for k in range(math.ceil(duration * fps - EPS)):
        if frame_index(times, k / fps) not in seen:
            seen.add(frame_index(times, k / fps))
            candidates.append(times[frame_index(times, k / fps)])
    n = len(candidates)
    expected = max_frames if n > max_frames else max(n, min(min_frames, count))
    assert len(ts) == expected <= count
    assert ts[0] == 0.0
    if min_frames <= n <= max_frames:
        assert ts == candidates
    elif n > max_frames:  # evenly spaced among the candidates
        assert ts == [candidates[(i * n) // max_frames] for i in range(max_frames)]
    else:
        # evenly spaced source frames over the clip
        assert ts == pytest.approx([times[(i * count) // len(ts)] for i in range(len(ts))])


@SETTINGS
@given(
    count=st.integers(2, 5000),
    start_frac=st.floats(0, 0.9),
    len_frac=st.floats(0.01, 1.0),
    fps=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_window_rule(count, start_frac, len_frac, fps):
    source_fps = 10.0
    duration = count / source_fps
    start = duration * start_frac
    end = start + (duration - start) * len_frac
    times = source_times(count, source_fps)
    ts = sample_timestamps(duration, times, fps=fps, start=start, end=end)
    assert ts[0] == pytest.approx(start)
    assert all(start - EPS <= t < end for t in ts)
    assert 1 <= len(ts) <= 180
    n = math.ceil((end - start) * fps - EPS)
    if 4 <= n <= 180 and fps <= source_fps:
        # one frame per candidate start + k / fps: the frame shown then, reported at its own
        # start time (the window's start for the frame already showing when it opens)
        assert len(ts) == n
        for k, t in enumerate(ts):
            c = start + k / fps
            assert t in times or (k == 0 and t == start)
            assert t <= c + EPS
            assert frame_index(times, t) == frame_index(times, c)


def test_examples():
    ten_fps = source_times(20, 10.0)  # a 2-second clip
    assert sample_timestamps(2.0, ten_fps) == [0.0, 0.5, 1.0, 1.5]
    assert sample_timestamps(2.0, ten_fps, fps=2.0) == [0.0, 0.5, 1.0, 1.5]
    assert sample_timestamps(10.0, source_times(100, 10.0)) == [float(k) for k in range(10)]
    assert sample_timestamps(0.1, [0.0]) == [0.0]  # one-frame video
    assert sample_timestamps(0.3, source_times(3, 10.0)) == pytest.approx([0.0, 0.1, 0.2])  # never more than the clip
    hour = sample_timestamps(3600.0, source_times(90000, 25.0))
    assert len(hour) == 180 and hour[:3] == [0.0, 20.0, 40.0]
    # frame durations of an animated image (100, 200, 300, 400, 500 ms)
    assert sample_timestamps(1.5, [0.0, 0.1, 0.3, 0.6, 1.0]) == [0.0, 0.1, 0.3, 0.6]
    # no frame times known: the window split evenly
    assert sample_timestamps(2.0, None) == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0},
        {"fps": -1},
        {"fps": float("nan")},
        {"min_frames": 0},
        {"min_frames": 5, "max_frames": 4},
        {"start": 10.0},
        {"start": -1.0},
        {"start": 1.0, "end": 0.5},
    ],
)
def test_impossible_options(kwargs):
    with pytest.raises(UsageError):
        sample_timestamps(2.0, source_times(20, 10.0), **kwargs)


def test_frame_index():
    times = [0.0, 0.1, 0.3]
    assert [frame_index(times, t) for t in (0.0, 0.05, 0.1, 0.29, 0.3, 9.0, -1.0)] == [0, 0, 1, 1, 2, 2, 0]


def test_frame_bounds_rule():
    """The user's bound wins; the default one yields (defaults: 4 and 180)."""
    table = {
        (None, None): (4, 180), (None, 1): (1, 1), (None, 10): (4, 10), (2, None): (2, 180),
        (300, None): (300, 300), (2, 3): (2, 3), (5, 3): (5, 3), (None, 0): (1, 0),
    }  # fmt: skip
    for (lo, hi), expected in table.items():
        assert resolve_frame_bounds(lo, hi, 4, 180) == expected, (lo, hi)
    assert Options(max_frames=1).media(ProcessorConfig()).min_frames == 1
    assert Options().media(ProcessorConfig()).min_frames == 4


def test_a_one_frame_video_is_shown_from_the_window_start():
    """A clip of one picture (0.2 s): the frame used for a window is reported at the window's
    start, like any frame shown before a window begins; a start past the clip is refused."""
    assert sample_timestamps(0.2, [0.0]) == [0.0]
    assert sample_timestamps(0.2, [0.0], start=0.1, end=0.2) == [0.1]
    with pytest.raises(UsageError, match="at or past the end"):
        sample_timestamps(0.2, [0.0], start=0.5)
    assert sample_timestamps(0.0, [0.0], start=0.5) == [0.0]  # no duration known: nothing to place it in


def test_an_enormous_fps_ends_and_takes_every_frame_once():
    """--fps far above the frame rate, up to MAX_FPS, takes each of the clip's frames once; above
    it is a usage error (at 1e30 fps, s + k / fps stops moving and the sampler never ended; at
    1e308 it overflowed deep in decoding)."""
    from vl3cli.sampling import MAX_FPS

    times = [i / 30 for i in range(90)]
    for fps in (1e4, 123456.7, MAX_FPS):
        got = sample_timestamps(3.0, times, fps=fps, min_frames=1, max_frames=1000)
        assert got == pytest.approx(times), fps
    for fps in (1e30, 1e308):
        with pytest.raises(UsageError, match="--fps must be at most"):
            sample_timestamps(3.0, times, fps=fps)
