"""`vl3 batch --manifest` (mixed items) and `vl3 ask` with several media or none, against the same
items run alone through the Python API (greedy, tiny checkpoint)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import tiny
from media_factory import make_image, make_video
from typer.testing import CliRunner

import vl3cli
from vl3cli.inputs import read_manifest
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


def test_manifest_ids_duplicates_bom_and_bad_lines(folder, tmp_path):
    manifest = tmp_path / "items.jsonl"
    lines = [
        {"id": 1.5, "media": "a.png"},
        {"id": 1e20, "prompt": "Hi?"},
        {"id": True, "media": ["a.png", "b.jpg"]},  # a bool is not a number here
        {"id": float("nan"), "media": "a.png"},  # json.dumps writes NaN, json.loads reads it
        {"id": float("inf"), "media": "a.png"},
        {"media": "b.jpg", "prompt": "Hm?"},
        {"media": "b.jpg", "prompt": "Hm?"},  # the same item again, without an id
        {"media": "b.jpg"},  # another prompt: another item
        {"media": ["a.png", 3]},  # not a list of paths
    ]
    manifest.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\n" for x in lines).encode())
    entries = read_manifest(str(manifest))
    here = str(tmp_path)
    assert [(e.id, e.media, e.error is None) for e in entries] == [
        ("1.5", (f"{here}/a.png",), True),  # line 1 despite the BOM before it
        ("1e+20", (), True),
        (f"{manifest}:3", (f"{here}/a.png", f"{here}/b.jpg"), False),
        (f"{manifest}:4", (f"{here}/a.png",), False),
        (f"{manifest}:5", (f"{here}/a.png",), False),
        (None, (f"{here}/b.jpg",), True),
        (f"{manifest}:7", (f"{here}/b.jpg",), False),
        (None, (f"{here}/b.jpg",), True),
        (f"{manifest}:9", (), False),
    ]  # fmt: skip
    assert entries[6].error == f"{manifest}:7: the same item as line 6 (give each line an id to ask twice)"
    stdin = io.StringIO("\ufeff" + json.dumps({"id": 2, "prompt": "Hi?"}) + "\n")
    assert [(e.id, e.error) for e in read_manifest("-", stdin=stdin)] == [("2", None)]


def test_bad_and_repeated_lines_are_error_records_and_nothing_is_left(ckpt, folder, tmp_path):
    manifest = folder / "again.jsonl"
    manifest.write_text(
        json.dumps({"id": 1.5, "media": "a.png", "prompt": "What?"}) + "\n"
        + json.dumps({"media": "a.png", "prompt": "What?"}) + "\n" + json.dumps({"media": "a.png", "prompt": "What?"}) + "\n"
        + json.dumps({"id": True, "media": ["a.png", "b.jpg"]}) + "\n" + "{not json\n"
    )  # fmt: skip
    out = tmp_path / "r.jsonl"
    args = ("batch", "--manifest", manifest, "--out", out, "-m", ckpt, "--max-new-tokens", 2)
    r, _ = invoke(*args)
    assert r.exit_code == 1 and "Done: 5 items: 2 ok, 3 failed" in r.stderr and "left" not in r.stderr, r.output
    recs = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert recs["1.5"]["error"] is None and recs["1.5"]["kind"] == "image"
    bad = recs[f"{manifest}:4"]
    assert bad["media"] == [str(folder / "a.png"), str(folder / "b.jpg")] and bad["kind"] is None
    assert recs[f"{manifest}:5"]["media"] == [] and recs[f"{manifest}:5"]["kind"] is None  # not a text-only item
    r, _ = invoke(*args)  # resume: the float id and the line without one are done
    assert "2 already done, 3 failed earlier" in r.stderr and "left" not in r.stderr, r.output


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


def test_lines_are_split_at_newlines_only(tmp_path):
    """JSONL strings may hold U+2028, U+2029 and U+0085 raw: each "\\n" ends one line (a "\\r"
    before it is dropped), and lines are numbered the same way."""
    prompts = ["line one\u2028line two", "x\x85y", "a\u2029b\x1cc"]
    lines = [json.dumps({"id": i, "prompt": p}, ensure_ascii=False) for i, p in zip("abc", prompts)]
    manifest = tmp_path / "items.jsonl"
    manifest.write_bytes(("\n".join(lines[:2]) + "\r\n" + lines[2] + "\n{not json\n").encode())
    entries = read_manifest(str(manifest))
    assert [(e.id, e.prompt, e.error) for e in entries[:3]] == [(i, p, None) for i, p in zip("abc", prompts)]
    assert len(entries) == 4 and entries[3].id == f"{manifest}:4" and entries[3].error.startswith(f"{manifest}:4: ")


def test_a_repeat_without_an_id_is_found_however_its_media_are_spelled(folder, tmp_path):
    """`a.png`, a link to it and its absolute path are one file for resume, so lines naming it
    each way with the same prompt repeat line 1: each later one is an error record of its own."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.png").symlink_to(folder / "a.png")
    (d / "link.png").symlink_to("a.png")
    manifest = d / "dup.jsonl"
    lines = [{"media": "a.png"}, {"media": "link.png"}, {"media": str(folder / "a.png")}, {"media": "a.png", "prompt": "Why?"},
             {"media": ["./a.png"], "prompt": "Why?"}, {"media": str(folder / "b.jpg")}]  # fmt: skip
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    entries = read_manifest(str(manifest))
    assert [e.error for e in entries] == [
        None,
        f"{manifest}:2: the same item as line 1 (give each line an id to ask twice)",
        f"{manifest}:3: the same item as line 1 (give each line an id to ask twice)",
        None,
        f"{manifest}:5: the same item as line 4 (give each line an id to ask twice)",
        None,
    ]
    assert [e.id for e in entries] == [None, f"{manifest}:2", f"{manifest}:3", None, f"{manifest}:5", None]


