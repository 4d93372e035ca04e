"""`vl3 batch --out x.parquet` (local engine): the JSONL records as Parquet rows, resumable, and
never written over a file that is not ours. The reference is the same run written as JSONL."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from media_factory import make_image
from typer.testing import CliRunner

from vl3cli.cli import app
from vl3cli.errors import UsageError
from vl3cli.inputs import in_shard
from vl3cli.outfile import Target, opened, read_records
from vl3cli.output import SCHEMA, Result
from vl3cli.parquet import ParquetSink, escape, schema, unescape

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'vl3cli[parquet]')")

runner = CliRunner()


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    make_image(d / "a.png", size=(32, 32), seed=1)
    make_image(d / "b.jpg", size=(28, 42), fmt="JPEG", seed=2)
    (d / "broken.png").write_bytes(b"not a png")
    return d


def batch(ckpt, *args):
    return runner.invoke(app, ["batch", *map(str, args), "-m", str(ckpt), "--max-new-tokens", "4"])


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def untimed(records) -> dict[str, dict]:
    return {r["path"]: {k: v for k, v in r.items() if k != "timings"} for r in records}


def test_parquet_rows_equal_the_jsonl_records(hf_checkpoint, folder, tmp_path):
    jsonl, parquet = tmp_path / "r.jsonl", tmp_path / "r.parquet"
    assert batch(hf_checkpoint, folder, "--out", jsonl).exit_code == 1  # broken.png
    assert batch(hf_checkpoint, folder, "--out", parquet).exit_code == 1
    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert untimed(rows(parquet)) == untimed(records) and len(records) == 3
    assert pq.read_schema(parquet).names == list(SCHEMA)
    assert not list(tmp_path.glob(".*vl3-tmp"))


def test_parquet_resume_and_retry_failed(hf_checkpoint, folder, tmp_path):
    out = tmp_path / "r.parquet"
    assert batch(hf_checkpoint, folder, "--out", out).exit_code == 1
    first = rows(out)
    shutil.copy(folder / "a.png", folder / "c.png")
    r = batch(hf_checkpoint, folder, "--out", out)  # resume: only the new file
    assert "2 already done, 1 failed earlier" in r.stderr and "1 ok" in r.stderr, r.output
    second = rows(out)
    assert second[:3] == first and [x["path"] for x in second[3:]] == [str(folder / "c.png")]
    shutil.copy(folder / "a.png", folder / "broken.png")  # repaired
    r = batch(hf_checkpoint, folder, "--out", out, "--retry-failed")
    assert r.exit_code == 0, r.output
    final = rows(out)
    assert sorted(x["path"] for x in final) == sorted(str(p) for p in folder.iterdir())  # one row per path
    assert all(x["error"] is None for x in final)


def test_an_interrupted_run_keeps_old_and_finished_rows(tmp_path):
    """Ctrl-C (KeyboardInterrupt) inside the writing block: the file still gets renamed into place."""
    out = tmp_path / "r.parquet"
    with opened(Target.of(out), replace=False) as sink:
        sink.write_record(Result(path="old.png", text="old"))
    with pytest.raises(KeyboardInterrupt), opened(Target.of(out), replace=False) as sink:
        sink.write_record(Result(path="new.png", text="new"))
        raise KeyboardInterrupt
    assert [(x["path"], x["text"]) for x in rows(out)] == [("old.png", "old"), ("new.png", "new")]
    assert not list(tmp_path.glob(".*vl3-tmp"))


@pytest.mark.parametrize("kind", ["text", "other-parquet", "lookalike", "lookalike-int"])
def test_a_file_that_is_not_ours_is_refused(hf_checkpoint, folder, tmp_path, kind):
    import pyarrow as pa

    victim = tmp_path / "data.parquet"
    if kind == "text":
        victim.write_text("not parquet at all\n")
    elif kind == "other-parquet":
        pq.write_table(pa.table({"id": [1, 2], "label": ["x", "y"]}), victim)
    else:  # someone's data set that has path / text / error columns too
        text = [1, 2] if kind == "lookalike-int" else ["a cat", "a dog"]
        pq.write_table(pa.table({"path": ["a.png", "b.png"], "text": text, "error": [None, None],
                                 "label": [3, 5], "split": ["train", "test"]}), victim)  # fmt: skip
    before = victim.read_bytes()
    r = batch(hf_checkpoint, folder, "--out", victim)
    assert isinstance(r.exception, UsageError) and "is not a vl3 results file" in str(r.exception)
    assert victim.read_bytes() == before
    r = batch(hf_checkpoint, folder, "--out", victim, "--overwrite")
    assert r.exit_code == 1 and len(rows(victim)) == 3


def test_an_empty_shard_leaves_a_valid_empty_file(hf_checkpoint, folder, tmp_path):
    path = str(folder / "a.png")
    empty = next(k for k in range(2) if not in_shard(path, (k, 2)))
    out = tmp_path / "part.parquet"
    r = batch(hf_checkpoint, path, "--shard", f"{empty}/2", "--out", out)
    assert r.exit_code == 0 and "0 items" in r.stderr, r.output
    assert rows(out) == [] and pq.read_schema(out).names == list(SCHEMA)


def test_manifest_items_with_several_media_round_trip(hf_checkpoint, folder, tmp_path):
    """ids, media lists, media_info and text-only items survive Parquet as they are in JSONL."""
    manifest = folder / "items.jsonl"
    manifest.write_text(
        json.dumps({"id": "two", "media": ["a.png", "b.jpg"], "prompt": "What changed?"}) + "\n"
        + json.dumps({"id": "text", "prompt": "Hello?"}) + "\n"
    )  # fmt: skip
    jsonl, parquet = tmp_path / "r.jsonl", tmp_path / "r.parquet"
    for out in (jsonl, parquet):
        assert batch(hf_checkpoint, "--manifest", manifest, "--out", out).exit_code == 0
    by_id = lambda records: {r["id"]: {k: v for k, v in r.items() if k != "timings"} for r in records}  # noqa: E731
    expected = by_id(json.loads(x) for x in jsonl.read_text().splitlines())
    assert by_id(rows(parquet)) == expected
    assert [m["path"] for m in expected["two"]["media_info"]] == [str(folder / "a.png"), str(folder / "b.jpg")]


def test_a_vl3_file_is_recognised_by_its_columns_and_types(tmp_path):
    """Any writer's file with exactly vl3's columns and types is ours (files vl3 wrote before,
    column order aside); the same names with another type are not."""
    import pyarrow as pa

    record = Result(path="a.png", text="t").to_dict()
    ours = tmp_path / "ours.parquet"
    table = pa.Table.from_pylist([record], schema=schema())
    pq.write_table(table.select(list(reversed(table.column_names))), ours)
    assert [r["path"] for r in read_records(ours)] == ["a.png"]
    retyped = tmp_path / "retyped.parquet"
    pq.write_table(table.set_column(table.column_names.index("width"), "width", pa.array(["1"])), retyped)
    with pytest.raises(UsageError, match="is not a vl3 results file"):
        read_records(retyped)


def test_names_that_are_not_utf8_are_kept_and_resumed(hf_checkpoint, tmp_path):
    """A file name that is not UTF-8 (os.walk gives it with lone surrogates): its record is
    written (the other rows too), read back as the same name, and done on resume."""
    d = tmp_path / "nonutf"
    d.mkdir()
    make_image(d / "ok.png", size=(32, 32), seed=1)
    shutil.copy(d / "ok.png", os.path.join(os.fsencode(d), b"\xff\xfe.png"))
    odd = os.path.join(str(d), os.fsdecode(b"\xff\xfe.png"))
    for out in (tmp_path / "r.jsonl", tmp_path / "r.parquet"):
        r = batch(hf_checkpoint, d, "--out", out)
        assert r.exit_code == 0 and "2 ok" in r.stderr, r.output
        assert sorted(x["path"] for x in read_records(out)) == sorted([odd, str(d / "ok.png")])
        r = batch(hf_checkpoint, d, "--out", out)
        assert "2 already done" in r.stderr, r.output
    jsonl = (tmp_path / "r.jsonl").read_bytes().decode("utf-8")  # valid UTF-8
    assert odd in [json.loads(x)["path"] for x in jsonl.splitlines()]
    paths = [x["path"] for x in rows(tmp_path / "r.parquet")]  # pyarrow's own reading: UTF-8 text
    assert str(d / "ok.png") in paths and str(d / "\\udcff\\udcfe.png") in paths


def test_an_out_file_whose_name_is_not_utf8_is_written_and_resumed(hf_checkpoint, folder, tmp_path):
    """`--out $'q\\xe9.parquet'`: pyarrow encodes a path as strict UTF-8, which this name is not.
    The file is written (pyarrow reads it back from an open file), resumed, and no temporary file is left."""
    out = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"q\xe9.parquet")))
    assert batch(hf_checkpoint, folder / "a.png", "--out", out).exit_code == 0
    with open(out, "rb") as f:
        (row,) = pq.read_table(f).to_pylist()
    assert (row["path"], row["error"]) == (str(folder / "a.png"), None)
    r = batch(hf_checkpoint, folder / "a.png", folder / "b.jpg", "--out", out)
    assert r.exit_code == 0 and "1 ok, 0 failed, 1 already done" in r.stderr, r.output
    with open(out, "rb") as f:
        assert [x["path"] for x in pq.read_table(f).to_pylist()] == [str(folder / "a.png"), str(folder / "b.jpg")]
    assert sorted(os.listdir(os.fsencode(tmp_path))) == [b"photos", b"q\xe9.parquet"]  # no temporary file left


def test_a_record_that_does_not_fit_the_schema_becomes_an_error_row(tmp_path):
    out = tmp_path / "r.parquet"
    with opened(Target.of(out), replace=False) as sink:
        sink.write_record(Result(path="a.png", text="t"))
        bad = sink.write_record(Result(path="b.png", text="t", width="wide"))  # a str where Parquet wants an int
        sink.write_record(Result(path="c.png", text="t"))
    assert not bad.ok
    got = [(x["path"], x["text"], x["error"] is None) for x in rows(out)]
    assert got == [("a.png", "t", True), ("b.png", None, False), ("c.png", "t", True)]


def test_a_link_is_kept_and_the_file_mode_too(tmp_path):
    real = tmp_path / "data" / "r.parquet"
    real.parent.mkdir()
    with opened(Target.of(real), replace=False) as sink:
        sink.write_record(Result(path="a.png", text="t"))
    real.chmod(0o600)
    link = tmp_path / "r.parquet"
    link.symlink_to(real)
    with opened(Target.of(link), replace=False) as sink:
        sink.write_record(Result(path="b.png", text="t"))
    assert link.is_symlink() and link.resolve() == real
    assert [x["path"] for x in rows(real)] == ["a.png", "b.png"] and (real.stat().st_mode & 0o777) == 0o600
    assert not list(real.parent.glob(".*vl3-tmp")) and not list(tmp_path.glob(".*vl3-tmp"))


def test_a_name_as_long_as_the_system_allows_is_written(tmp_path):
    """The temporary file's name stays short (NAME_MAX): a 255-byte target name is fine."""
    out = tmp_path / ("p" * 247 + ".parquet")
    with ParquetSink(out, keep=False) as sink:
        sink.write_record(Result(path="a.png", text="t"))
    assert [r["path"] for r in read_records(out)] == ["a.png"] and [p.name for p in tmp_path.iterdir()] == [out.name]


