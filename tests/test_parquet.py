"""`vl3 batch --out x.parquet` (local engine): the JSONL records as Parquet rows, resumable, and
never written over a file that is not ours. The reference is the same run written as JSONL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from media_factory import make_image
from typer.testing import CliRunner

from vl3cli.batch import in_shard
from vl3cli.cli import app
from vl3cli.errors import UsageError
from vl3cli.outfile import Target, opened
from vl3cli.output import SCHEMA, Result

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


@pytest.mark.parametrize("kind", ["text", "other-parquet"])
def test_a_file_that_is_not_ours_is_refused(hf_checkpoint, folder, tmp_path, kind):
    victim = tmp_path / "data.parquet"
    if kind == "text":
        victim.write_text("not parquet at all\n")
    else:
        import pyarrow as pa

        pq.write_table(pa.table({"id": [1, 2], "label": ["x", "y"]}), victim)
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
