"""segments.py (windows, scene spans) and the subtitle cues, checked by hand and by parsers we did not write."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vl3cli.errors import UsageError
from vl3cli.output import cue_text, subtitle_cue, timecode
from vl3cli.segments import parse_segments, scene_spans, windows


def test_fixed_windows_are_exact():
    assert windows(95.0, 30) == [(0, 30), (30, 60), (60, 90), (90, 95.0)]
    assert windows(90.0, 30) == [(0, 30), (30, 60), (60, 90)]
    assert windows(90.1, 30) == [(0, 30), (30, 60), (60, 90.1)]  # a 0.1 s tail joins the last window
    assert windows(100.0, 30, start=10, end=70) == [(10, 40), (40, 70)]
    assert windows(5.0, 30) == [(0, 5.0)]


@given(duration=st.floats(0.5, 7200), seconds=st.floats(0.5, 600))
def test_windows_cover_the_clip_without_gaps(duration, seconds):
    spans = windows(duration, seconds)
    assert spans[0][0] == 0 and spans[-1][1] == duration
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(e - s <= seconds + 1e-9 or i == len(spans) - 1 for i, (s, e) in enumerate(spans))


def test_scene_spans_merge_short_and_split_long():
    assert scene_spans([10, 20], 30) == [(0, 10), (10, 20), (20, 30)]
    # a 1 s shot joins its shorter neighbour
    assert scene_spans([10, 11, 25], 40, min_segment=2) == [(0, 11), (11, 25), (25, 40)]
    assert scene_spans([0.5, 10], 20, min_segment=2) == [(0, 10), (10, 20)]
    # a 40 s shot becomes 3 parts of 13.3 s with --max-segment 15
    spans = scene_spans([], 40, max_segment=15)
    assert len(spans) == 3 and spans[0] == (0, pytest.approx(40 / 3)) and spans[-1][1] == 40
    assert scene_spans([5, 50], 60, start=10, end=40) == [(10, 40)]


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.floats(0.05, 99.0, allow_nan=False), max_size=8),
    low=st.floats(0.1, 5.0),
    high=st.floats(0.3, 7.0),
    start=st.floats(0.0, 10.0),
)
def test_scene_spans_tile_the_window_exactly(cuts, low, high, start):
    """Every span ends exactly where the next begins (==, not within a rounding error), and the
    spans cover [start, duration] (split parts of a long shot included)."""
    spans = scene_spans(sorted(set(cuts)), 100.0, min_segment=min(low, high), max_segment=high, start=start)
    assert spans[0][0] == start and spans[-1][1] == 100.0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(e > s for s, e in spans)


def test_parse_segments():
    assert parse_segments("30") == 30.0 and parse_segments("scenes") == "scenes" and parse_segments(None) is None
    for bad in ("0", "-2", "abc", "nan"):
        with pytest.raises(UsageError, match="--segments"):
            parse_segments(bad)


def test_timecodes_and_cues():
    assert timecode(3661.2346) == "01:01:01.235" and timecode(0.0004, ",") == "00:00:00,000"
    assert cue_text("a\n\nb --> c") == "a\nb -> c"
    assert cue_text("A ---> B ----> C") == "A -> B -> C"  # no "-->" left behind by a longer arrow
    assert cue_text("x\x00\x10y z\x7f") == "xy z"
    assert cue_text("x <b> & y", vtt=True) == "x &lt;b&gt; &amp; y"
    assert max(len(line) for line in cue_text("word " * 40).splitlines()) <= 42


def test_subtitles_parse_with_independent_parsers():
    import srt
    import webvtt

    caps = [(0, 30, "A cat jumps onto the table.\n\nThen it sits ---> down."), (30, 61.5, "It looks at <the> camera & leaves " * 3)]
    text = "".join(subtitle_cue(i + 1, s, e, c, "srt") for i, (s, e, c) in enumerate(caps))
    subs = list(srt.parse(text))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [(1, 0, 30), (2, 30, 61.5)]
    assert "sits -> down." in subs[0].content
    vtt = "WEBVTT\n\n" + "".join(subtitle_cue(i + 1, s, e, c, "vtt") for i, (s, e, c) in enumerate(caps))
    cues = webvtt.from_string(vtt).captions
    assert [(c.start, c.end) for c in cues] == [("00:00:00.000", "00:00:30.000"), ("00:00:30.000", "00:01:01.500")]
    assert "&lt;the&gt;" in cues[1].raw_text or "<the>" in cues[1].text


def test_a_clip_shorter_than_a_millisecond_is_a_cue_of_one():
    """`--start 1 --end 1.0004` (or a clip of one instant): a cue lasts at least 1 ms, as parsed by
    srt and webvtt-py (both round-trip the times), never a zero-length cue players drop."""
    import srt
    import webvtt

    for start, end, expected in [(1.0, 1.0004, ("00:00:01.000", "00:00:01.001")),
                                 (3.0, 3.0, ("00:00:03.000", "00:00:03.001")),
                                 (2.9996, 3.0, ("00:00:03.000", "00:00:03.001"))]:  # fmt: skip
        sub = next(srt.parse(subtitle_cue(1, start, end, "x", "srt")))
        assert (sub.end - sub.start).total_seconds() == pytest.approx(0.001)
        cue = webvtt.from_string("WEBVTT\n\n" + subtitle_cue(1, start, end, "x", "vtt")).captions[0]
        assert (cue.start, cue.end) == expected
    sub = next(srt.parse(subtitle_cue(1, 1.0, 1.0016, "x", "srt")))  # longer ones keep their own end
    assert sub.end.total_seconds() == pytest.approx(1.002)


def test_absurd_segment_lengths_are_refused():
    """Shorter than 0.1 s, or more than 100,000 segments of one video: one UsageError, no list built."""
    for bad in ("0.05", "1e-7"):
        with pytest.raises(UsageError, match=r"--segments must be at least 0\.1 seconds"):
            parse_segments(bad)
    assert parse_segments("0.1") == 0.1
    with pytest.raises(UsageError, match="--segments 0.1 would cut this video into 200,000 segments"):
        windows(20000.0, 0.1)
    assert len(windows(10000.0, 0.1)) == 100_000
    with pytest.raises(UsageError, match="--max-segment 0.1 would cut this video into 300,000 segments"):
        scene_spans([], 30000.0, max_segment=0.1)
    with pytest.raises(UsageError, match=r"--max-segment must be at least 0\.1"):
        scene_spans([], 3.0, max_segment=0.01)


def test_a_window_past_the_end_names_start_not_end():
    for spans in (lambda: windows(3.0, 1, start=5), lambda: scene_spans([1.0], 3.0, start=5)):
        with pytest.raises(UsageError, match=r"^--start \(5s\) is at or past the end of the video \(3\.000s\)$"):
            spans()


def merged_by_hand(bounds: list[float], low: float) -> list[tuple[float, float]]:
    """The merge rule, step by step: the first shortest span under `low` joins its shorter neighbour
    (the earlier one on a tie), until none is left or one span remains."""
    spans = list(zip(bounds, bounds[1:]))
    while len(spans) > 1:
        lengths = [e - s for s, e in spans]
        i = lengths.index(min(lengths))
        if lengths[i] >= low:
            break
        j = 1 if i == 0 else i - 1 if i == len(spans) - 1 or lengths[i - 1] <= lengths[i + 1] else i + 1
        a, b = sorted((i, j))
        spans[a : b + 1] = [(spans[a][0], spans[b][1])]
    return spans


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.integers(1, 40), min_size=1, max_size=30), low=st.integers(0, 60))
def test_shots_merge_as_the_rule_says(steps, low):
    """Cuts on a 1/8 s grid (exact floats, so equal lengths tie as they do by hand)."""
    bounds = [0.0]
    for step in steps:
        bounds.append(bounds[-1] + step / 8)
    assert scene_spans(bounds[1:-1], bounds[-1], min_segment=low / 8) == merged_by_hand(bounds, low / 8)


def test_a_cut_at_every_frame_of_a_long_video_does_not_hang():
    """An hour at 25 fps with a cut at every frame (a strobe, or --scene-threshold near 0): merging
    90,000 shots used to take quadratic time (tens of minutes); it takes well under a second."""

    def hung(*_):
        raise TimeoutError("merging 90,000 shots hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        spans = scene_spans([k / 25 for k in range(1, 90_000)], 3600.0, min_segment=2.0, max_segment=60.0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert spans[0][0] == 0.0 and spans[-1][1] == 3600.0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(2.0 <= e - s <= 60.0 for s, e in spans)


def test_bounds_carry_no_float_noise():
    """0.7 * 3 is 2.0999999999999996 in floats, and a cut's time through a float time base can be
    7.8999999999999995: records and resume keys say 2.1 and 7.9 (values worked out by hand)."""
    assert windows(4.1, 0.7) == [(0.0, 0.7), (0.7, 1.4), (1.4, 2.1), (2.1, 2.8), (2.8, 3.5), (3.5, 4.1)]
    assert windows(10.0, 0.1, start=0.2, end=0.6) == [(0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6)]
    assert scene_spans([7.8999999999999995], 10.0) == [(0.0, 7.9), (7.9, 10.0)]
    assert scene_spans([], 2.1, max_segment=0.8) == [(0.0, 0.7), (0.7, 1.4), (1.4, 2.1)]  # not 0.7000000000000001
    assert scene_spans([], 1.2, max_segment=0.3) == [(0.0, 0.3), (0.3, 0.6), (0.6, 0.9), (0.9, 1.2)]
    thirds = scene_spans([], 10.0, max_segment=4.0)
    assert thirds == [(0.0, 3.333333333), (3.333333333, 6.666666667), (6.666666667, 10.0)]
    # the given start and the clip's end are kept as they are
    assert windows(3.0, 1.0, start=0.1234567891234)[0][0] == 0.1234567891234
    assert windows(2.0999999999999996, 1.0)[-1][1] == 2.0999999999999996


def test_the_default_shortest_shot_yields_to_a_smaller_longest_one():
    """`--max-segment 1` alone: the default --min-segment (2 s) cannot hold, so it yields, as the
    default --min-frames yields to --max-frames; a --max-segment under 0.1 s is named as such."""
    assert scene_spans([0.5, 4.0], 6.0, min_segment=2.0, max_segment=1.0) == [
        (0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 5.0), (5.0, 6.0),
    ]  # fmt: skip
    with pytest.raises(UsageError, match=r"^--max-segment must be at least 0\.1 seconds \(got 0\.05\)$"):
        scene_spans([], 3.0, min_segment=2.0, max_segment=0.05)
