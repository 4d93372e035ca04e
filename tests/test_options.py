"""options.py: validation in command-line names, checkpoint defaults and the frame-bound rule;
cli._InOrder: answers in question order, each as soon as it can be."""

from __future__ import annotations

import io
import json

import pytest

from vl3cli.cli import _InOrder
from vl3cli.errors import UsageError
from vl3cli.options import Options
from vl3cli.output import Result, Writer
from vl3cli.preprocess import ProcessorConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"temperature": -1}, "--temperature"),
        ({"top_p": 0}, "--top-p"),
        ({"fps": 0}, "--fps"),
        ({"fps": float("nan")}, "--fps"),
        ({"max_frames": 0}, "--max-frames must be at least 1"),
        ({"min_frames": 0}, "--min-frames must be at least 1"),
        ({"min_frames": 9, "max_frames": 3}, "--min-frames (9) is above --max-frames (3)"),
        ({"start": -1}, "--start"),
        ({"start": 5, "end": 5}, "--end (5s) must be after --start (5s)"),
        ({"max_visual_tokens": 0}, "--max-visual-tokens"),
        ({"prune_threshold": -0.1}, "--prune-threshold"),
        ({"colour": "red"}, "unknown option(s) colour"),
        ({"fps": "2"}, "--fps must be a number"),
        ({"max_frames": 2.5}, "--max-frames must be a whole number"),
        ({"prune": 1}, "--prune must be true or false"),
        ({"system": 3}, "--system must be text"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"temperature": float("inf")}, "--temperature"),
        ({"temperature": 1e308}, "--temperature"),  # beyond float32: it could not reach the device
        ({"repetition_penalty": float("nan")}, "--repetition-penalty"),
        ({"repetition_penalty": float("inf")}, "--repetition-penalty"),
        ({"top_p": float("nan")}, "--top-p"),
        ({"top_k": 2**63}, "--top-k"),
        ({"seed": 2**63}, "--seed must be between"),
        ({"seed": -(2**63) - 1}, "--seed must be between"),
        ({"segments": "scenes", "max_segment": 0.05}, "--max-segment must be at least 0.1 seconds (got 0.05)"),
        ({"scene_threshold": 50}, "--scene-threshold is for --segments scenes"),
        ({"segments": 2, "scene_threshold": 50}, "--scene-threshold is for --segments scenes"),
    ],
)
def test_bad_options_name_the_command_line_option(kwargs, message):
    with pytest.raises(UsageError) as e:
        Options.from_kwargs(**kwargs)
    assert message in str(e.value)
    if "unknown" not in message:  # the option as typed on the command line, never the Python name
        assert not any(f"{name} " in str(e.value) for name in kwargs if "_" in name)


def test_extreme_values_that_fit_are_accepted():
    """The bounds are those of the device tensors (int64 seeds and top-k, float32 temperatures)."""
    options = Options.from_kwargs(seed=2**63 - 1, top_k=2**63 - 1, temperature=3e38, repetition_penalty=3e38)
    assert options.seed == 2**63 - 1 and Options.from_kwargs(seed=-(2**63)).seed == -(2**63)


def test_frame_bounds_follow_each_other():
    processor = ProcessorConfig(fps=1.0, min_frames=4, max_frames=180)
    assert (lambda m: (m.fps, m.min_frames, m.max_frames))(Options().media(processor)) == (1.0, 4, 180)
    m = Options(max_frames=1).media(processor)
    assert (m.min_frames, m.max_frames) == (1, 1)  # --max-frames 1 alone works: the minimum follows it down
    m = Options(max_frames=64).media(processor)
    assert (m.min_frames, m.max_frames) == (4, 64)
    m = Options(min_frames=200).media(processor)
    assert (m.min_frames, m.max_frames) == (200, 200)
    m = Options(fps=2.5, min_frames=2, max_frames=8).media(processor)
    assert (m.fps, m.min_frames, m.max_frames) == (2.5, 2, 8)


def test_the_scene_threshold_is_for_scenes_only():
    """Refused with another value elsewhere (it would change nothing but what resume compares); its
    default is accepted anywhere and stored as vl3 always stored it, so older files still resume."""
    assert Options(segments="scenes", scene_threshold=50).scene_threshold == 50.0
    assert Options(scene_threshold=10).record(None)["scene_threshold"] == 10.0
    assert Options(segments="scenes", max_segment=0.1).max_segment == 0.1


def test_one_spelling_per_value():
    assert Options(fps=2).record(None) == Options(fps=2.0).record(None)
    assert isinstance(Options(temperature=1).temperature, float)


def test_record_is_the_request():
    rec = Options(fps=2.0, system="Be brief.").record("Why?")
    assert rec["prompt"] == "Why?" and rec["fps"] == 2.0 and "system" not in rec
    assert json.loads(json.dumps(rec)) == rec


def printer(fmt: str, prompts, stream: bool):
    out = io.StringIO()
    return _InOrder(Writer(fmt, out, many=len(prompts) > 1), list(prompts), stream), out


def answer(i: int, text: str) -> Result:
    return Result(path="a.png", prompt=f"q{i}", text=text)


def test_answers_in_question_order_as_soon_as_possible():
    p, out = printer("jsonl", ["q0", "q1", "q2"], stream=False)
    p.done(1, answer(1, "one"))
    assert out.getvalue() == ""  # waits for q0
    p.done(0, answer(0, "zero"))
    assert [json.loads(x)["text"] for x in out.getvalue().splitlines()] == ["zero", "one"]
    p.done(2, answer(2, "two"))
    assert len(out.getvalue().splitlines()) == 3


def test_the_model_load_is_counted_on_the_first_answer_written():
    """Questions finish in any order; the load, paid by whichever finished first, goes on the first
    record (the README: shared work is counted on the first record), and each total moves with it."""
    p, out = printer("jsonl", ["q0", "q1", "q2"], stream=False)
    records = [answer(i, t) for i, t in enumerate(("zero", "one", "two"))]
    for r, load in zip(records, (0.0, 0.0, 5.0)):
        r.timings = {"load_s": load, "encode_s": 1.0, "decode_s": 2.0, "total_s": load + 3.0}
    for i in (2, 1, 0):
        p.done(i, records[i])
    written = [json.loads(x)["timings"] for x in out.getvalue().splitlines()]
    assert [(t["load_s"], t["total_s"]) for t in written] == [(5.0, 8.0), (0.0, 3.0), (0.0, 3.0)]


def test_interrupted_json_array_keeps_the_finished_answers():
    p, out = printer("json", ["q0", "q1", "q2"], stream=False)
    p.done(0, answer(0, "zero"))
    p.close()  # Ctrl-C: the CLI closes the printer in `finally`
    assert [r["text"] for r in json.loads(out.getvalue())] == ["zero"]


def test_streamed_text_interleaves_nothing_and_ends_its_line():
    p, out = printer("text", ["q0", "q1"], stream=True)
    p.piece((0, 1), "b")  # q1 decodes alongside q0: held back
    p.piece((0, 0), "a")
    p.piece((0, 0), "\x1b[2Jx")
    assert out.getvalue() == "Q: q0\na\x1b[2Jx"  # not a terminal here: text as generated
    p.done(0, answer(0, "a\x1b[2Jx"))
    p.piece((0, 1), "c")
    assert out.getvalue() == "Q: q0\na\x1b[2Jx\n\nQ: q1\nbc"
    p.close()  # interrupted mid-answer: the line is ended
    assert out.getvalue().endswith("bc\n")
