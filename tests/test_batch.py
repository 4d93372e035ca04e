"""inputs.py: input expansion and sharding; batch.py: resume / retry / overwrite planning, the item loop."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from media_factory import make_image
from typer.testing import CliRunner

from vl3cli.batch import (
    StopSignal,
    Summary,
    model_key,
    plan,
    plan_segments,
    record_key,
    write_results,
)  # fmt: skip
from vl3cli.cli import app
from vl3cli.errors import UsageError
from vl3cli.hub import model_label
from vl3cli.inputs import DEFAULT_EXTS, expand_inputs, in_shard, parse_exts, parse_shard
from vl3cli.outfile import Sink, Target
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


def test_an_input_that_yields_nothing_is_a_usage_error(tree):
    Path("empty").mkdir()
    with pytest.raises(UsageError, match="empty holds no .*files"):
        expand_inputs(["d", "empty"], None, parse_exts(None))
    with pytest.raises(UsageError, match="d holds no flac files"):
        expand_inputs(["d"], None, parse_exts(["flac"]))
    Path("blank.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="lists no files"):
        expand_inputs([], "blank.txt", parse_exts(None))


@pytest.fixture
def unreadable(monkeypatch):
    """Folders that cannot be listed (as `chmod 000` makes them for a user other than root):
    os.walk's own scandir call raises PermissionError for them."""
    denied: set[str] = set()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.normpath(os.fsdecode(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return denied


def test_a_folder_that_cannot_be_read_is_reported(tree, unreadable):
    unreadable.add("d/sub")
    found: dict[str, str] = {}
    assert expand_inputs(["d"], None, parse_exts(None), unreadable=found) == ["d/a.jpg"]
    assert found == {"d/sub": "Permission denied"}
    with pytest.raises(UsageError, match="cannot read the folder d/sub: Permission denied"):
        expand_inputs(["d"], None, parse_exts(None))  # no one to report it to: not skipped silently
    unreadable.add("d")
    with pytest.raises(UsageError, match="cannot read the folder d: Permission denied"):  # not "holds no files"
        expand_inputs(["d"], None, parse_exts(None), unreadable={})


def test_symlink_loops_are_walked_once(tree):
    os.symlink("..", "d/sub/up")  # d/sub/up -> d: a loop
    os.symlink(os.path.abspath("d/sub"), "d/again")  # a second route into d/sub
    assert expand_inputs(["d"], None, parse_exts(None)) == ["d/a.jpg", "d/again/b.MP4", "d/again/deep/c.png"]


def test_one_item_per_real_file(tree):
    os.symlink("a.jpg", "d/alias.jpg")
    spellings = ["d/a.jpg", "./d/a.jpg", os.path.abspath("d/a.jpg"), "d/sub/../a.jpg", "d/alias.jpg"]
    assert expand_inputs(spellings, None, parse_exts(None)) == [os.path.abspath("d/a.jpg")]
    assert expand_inputs(["d/a.jpg", "d"], None, parse_exts(None)) == ["d/a.jpg", "d/sub/b.MP4", "d/sub/deep/c.png"]


def test_urls_are_taken_as_written(tree):
    Path("list.txt").write_text("https://example.com/a/../b.mp4\nhttp://x/y.jpg\nhttp://x/y.jpg\n")
    assert expand_inputs(["https://h/c.png"], "list.txt", parse_exts(None)) == [
        "http://x/y.jpg", "https://example.com/a/../b.mp4", "https://h/c.png",
    ]  # fmt: skip


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


def line(path, error=None, prompt=None, model="m", **options):
    record = Result(path=path, text=None if error else "t", error=error, model=model,
                    options={"prompt": prompt, "max_new_tokens": 512, **options}).to_dict()  # fmt: skip
    return json.dumps(record) + "\n"


def keyed(paths, prompt=None, model="m", **options):
    return [(record_key({"path": p, "model": model, "options": {"prompt": prompt, "max_new_tokens": 512, **options}}), p) for p in paths]


def test_plan_modes(tmp_path):
    out = Target(tmp_path / "r.jsonl", True)
    items = keyed(["a", "b", "c", "d"])
    assert plan(items, Target(None, False), "resume").todo == ["a", "b", "c", "d"]
    assert plan(items, out, "resume").todo == ["a", "b", "c", "d"]  # no file yet
    out.path.write_text(line("a") + line("b", "corrupt") + line("zz"))
    p = plan(items, out, "resume")
    assert (p.todo, p.done, p.failed_before) == (["c", "d"], 1, 1)
    p = plan(items, out, "retry-failed")
    assert (p.todo, p.done, p.failed_before) == (["b", "c", "d"], 1, 0)
    assert out.path.read_text() == line("a") + line("zz")  # the old error record is gone: one record per item
    p = plan(items, out, "overwrite")
    assert p.todo == ["a", "b", "c", "d"]


def test_resume_is_keyed_by_prompt_options_and_model(tmp_path):
    """A record answers only the request it was made for: another prompt, option or model is not done."""
    out = Target(tmp_path / "r.jsonl", True)
    out.path.write_text(line("a") + line("b", prompt="Is it red?") + line("c", temperature=0.5))
    assert plan(keyed(["a", "b", "c"]), out, "resume").todo == ["b", "c"]
    assert plan(keyed(["a", "b", "c"], prompt="Is it red?"), out, "resume").todo == ["a", "c"]
    assert plan(keyed(["a", "b", "c"], temperature=0.5), out, "resume").todo == ["a", "b"]
    assert plan(keyed(["a", "b", "c"], model="other"), out, "resume").todo == ["a", "b", "c"]
    before = out.path.read_bytes()
    assert plan(keyed(["a"], prompt="Is it red?"), out, "retry-failed").todo == ["a"]
    assert out.path.read_bytes() == before  # nothing of that key to drop


def test_the_scene_threshold_of_a_run_without_scenes_is_not_compared(tmp_path):
    """Older vl3 stored any --scene-threshold given without --segments scenes, where it changed
    nothing: such a record is done; with scenes the threshold is part of the request."""
    out = Target(tmp_path / "r.jsonl", True)
    out.path.write_text(line("a", scene_threshold=50.0) + line("b", scene_threshold=10.0, segments="2.0")
                        + line("c", scene_threshold=50.0, segments="scenes"))  # fmt: skip
    assert plan(keyed(["a"], scene_threshold=10.0) + keyed(["b"], scene_threshold=10.0, segments="2.0"), out, "resume").todo == []
    assert plan(keyed(["c"], scene_threshold=10.0, segments="scenes"), out, "resume").todo == ["c"]


def test_one_file_however_it_is_spelled_across_runs(tmp_path, monkeypatch):
    """A record written for `a.png` answers `./a.png`, the absolute path and a link to it in a later
    run (as one run takes them for one item); a URL, and a file that is gone, only as written."""
    monkeypatch.chdir(tmp_path)
    Path("a.png").write_bytes(b"x")
    os.symlink("a.png", "link.png")
    spellings = ["a.png", "./a.png", str(tmp_path / "a.png"), "link.png", "sub/../a.png"]
    Path("sub").mkdir()
    out = Target(tmp_path / "r.jsonl", True)
    for old in spellings:
        out.path.write_text(line(old))
        assert [plan(keyed([m, "b.png"]), out, "resume").todo for m in spellings] == [["b.png"]] * 5
    out.path.write_text(line("gone.png") + line("http://host/a.png"))
    assert plan(keyed(["./gone.png", "http://host/./a.png", "gone.png"]), out, "resume").todo == ["./gone.png", "http://host/./a.png"]


def segment_line(path, span, duration, error=None, **options):
    record = json.loads(line(path, error, **options))
    record.update(segment_start=span[0], segment_end=span[1], duration=duration)
    return json.dumps(record) + "\n"


def test_a_video_whose_segments_all_have_records_is_not_read_again(tmp_path):
    """Segments tile their stretch (each starts where the one before ends), so records that reach
    from --start to --end (or the video's end) without a gap finish the video: the resumed run
    skips it without opening the file. Expected values worked out by hand."""
    out = Target(tmp_path / "r.jsonl", True)
    thirds = [(0.0, 10 / 3), (10 / 3, 20 / 3), (20 / 3, 10.0)]  # --max-segment splits, as scene_spans makes them
    out.path.write_text(
        "".join(segment_line("whole", s, 25.0) for s in [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)])
        + segment_line("part", (0.0, 10.0), 25.0)
        + "".join(segment_line("gap", s, 25.0) for s in [(0.0, 10.0), (20.0, 25.0)])
        + "".join(segment_line("clip", s, 60.0, start=5.0, end=25.0) for s in [(5.0, 15.0), (15.0, 25.0)])
        + segment_line("failed", (0.0, 10.0), 20.0) + segment_line("failed", (10.0, 20.0), 20.0, error="bad frame")
        + segment_line("cut", (0.0, 10.0), 30.0) + segment_line("cut", (10.0, 17.5), 17.5)  # found cut short at 17.5 s
        + "".join(segment_line("thirds", s, 10.0) for s in thirds)
    )  # fmt: skip
    names = ["whole", "part", "gap", "failed", "cut", "thirds", "new"]
    items = keyed(names) + keyed(["clip"], start=5.0, end=25.0)
    p = plan_segments(items, out, "resume")
    assert {item: skip for item, skip in p.todo} == {
        "part": {(0.0, 10.0)}, "gap": {(0.0, 10.0), (20.0, 25.0)}, "new": set(),
    }  # fmt: skip
    assert (p.done, p.failed_before) == (14, 1)
    p = plan_segments(items, out, "retry-failed")  # the failed segment is done again
    assert {item: skip for item, skip in p.todo} == {
        "part": {(0.0, 10.0)}, "gap": {(0.0, 10.0), (20.0, 25.0)}, "failed": {(0.0, 10.0)}, "new": set(),
    }  # fmt: skip


def test_a_stream_is_never_read(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = Target.of(str(fifo))
    assert not target.regular
    assert plan(keyed(["a", "b"]), target, "resume").todo == ["a", "b"]  # opening the FIFO to read would hang


def records(text):
    return [json.loads(x) for x in text.splitlines()]


def results(paths, interrupt_at=None, stop=None):
    for path in paths:
        if path == interrupt_at:
            raise KeyboardInterrupt
        yield Result(path=path, text=f"caption of {path}", error="bad" if path == "b" else None)
        if stop:
            stop.check()


def test_write_results_error_records_and_summary():
    sink = Sink(io.StringIO(), "memory")
    s = write_results(results(["a", "b", "c"]), sink, Summary(total=3, done_before=0, failed_before=0), StopSignal())
    assert [r["path"] for r in records(sink.stream.getvalue())] == ["a", "b", "c"]
    assert (s.ok, s.failed, s.exit_code) == (2, 1, 1)
    assert "3 items: 2 ok, 1 failed" in s.line()
    assert Summary(total=1, done_before=0, failed_before=0, ok=1).line().startswith("Done: 1 item: 1 ok")


def test_write_results_interrupt_abandons_the_rest():
    sink = Sink(io.StringIO(), "memory")
    s = write_results(results(["a", "b", "c"], interrupt_at="b"), sink, Summary(3, 0, 0), StopSignal())
    assert [r["path"] for r in records(sink.stream.getvalue())] == ["a"]
    assert s.interrupted and s.exit_code == 130
    assert "Interrupted" in s.line() and "2 left" in s.line()


def test_stop_signal_first_sigint_stops_at_next_check():
    sink = Sink(io.StringIO(), "memory")
    with StopSignal() as stop:

        def on_item(result):
            if result.path == "a":
                os.kill(os.getpid(), signal.SIGINT)  # handled: sets the flag, raises nothing

        s = write_results(results(["a", "b", "c"], stop=stop), sink, Summary(3, 0, 0), stop, on_item=on_item)
    assert [r["path"] for r in records(sink.stream.getvalue())] == ["a"] and s.interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_stops_like_sigint_with_its_own_exit_status():
    """SIGTERM (a Slurm time limit, `kill`) ends the run as Ctrl-C does; the exit status is 128 + 15."""
    sink = Sink(io.StringIO(), "memory")
    before = signal.getsignal(signal.SIGTERM)  # the default, or the handler a Ray run in this process left
    with StopSignal() as stop:

        def on_item(result):
            if result.path == "a":
                os.kill(os.getpid(), signal.SIGTERM)

        s = write_results(results(["a", "b", "c"], stop=stop), sink, Summary(3, 0, 0), stop, on_item=on_item)
    assert [r["path"] for r in records(sink.stream.getvalue())] == ["a"] and s.interrupted and s.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # put back as it was


def test_stop_signal_while_waiting_stops_at_once():
    """A driver blocked on others' work (the Ray engine) is interrupted by the first signal."""
    with StopSignal() as stop:
        with pytest.raises(KeyboardInterrupt), stop.waiting():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # not reached: the handler raises
        assert stop.requested and not stop.blocked
        with pytest.raises(KeyboardInterrupt):
            stop.check()  # and the run stops at its next check


def test_exit_codes():
    assert Summary(3, 3, 0).exit_code == 0
    assert Summary(3, 2, 1).exit_code == 1  # a failure from an earlier run still counts
    assert Summary(3, 0, 0, ok=3).exit_code == 0


def test_a_record_written_as_an_error_counts_as_failed():
    class Refusing(Sink):
        def write_record(self, result):
            return Result(path=result.path, error="cannot write this record: no")

    s = write_results(results(["a"]), Refusing(io.StringIO(), "memory"), Summary(1, 0, 0), StopSignal())
    assert (s.ok, s.failed, s.exit_code) == (0, 1, 1)


def test_one_local_model_however_it_is_spelled(tmp_path, monkeypatch):
    """`-m ckpt`, `ckpt/`, `./ckpt`, the absolute path and a link are one model for resume, in
    records written with any of those labels (earlier versions wrote the string as given)."""
    monkeypatch.chdir(tmp_path)
    Path("ckpt").mkdir()
    os.symlink("ckpt", "alias")
    spellings = ["ckpt", "ckpt/", "./ckpt", "./ckpt/", str(tmp_path / "ckpt"), "alias", "ckpt/../ckpt"]
    assert {model_label(m, None) for m in spellings[:4]} == {"ckpt"}  # tidied, not made absolute
    assert model_label(str(tmp_path / "ckpt"), "main") == str(tmp_path / "ckpt")  # a revision is for Hub ids
    assert model_label("org/model", "main") == "org/model@main" and model_key("org/model@main") == "org/model@main"
    out = Target(tmp_path / "r.jsonl", True)
    for old in spellings:
        out.path.write_text(line("a", model=old))
        assert [plan(keyed(["a", "b"], model=model_label(m, None)), out, "resume").todo for m in spellings] == [["b"]] * 7


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return str(make_image(tmp_path_factory.mktemp("batch-media") / "a.png", size=(32, 32)))


def run_batch(ckpt, *args):
    return CliRunner().invoke(app, ["batch", *map(str, args), "-m", str(ckpt), "--max-new-tokens", "2"])


def test_overwrite_empties_the_file_when_nothing_is_left_to_run(hf_checkpoint, image, tmp_path):
    empty = next(k for k in range(2) if not in_shard(image, (k, 2)))
    full = 1 - empty
    out = tmp_path / "r.jsonl"
    assert run_batch(hf_checkpoint, image, "--shard", f"{full}/2", "--out", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 1
    r = run_batch(hf_checkpoint, image, "--shard", f"{empty}/2", "--overwrite", "--out", out)
    assert r.exit_code == 0 and "0 items" in r.stderr, r.output
    assert out.read_bytes() == b""
    r = run_batch(hf_checkpoint, image, "--shard", f"{empty}/2", "--out", out)  # without --overwrite: kept as is
    assert r.exit_code == 0 and out.read_bytes() == b""


def test_an_unreadable_folder_is_an_error_record_and_the_rest_goes_on(hf_checkpoint, image, tmp_path, unreadable):
    top = tmp_path / "photos"
    (top / "locked").mkdir(parents=True)
    shutil.copy(image, top / "a.png")
    unreadable.add(str(top / "locked"))
    out = tmp_path / "r.jsonl"
    r = run_batch(hf_checkpoint, top, "--out", out)
    assert r.exit_code == 1 and "1 ok, 1 failed" in r.stderr, r.output
    by_path = {x["path"]: x for x in records(out.read_text())}
    assert by_path[str(top / "a.png")]["error"] is None
    assert by_path[str(top / "locked")]["error"] == f"cannot read the folder {top / 'locked'}: Permission denied"


def test_a_list_is_split_at_newlines_only(tree):
    """U+0085, U+2028 and U+2029 are characters a file name may hold: `--files-from` splits at "\\n"
    alone (a "\\r" before it dropped), from a file as from stdin."""
    names = ["a\x85b.png", "c\u2028d.png", "e\u2029f.png"]
    for name in names:
        Path(name).write_bytes(b"x")
    Path("list.txt").write_bytes(f"{names[0]}\n{names[1]}\r\n{names[2]}\n".encode())
    assert expand_inputs([], "list.txt", parse_exts(None)) == sorted(names)
    stdin = io.TextIOWrapper(io.BytesIO(Path("list.txt").read_bytes()))
    assert expand_inputs([], "-", parse_exts(None), stdin=stdin) == sorted(names)


def test_a_list_that_is_not_utf8_is_read_like_stdin(tree):
    """A file name that is not UTF-8 listed in a --files-from file is read as Python reads file
    names (surrogateescape), so it is the name os.listdir gives, as when listed on stdin."""
    os.close(os.open(b"caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    (odd,) = [n for n in os.listdir(".") if n.startswith("caf")]
    Path("list.txt").write_bytes(b"caf\xe9.png\ne.webm\n")
    assert expand_inputs([], "list.txt", parse_exts(None)) == sorted([odd, "e.webm"])
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9.png\ne.webm\n"), errors="strict")  # a locale that is not C.UTF-8
    assert expand_inputs([], "-", parse_exts(None), stdin=stdin) == sorted([odd, "e.webm"])


def test_dotdot_after_a_link_is_resolved_as_the_os_does(tree):
    """`np/link/../x.png` with np/link -> real/sub opens np/real/x.png (the parent of the link's
    target), not np/x.png: the item is the file the OS opens, spelled as given."""
    Path("np/real/sub").mkdir(parents=True)
    os.symlink("real/sub", "np/link")
    Path("np/real/x.png").write_bytes(b"the real one")
    Path("np/x.png").write_bytes(b"another file")
    (item,) = expand_inputs(["np/link/../x.png"], None, parse_exts(None))
    assert Path(item).read_bytes() == b"the real one" and item == "np/link/../x.png"
    assert expand_inputs(["np/link/../x.png", "np/x.png"], None, parse_exts(None)) == ["np/link/../x.png", "np/x.png"]
    assert expand_inputs(["np/real/sub/../x.png", "np/real/x.png"], None, parse_exts(None)) == ["np/real/x.png"]


class _Listing:
    """What os.scandir returns (an iterator and a context manager), over entries in a fixed order."""

    def __init__(self, entries):
        self.entries = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def close(self):
        return None


@pytest.mark.parametrize("reverse", [False, True])
def test_a_file_reached_by_several_routes_is_spelled_the_way_that_sorts_first(tree, monkeypatch, reverse):
    """Whatever order the file system lists a folder in: tree2/c/toa -> ../a and tree2/a-b ->
    a/x, so a/i.png is also c/toa/i.png, and a/x/j.png also a-b/j.png ("a-b/" sorts before
    "a/x/": "-" is before "/"). The shard hash takes that spelling too."""
    real_scandir = os.scandir

    def scandir(path="."):
        with real_scandir(path) as entries:
            return _Listing(sorted(entries, key=lambda e: e.name, reverse=reverse))

    Path("tree2/a/x").mkdir(parents=True)
    Path("tree2/c").mkdir()
    Path("tree2/a/i.png").write_bytes(b"x")
    Path("tree2/a/x/j.png").write_bytes(b"x")
    os.symlink("../a", "tree2/c/toa")
    os.symlink("a/x", "tree2/a-b")
    monkeypatch.setattr(os, "scandir", scandir)
    found = expand_inputs(["tree2"], None, parse_exts(None))
    assert found == ["tree2/a-b/j.png", "tree2/a/i.png"]
    assert expand_inputs(["tree2/a/i.png", "tree2/c/toa/i.png", "tree2/a/x/j.png", "tree2/a-b/j.png"], None, parse_exts(None)) == found


@pytest.mark.parametrize("bad", ["²/4", "1/²", "٣/4", "4/٥", "1/" + "9" * 5000])
def test_shard_takes_ascii_digits_only(bad):
    """`str.isdigit` is true for "²" (which int() refuses) and "٣" (which int() reads as 3)."""
    with pytest.raises(UsageError, match="expected K/N"):
        parse_shard(bad)
    assert parse_shard("3/4") == (3, 4) and parse_shard("007/8") == (7, 8)


@pytest.mark.parametrize("option", ["--prompt", "--system"])
def test_a_prompt_that_is_not_utf8_is_a_usage_error_before_the_model_loads(image, tmp_path, option):
    """A byte that is not UTF-8 on the command line arrives as a lone surrogate, which no tokenizer
    takes: one usage error (the model path does not even exist), not an error record per item."""
    out = tmp_path / "r.jsonl"
    r = CliRunner().invoke(app, ["batch", image, option, "caf\udce9?", "-m", str(tmp_path / "no-model"), "--out", str(out)])
    assert isinstance(r.exception, UsageError) and str(r.exception).startswith(f"{option}: the text is not valid UTF-8"), r.output
    assert not out.exists()


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_second_run_on_an_output_in_use_is_refused_and_changes_nothing(hf_checkpoint, image, tmp_path, suffix):
    """While a run holds its --out (here this process holds the lock, as a run does from reading
    what is done to its last record), another `vl3 batch` on that file is one error line naming
    the holder, before the model loads, and leaves the file byte-identical; once free, it runs."""
    import subprocess
    import sys

    from vl3cli.outfile import exclusive

    out = tmp_path / f"r.{suffix}"
    args = [sys.executable, "-m", "vl3cli", "batch", str(image), "--out", str(out), "--max-new-tokens", "3",
            "-m", str(hf_checkpoint)]  # fmt: skip
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    with exclusive(Target.of(out)):
        p = subprocess.run([*args, "--retry-failed"], capture_output=True, text=True, timeout=120)
        assert out.read_bytes() == before
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"Error: {out} is being written by another vl3 run (process {os.getpid()}); wait for it to end, "
        "or write to another file"], p.stderr  # fmt: skip
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "1 already done" in again.stderr, again.stderr
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".vl3-lock")]
