"""segments.py (windows, scene spans) and the subtitle cues, checked by hand and by parsers we did not write."""

from __future__ import annotations

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
    with pytest.raises(UsageError, match="--min-segment"):
        scene_spans([], 10, min_segment=5, max_segment=2)


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
