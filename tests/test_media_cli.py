"""The command line on difficult media: warnings for cut files, --debug tracebacks, URLs in
describe and batch, --max-frames 1, and error messages that name the options.

Runs `vl3` through Typer's CliRunner (and `main()` for the --debug output) on a tiny checkpoint.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
from http_server import serve
from media_factory import cut, faststart_copy, make_image, make_video
from typer.testing import CliRunner

from vl3cli import media
from vl3cli.inputs import expand_inputs, parse_exts
from vl3cli.cli import app, main
from vl3cli.errors import UsageError

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return hf_checkpoint  # conftest's, shared with the other tests


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cli-media")
    full = make_video(d / "full.mp4", seconds=4.0, fps=10, gop=10)
    return {
        "image": make_image(d / "photo.png"),
        "video": make_video(d / "clip.mp4", seconds=3.0, fps=10),
        "cut": cut(faststart_copy(full, d / "fast.mp4"), d / "cut.mp4", 0.6),  # index first: decodes in part
        "no-index": cut(full, d / "no-index.mp4", 0.6),  # index last: nothing decodes
    }


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_cut_video_gives_one_warning_line(ckpt, files):
    r = run("describe", files["cut"], "-m", ckpt, "--max-new-tokens", 2, "-f", "jsonl")
    assert r.exit_code == 0, r.output
    (rec,) = records(r.stdout)
    (line,) = r.stderr.splitlines()
    assert line == f"warning: {rec['warnings'][0]}" and rec["warnings"][0].startswith(f"{files['cut']}: truncated")
    assert rec["duration"] < 4.0 and rec["timestamps"][-1] < rec["duration"]


def test_batch_prints_and_records_warnings(ckpt, files, tmp_path):
    out = tmp_path / "r.jsonl"
    r = run("batch", files["cut"], files["image"], "-m", ckpt, "--max-new-tokens", 2, "--out", out)
    assert r.exit_code == 0, r.output
    by_path = {rec["path"]: rec for rec in records(out.read_text())}
    assert by_path[str(files["image"])]["warnings"] == []
    (warning,) = by_path[str(files["cut"])]["warnings"]
    assert warning.startswith(f"{files['cut']}: truncated")
    assert f"warning: {warning}" in r.stderr.replace("\n", "")  # the progress console may wrap it


def test_debug_shows_the_decoders_own_error(ckpt, files, capsys, monkeypatch):
    def vl3(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["vl3", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, capsys.readouterr().err

    try:
        code, err = vl3("describe", files["no-index"], "-m", ckpt, "--debug")
    finally:
        media.native_logging(False)  # the libav log level is process-wide
    assert code == 1 and "Traceback" in err and "InvalidDataError" in err
    assert "The above exception was the direct cause" in err
    assert err.rstrip().splitlines()[-1].startswith(f"Error: {files['no-index']}: truncated video")
    code, err = vl3("describe", files["no-index"], "-m", ckpt)
    assert code == 1 and err.count("\n") == 1 and err.startswith("Error: ") and "'moov'" in err


def test_urls_in_describe_and_batch(ckpt, files, tmp_path):
    served = {
        "/photo.png": ("image/png", files["image"].read_bytes()),
        "/clip.mp4": ("video/mp4", files["video"].read_bytes()),
    }
    with serve(served) as base:
        (rec,) = records(run("describe", base + "/clip.mp4", "-m", ckpt, "--max-new-tokens", 2, "-f", "jsonl").stdout)
        assert rec["path"] == base + "/clip.mp4" and rec["kind"] == "video" and rec["error"] is None
        listed = [base + "/photo.png", base + "/dir/../clip.mp4?x=1", base + "/missing.png", str(files["image"])]
        r = run("batch", "--files-from", "-", "-m", ckpt, "--max-new-tokens", 2, input="\n".join(listed) + "\n")
        assert r.exit_code == 1  # the missing one
        by_path = {rec["path"]: rec for rec in records(r.stdout)}
        assert sorted(by_path) == sorted(listed)  # URLs kept as written
        assert by_path[base + "/missing.png"]["error"] == f"{base}/missing.png: HTTP 404 Not Found"
        assert by_path[base + "/dir/../clip.mp4?x=1"]["error"] is None
        r = run("describe", "ftp://example.com/cat.jpg", "-m", "./no-such-model")
        assert r.exit_code == 1 and "ftp:// URLs are not supported" in str(r.exception)  # before the model


def test_expand_inputs_keeps_urls():
    listed = io.StringIO("https://example.com/a//b.mp4\nhttp://h/x/../y.jpg\n")
    urls = ["https://example.com/a//b.mp4", "http://h/x/../y.jpg", "https://example.com/c.png"]
    assert expand_inputs(["https://example.com/c.png"], "-", parse_exts(None), stdin=listed) == sorted(urls)
    assert {"heic", "heif", "avif"} <= parse_exts(None)


def test_max_frames_one(ckpt, files):
    r = run("describe", files["video"], "-m", ckpt, "--max-new-tokens", 2, "--max-frames", 1, "-f", "jsonl")
    (rec,) = records(r.stdout)
    assert rec["frames"] == 1 and rec["timestamps"] == [0.0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-frames", 0], "--max-frames must be at least 1"),
        (["--min-frames", 5, "--max-frames", 3], "--min-frames (5) is above --max-frames (3)"),
        (["--fps", 0], "--fps must be a positive number"),
        (["--start", 3, "--end", 2], "--end (2s) must be after --start (3s)"),
        (["--max-visual-tokens", 0], "--max-visual-tokens must be at least 1"),
        (["--start", 60], "--start (60s) is at or past the end"),
        (["--prune-threshold", -1], "--prune-threshold must be 0 or more"),
    ],
)
def test_errors_name_the_options(ckpt, files, args, message):
    r = run("describe", files["video"], "-m", ckpt, *args)
    assert isinstance(r.exception, UsageError) and message in str(r.exception), r.output  # main() exits 2
