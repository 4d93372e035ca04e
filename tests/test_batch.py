"""batch.py: input expansion, sharding, resume / retry / overwrite planning, the item loop."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vl3cli.batch import (
    DEFAULT_EXTS,
    StopSignal,
    Summary,
    expand_inputs,
    in_shard,
    parse_exts,
    parse_shard,
    plan,
    read_records,
    run_items,
)  # fmt: skip
from vl3cli.errors import MediaError, UsageError
from vl3cli.output import Result


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ["d/a.jpg", "d/sub/b.MP4", "d/sub/deep/c.png", "d/notes.txt", "d/.hidden/x.jpg", "d/.y.jpg", "e.webm"]:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(b"x")
    return tmp_path


def test_expand_folders_files_globs_and_lists(tree):
    exts = parse_exts(None)
    assert expand_inputs(["d"], None, exts) == ["d/a.jpg", "d/sub/b.MP4", "d/sub/deep/c.png"]
    assert expand_inputs(["d/notes.txt"], None, exts) == ["d/notes.txt"]  # named files are always taken
    assert expand_inputs(["d/**/*.png", "e.webm", "./e.webm"], None, exts) == ["d/sub/deep/c.png", "e.webm"]
    assert expand_inputs(["d"], None, parse_exts(["mp4", ".PNG"])) == ["d/sub/b.MP4", "d/sub/deep/c.png"]
    Path("list.txt").write_text("e.webm\n\n  missing.mp4 \nd/a.jpg\n")
    assert expand_inputs([], "list.txt", exts) == ["d/a.jpg", "e.webm", "missing.mp4"]
    assert expand_inputs(["d/a.jpg"], "-", exts, stdin=io.StringIO("e.webm\n")) == ["d/a.jpg", "e.webm"]


def test_expand_errors(tree):
    with pytest.raises(UsageError, match="no such file or folder: nope"):
        expand_inputs(["nope"], None, parse_exts(None))
    with pytest.raises(UsageError, match=r"match d/\*\.gif"):
        expand_inputs(["d/*.gif"], None, parse_exts(None))
    with pytest.raises(UsageError, match="--files-from"):
        expand_inputs([], "no-list.txt", parse_exts(None))


def test_default_exts_cover_images_and_videos():
    assert {"jpg", "png", "webp", "mp4", "mkv", "mov", "webm"} <= set(DEFAULT_EXTS)


@pytest.mark.parametrize("bad", ["4/4", "-1/4", "1", "a/b", "1/0", "2/1"])
def test_bad_shard(bad):
    with pytest.raises(UsageError):
        parse_shard(bad)


@given(paths=st.sets(st.text(min_size=1, max_size=20), max_size=60), n=st.integers(1, 7))
def test_shards_partition_the_inputs(paths, n):
    shards = [[p for p in sorted(paths) if in_shard(p, parse_shard(f"{k}/{n}"))] for k in range(n)]
    assert sorted(p for s in shards for p in s) == sorted(paths)


def test_shards_are_stable_and_balanced():
    paths = [f"videos/{i:06d}.mp4" for i in range(4000)]
    sizes = [sum(in_shard(p, (k, 4)) for p in paths) for k in range(4)]
    assert sum(sizes) == 4000 and min(sizes) > 900
    # a file keeps its shard whatever else is in the list (no dependence on position)
    assert [in_shard("videos/000123.mp4", (k, 4)) for k in range(4)].count(True) == 1


def line(path, error=None):
    return json.dumps(Result(path=path, text=None if error else "t", error=error).to_dict()) + "\n"


def test_read_records_repairs_a_truncated_last_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(line("a") + line("b", "bad file") + line("c")[:25])
    status, bad = read_records(out)
    assert status == {"a": True, "b": False} and bad == 0
    assert out.read_text() == line("a") + line("b", "bad file")


def test_read_records_skips_garbage_lines(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("not json\n" + line("a") + "[1]\n" + line("a", "later error"))
    status, bad = read_records(out)
    assert status == {"a": True} and bad == 2  # a success anywhere counts


def test_plan_modes(tmp_path):
    out = tmp_path / "r.jsonl"
    items = ["a", "b", "c", "d"]
    assert plan(items, None, "resume").todo == items
    assert plan(items, out, "resume").todo == items  # no file yet: an empty one is made
    assert out.read_text() == ""
    out.write_text(line("a") + line("b", "corrupt") + line("zz"))
    p = plan(items, out, "resume")
    assert (p.todo, p.done, p.failed_before) == (["c", "d"], 1, 1)
    p = plan(items, out, "retry-failed")
    assert (p.todo, p.done, p.failed_before) == (["b", "c", "d"], 1, 0)
    assert out.read_text() == line("a") + line("zz")  # the old error record is gone: one record per item
    p = plan(items, out, "overwrite")
    assert p.todo == items and out.read_text() == ""


def fake(fail=(), interrupt_at=None):
    seen = []

    def process(path, check):
        seen.append(path)
        if path == interrupt_at:
            raise KeyboardInterrupt
        if path in fail:
            raise MediaError(f"{path}: cannot decode")
        if path == "boom":
            raise RuntimeError("kaputt")
        check()
        return Result(path=path, text=f"caption of {path}")

    return process, seen


def records(text):
    return [json.loads(x) for x in text.splitlines()]


def test_run_items_error_records_and_summary():
    process, _seen = fake(fail={"b"})
    sink = io.StringIO()
    s = run_items(["a", "b", "boom", "c"], process, sink, Summary(total=4, done_before=0, failed_before=0), StopSignal(), {"model": "m"})
    recs = records(sink.getvalue())
    assert [r["path"] for r in recs] == ["a", "b", "boom", "c"]
    assert recs[1]["error"] == "b: cannot decode" and recs[1]["model"] == "m" and recs[1]["text"] is None
    assert recs[2]["error"] == "RuntimeError: kaputt"
    assert (s.ok, s.failed, s.exit_code) == (2, 2, 1)
    assert "2 ok, 2 failed" in s.line()


def test_run_items_interrupt_abandons_the_current_item():
    process, seen = fake(interrupt_at="b")
    sink = io.StringIO()
    s = run_items(["a", "b", "c"], process, sink, Summary(3, 0, 0), StopSignal())
    assert [r["path"] for r in records(sink.getvalue())] == ["a"]
    assert seen == ["a", "b"] and s.interrupted and s.exit_code == 130
    assert "Interrupted" in s.line() and "2 left" in s.line()


def test_stop_signal_first_sigint_stops_at_next_check():
    process, _seen = fake()
    sink = io.StringIO()
    with StopSignal() as stop:

        def on_item(path, result):
            if path == "a":
                os.kill(os.getpid(), signal.SIGINT)  # handled: sets the flag, raises nothing

        s = run_items(["a", "b", "c"], process, sink, Summary(3, 0, 0), stop, on_item=on_item)
    assert [r["path"] for r in records(sink.getvalue())] == ["a"] and s.interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_exit_codes():
    assert Summary(3, 3, 0).exit_code == 0
    assert Summary(3, 2, 1).exit_code == 1  # a failure from an earlier run still counts
    assert Summary(3, 0, 0, ok=3).exit_code == 0
