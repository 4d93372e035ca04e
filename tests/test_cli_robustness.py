"""Command lines that once went wrong, run on the tiny checkpoint: what `ask` takes for media, and
resume of a file that an older vl3 wrote with an unused --scene-threshold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from media_factory import make_image
from typer.testing import CliRunner

from vl3cli.cli import app
from vl3cli.errors import MediaError

runner = CliRunner()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("robust-media") / "img.png", size=(32, 32))


def vl3(ckpt, *args):
    return runner.invoke(app, [*map(str, args), "-m", str(ckpt), "--max-new-tokens", "2"])


def test_a_folder_among_the_arguments_of_ask_is_a_question(hf_checkpoint, image, tmp_path, monkeypatch):
    """The README: arguments that are existing files or URLs are media; `why` (a folder here too)
    is a question, asked on its own and next to -q."""
    monkeypatch.chdir(tmp_path)
    Path("why").mkdir()
    r = vl3(hf_checkpoint, "ask", image, "why", "-f", "jsonl")
    assert r.exit_code == 0, (r.output, r.exception)
    assert [(x["path"], x["prompt"]) for x in map(json.loads, r.stdout.splitlines())] == [(str(image), "why")]
    r = vl3(hf_checkpoint, "ask", image, "why", "-q", "and?", "-f", "jsonl")
    assert [x["prompt"] for x in map(json.loads, r.stdout.splitlines())] == ["why", "and?"], r.output


def test_a_folder_named_as_media_and_a_fifo_are_refused_as_media(hf_checkpoint, image, tmp_path, monkeypatch):
    """A folder `clips.mp4` is not a file: refused as describe refuses one; a FIFO is media (it
    exists and is no folder) and refused as one: not a regular file."""
    monkeypatch.chdir(tmp_path)
    Path("clips.mp4").mkdir()
    os.mkfifo("fifo")
    for name in ("clips.mp4", "fifo"):
        r = vl3(hf_checkpoint, "ask", image, name, "-q", "Why?")
        assert isinstance(r.exception, MediaError) and str(r.exception) == f"{name}: not a regular file", r.output


def test_a_record_with_an_unused_scene_threshold_resumes_as_done(hf_checkpoint, image, tmp_path):
    """Older vl3 stored `--scene-threshold 50` given without --segments scenes (where it changed
    nothing); that option is now refused, and such a record answers the run without it."""
    out = tmp_path / "r.jsonl"
    assert vl3(hf_checkpoint, "batch", image, "--out", out).exit_code == 0
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["options"]["scene_threshold"] == 10.0  # as vl3 has always stored the default
    record["options"]["scene_threshold"] = 50.0
    out.write_text(json.dumps(record) + "\n")
    r = vl3(hf_checkpoint, "batch", image, "--out", out)
    assert r.exit_code == 0 and "0 ok, 0 failed, 1 already done" in r.stderr, r.output
    assert len(out.read_text().splitlines()) == 1