_TRICKY = st.text(alphabet=st.sampled_from(["\\", "u", "d", "c", "8", "f", "0", "a", "\udc80", "\udcff", "\ud800", "\U0001f600"]))


@given(value=st.one_of(st.text(), _TRICKY))
def test_escape_is_undone_by_unescape_for_any_string(value):
    """Whatever the string -- a lone surrogate, the text of its escape, backslashes before
    either -- it is stored as UTF-8 and reads back as it was."""
    stored = escape(value)
    stored.encode("utf-8")  # no lone surrogate left
    assert unescape(stored) == value


def test_strings_stored_before_backslashes_were_doubled_read_back_as_before():
    """Files written by earlier versions (escape: a lone surrogate as `\\udcXX`, nothing else
    changed): strings with no backslash, and the escapes of names that are not UTF-8, read back
    as they did."""
    assert unescape("caf\\udce9.png") == "caf\udce9.png"
    for plain in ("What is it?", "café ☕", "udc80", "C:\\photos\\a.png"):
        assert unescape(plain) == plain and escape(plain) == plain


def test_text_that_looks_like_an_escape_is_resumed(tmp_path):
    """A prompt holding the text `\\udc80` (a question about JSON escapes) is stored so that it
    reads back as that text, so resume finds its record."""
    out = tmp_path / "r.parquet"
    prompt = "What does the JSON escape \\udc80 mean? And \\\udcff?"
    with ParquetSink(out, keep=False) as sink:
        sink.write_record(Result(path="a.png", text="t", prompt=prompt, options={"prompt": prompt}))
    (record,) = read_records(out)
    assert record["prompt"] == prompt and record["options"]["prompt"] == prompt
