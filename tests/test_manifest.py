"""`vl3 batch --manifest` (mixed items) and `vl3 ask` with several media or none, against the same
items run alone through the Python API (greedy, tiny checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
from media_factory import make_image, make_video
from typer.testing import CliRunner

import vl3cli
from vl3cli.cli import app
from vl3cli.errors import MediaError, UsageError

runner = CliRunner()
N = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.make_checkpoint(tmp_path_factory.mktemp("manifest-ckpt") / "hf", "hf", tied=True, seed=6)


@pytest.fixture(scope="module")
def model(ckpt):
    return vl3cli.load(str(ckpt), dtype="float32", max_new_tokens=N)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("manifest-media")
    make_image(d / "a.png", size=(56, 42))
    make_image(d / "b.jpg", size=(42, 70), fmt="JPEG", seed=3)
    make_video(d / "c.mp4", seconds=2.0, fps=5, size=(56, 42))
    return d


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r, [json.loads(x) for x in r.stdout.splitlines()]


def essentials(rec: dict) -> tuple:
    return rec["text"], rec["generated_tokens"], rec["prompt_tokens"], rec["visual_tokens_kept"], rec["kind"], rec["error"]


def test_mixed_manifest_one_record_per_line_equal_to_each_item_alone(model, ckpt, folder, tmp_path):
    lines = [
        {"id": "img", "media": "a.png", "prompt": "What is it?"},
        {"id": "vid", "media": ["c.mp4"]},
        {"id": "two", "media": ["a.png", "b.jpg"], "prompt": "What changed?"},
        {"id": "text", "media": [], "prompt": "What colour is a banana?"},
        {"id": "missing", "media": "nope.png", "prompt": "Hm?"},
        {"media": "b.jpg"},
    ]
    manifest = folder / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines[:4]) + "\n{not json\n" + "\n".join(json.dumps(x) for x in lines[4:]) + "\n")
    out = tmp_path / "r.jsonl"
    r, _ = invoke("batch", "--manifest", manifest, "--out", out, "-m", ckpt, "--dtype", "float32", "--max-new-tokens", N)
    assert r.exit_code == 1  # the missing file and the bad line
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 7
    by_id = {rec["id"]: rec for rec in recs}
    assert by_id[f"{manifest}:5"]["error"].startswith(f"{manifest}:5: ")
    assert "nope.png" in by_id["missing"]["error"] and by_id["missing"]["media"] == [str(folder / "nope.png")]
    for line in lines:
        if line.get("id") == "missing":
            continue
        media = [str(folder / m) for m in ([line["media"]] if isinstance(line["media"], str) else line["media"])]
        (alone,) = model.ask(media, line.get("prompt"))
        rec = by_id.get(line.get("id")) or next(x for x in recs if x["id"] is None)
        assert rec["media"] == media
        assert essentials(rec) == essentials(alone.to_dict()), line
    assert by_id["two"]["kind"] == "multiple" and by_id["text"]["kind"] == "text"
    # resume by id: nothing left but the failures
    r, _ = invoke("batch", "--manifest", manifest, "--out", out, "-m", ckpt, "--dtype", "float32", "--max-new-tokens", N)
    assert "5 already done" in r.stderr and len(out.read_text().splitlines()) == 7


def test_manifest_usage_errors(ckpt, folder, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r, _ = invoke("batch", "--manifest", empty, "-m", ckpt)
    assert isinstance(r.exception, UsageError) and "lists no items" in str(r.exception)
    r, _ = invoke("batch", folder, "--manifest", empty, "-m", ckpt)
    assert isinstance(r.exception, UsageError) and "--manifest" in str(r.exception)


def test_ask_several_media_and_none(model, ckpt, folder):
    a, b = str(folder / "a.png"), str(folder / "b.jpg")
    args = ["-m", ckpt, "--dtype", "float32", "--max-new-tokens", N, "-f", "jsonl"]
    _, (two,) = invoke("ask", a, b, "-q", "What changed?", *args)
    assert essentials(two) == essentials(model.ask([a, b], "What changed?")[0].to_dict())
    _, (text,) = invoke("ask", "--question", "What colour is a banana?", *args)
    assert essentials(text) == essentials(model.ask([], "What colour is a banana?")[0].to_dict())
    _, recs = invoke("ask", a, "Which?", "-q", "Why?", *args)  # positional questions first, then -q
    assert [rec["prompt"] for rec in recs] == ["Which?", "Why?"] and recs[0]["media"] == [a]
    r, _ = invoke("ask", str(folder / "typo.png"), "Why?", *args)
    assert isinstance(r.exception, MediaError) and "typo.png: no such file" in str(r.exception)
    r, _ = invoke("ask", a, *args)
    assert isinstance(r.exception, UsageError) and "give a question" in str(r.exception)