def test_two_items_with_one_key_both_get_a_record(ckpt, folder, tmp_path):
    """An id that happens to be another line's `file:LINE` name gives two items one key: both
    are answered and kept (the run has as many records as items), none is dropped."""
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"id": f"{manifest}:2", "media": str(folder / "a.png")}) + "\n{not json\n")
    out = tmp_path / "r.jsonl"
    r, _ = invoke("batch", "--manifest", manifest, "--out", out, "-m", ckpt, "--max-new-tokens", 2)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert "Done: 2 items: 1 ok, 1 failed" in r.stderr and len(recs) == 2, r.output
    assert sorted(rec["error"] is None for rec in recs) == [False, True]


def test_media_through_a_link_and_dotdot_are_the_file_the_os_opens(tmp_path):
    d = tmp_path / "np"
    (d / "real" / "sub").mkdir(parents=True)
    (d / "link").symlink_to("real/sub")
    (d / "real" / "x.png").write_bytes(b"the real one")
    (d / "x.png").write_bytes(b"another file")
    manifest = d / "items.jsonl"
    manifest.write_text(json.dumps({"media": "link/../x.png"}) + "\n" + json.dumps({"media": "x.png"}) + "\n")
    first, second = read_manifest(str(manifest))
    assert Path(first.media[0]).read_bytes() == b"the real one" and first.media == (f"{d}/link/../x.png",)
    assert second.error is None and Path(second.media[0]).read_bytes() == b"another file"


def test_a_line_that_is_not_utf8_is_an_error_record_and_the_rest_goes_on(tmp_path):
    manifest = tmp_path / "latin1.jsonl"
    text = b'{"id":"a","media":"a.png"}\n{"id":"b","media":"b.png","prompt":"caf\xe9"}\n{"id":"c","media":"c.mp4"}\n'
    manifest.write_bytes(text)
    entries = read_manifest(str(manifest))
    assert [(e.id, e.error is None) for e in entries] == [("a", True), (f"{manifest}:2", False), ("c", True)]
    assert entries[1].error == f"{manifest}:2: the line is not valid UTF-8 (byte 0xe9): save the manifest as UTF-8"
    stdin = io.TextIOWrapper(io.BytesIO(text), errors="strict")  # stdin in a locale that is not C.UTF-8
    assert [(e.id, e.error) for e in read_manifest("-", stdin=stdin)][1] == ("-:2", entries[1].error.replace(str(manifest), "-"))


def test_a_prompt_with_a_lone_surrogate_is_that_lines_error_record(tmp_path):
    """JSON may write "\\ud800", which is no Unicode text: the tokenizer would refuse it with a
    TypeError, so the line is an error record that says what is wrong."""
    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"id": "s", "media": "a.png", "prompt": "caf\\ud800"}\n{"id": "t", "prompt": "Hi?"}\n')
    bad, good = read_manifest(str(manifest))
    assert bad.id == f"{manifest}:1" and bad.prompt is None and "lone surrogate" in bad.error
    assert bad.error.startswith(f"{manifest}:1: prompt is not valid Unicode text")
    assert (good.id, good.error) == ("t", None)
