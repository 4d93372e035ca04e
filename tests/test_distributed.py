"""`vl3 batch --engine ray` on a real local Ray (2 CPUs, started here) against the local engine.

One Ray for the module; 2 actors on a tiny checkpoint; a folder of 4 good files (images and
videos) and 2 broken ones. The reference is `vl3 batch` with the local engine on the same folder:
the Ray engine must give every path exactly one record, error records for the broken files, and
the same records (texts, token counts, sizes, errors; timings aside). Ctrl-C then resume, Parquet
output and the resource check are covered too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from interrupt import interrupt_after_first_record
from media_factory import make_image, make_video
from typer.testing import CliRunner

from vl3cli.cli import app
from vl3cli.errors import UsageError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'vl3cli[ray]'; the test extra has it)")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

runner = CliRunner()
N = 6  # max new tokens


@pytest.fixture(scope="module")
def cluster():
    """A local Ray of 2 CPUs for the module; runs in this process reuse its connection. Yields its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.make_checkpoint(tmp_path_factory.mktemp("ray-ckpt") / "hf", "hf", tied=False, seed=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray-media")
    make_image(d / "a.png", size=(56, 42))
    make_image(d / "c.jpg", size=(30, 70), fmt="JPEG", seed=4)
    make_video(d / "b.mp4", seconds=2.0, fps=6, size=(56, 42))
    make_video(d / "e.mp4", seconds=1.0, fps=6, size=(42, 56), static=True)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir())


def batch(*args):
    return runner.invoke(app, ["batch", *[str(a) for a in args]])


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")  # whole lines only
    return [json.loads(x) for x in text.splitlines()]


def untimed(records: list[dict]) -> dict[str, dict]:
    """Records by path, timings aside (they are measurements); each path must appear once."""
    out = {}
    for record in records:
        assert record["path"] not in out, f"{record['path']} has two records"
        out[record["path"]] = {k: v for k, v in record.items() if k != "timings"}
    return out


@pytest.fixture(scope="module")
def local(ckpt, folder, tmp_path_factory) -> dict[str, dict]:
    """The reference: the local engine's records for the folder."""
    out = tmp_path_factory.mktemp("ray-local") / "local.jsonl"
    r = batch(folder, "-m", ckpt, "--max-new-tokens", N, "--out", out)
    assert r.exit_code == 1, r.output  # the two broken files
    records = untimed(read_jsonl(out))
    assert sorted(records) == paths(folder)
    assert [p for p, rec in records.items() if rec["error"]] == [str(folder / "broken.mp4"), str(folder / "broken.png")]
    return records


def test_ray_batch_equals_the_local_batch(cluster, ckpt, folder, local, tmp_path):
    out = tmp_path / "ray.jsonl"
    r = batch(folder, "-m", ckpt, "--max-new-tokens", N, "--out", out, "--engine", "ray", "--actors", 2, "--batch-size", 2)
    assert r.exit_code == 1, r.output
    assert "Done: 6 items: 4 ok, 2 failed" in r.stderr
    records = untimed(read_jsonl(out))
    assert sorted(records) == paths(folder)  # every path exactly once
    assert records == local  # texts, token counts, sizes, prompts, options, error messages
    assert {p for p, rec in records.items() if rec["text"] is None and rec["error"]} == {
        str(folder / "broken.mp4"), str(folder / "broken.png")
    }
    assert all(rec["generated_tokens"] > 0 for rec in records.values() if not rec["error"])


def test_a_manifest_gives_the_local_records(cluster, ckpt, folder, tmp_path):
    """Mixed manifest items, a text-only one and two unusable lines (one naming no media, whose
    record must not claim to be a text-only item): Ray writes the local engine's records."""
    manifest = tmp_path / "items.jsonl"
    lines = [{"id": "img", "media": str(folder / "a.png"), "prompt": "What?"}, {"id": "txt", "prompt": "Hi"},
             {"id": 3, "media": []}, "not json"]  # fmt: skip
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    records = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        r = batch("--manifest", manifest, "-m", ckpt, "--max-new-tokens", N, "--out", out, "--engine", engine)
        assert r.exit_code == 1, r.output  # the two unusable lines
        records[engine] = {rec["id"]: {k: v for k, v in rec.items() if k != "timings"} for rec in read_jsonl(out)}
    assert records["ray"] == records["local"]
    # The same run as a program joined to the cluster: Ray Data's Python warnings (its Arrow
    # conversion of these rows) stay off the terminal without --debug.
    p = vl3_process("batch", "--manifest", manifest, "-m", ckpt, "--max-new-tokens", N, "--out", tmp_path / "p.jsonl",
                    "--engine", "ray", "--ray-address", cluster)  # fmt: skip
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 1 and "Done: 4 items" in stderr, stderr
    assert "WARNING" not in stderr and "arrow.py" not in stderr, stderr
    bad = [records["ray"][f"{manifest}:{n}"] for n in (3, 4)]
    assert all(rec["error"] and rec["kind"] is None for rec in bad)
    assert records["ray"]["txt"]["kind"] == "text" and records["ray"]["img"]["kind"] == "image"


def test_parquet_output_holds_the_same_records(cluster, ckpt, folder, local, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "ray.parquet"
    common = [folder, "-m", ckpt, "--max-new-tokens", N, "--out", out, "--engine", "ray", "--actors", 2]
    r = batch(*common)
    assert r.exit_code == 1, r.output
    assert untimed(pq.read_table(out).to_pylist()) == local
    assert not list(tmp_path.glob(".*vl3-tmp"))
    before = out.read_bytes()
    r = batch(*common)  # resume: nothing left to do, the file is left as it is
    assert r.exit_code == 1 and "4 already done, 2 failed earlier" in r.stderr, r.output
    assert out.read_bytes() == before


def vl3_process(*args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VL3_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "vl3cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_ctrl_c_then_resume_gives_one_record_per_path(cluster, ckpt, folder, tmp_path):
    """A run joined to the cluster (--ray-address) is interrupted after its first records; the
    next run keeps those lines byte for byte and adds exactly the missing paths."""
    out = tmp_path / "r.jsonl"
    slow = ["-m", ckpt, "--max-new-tokens", 40, "--ignore-eos", "--out", out, "--engine", "ray", "--batch-size", 1]
    p = vl3_process("batch", folder, *slow, "--ray-address", cluster, "--actors", 2)
    stderr, seconds = interrupt_after_first_record(p, out)
    assert p.returncode == 130, stderr
    assert seconds < 20, "the unfinished items are abandoned, not finished"
    assert "Interrupted" in stderr and "Traceback" not in stderr
    first = out.read_bytes()
    done = read_jsonl(out)
    assert 1 <= len(done) < 6

    r = batch(folder, *slow, "--actors", 2)  # the same request, in this process's Ray: resumes
    assert r.exit_code == 1, r.output
    ok_before = sum(1 for rec in done if not rec["error"])
    assert not ok_before or f"{ok_before} already done" in r.stderr, r.stderr
    assert out.read_bytes().startswith(first)  # the earlier lines, byte for byte
    records = read_jsonl(out)
    assert sorted(rec["path"] for rec in records) == paths(folder)  # each path exactly once
    assert all(rec["generated_tokens"] == 40 for rec in records if not rec["error"])


def test_leaving_the_engine_ends_a_run_the_caller_stopped_reading(cluster, ckpt, folder):
    """A caller that stops reading on an exception of its own (`vl3 batch --engine ray | head -1`:
    a broken pipe) still holds the unfinished generator in its traceback. Leaving the engine ends
    that run before Ray is shut down; ended later, its clean-up would start a new local Ray."""
    import inspect

    from vl3cli.batch import StopSignal
    from vl3cli.distributed import RayEngine, RaySettings
    from vl3cli.inputs import Entry
    from vl3cli.options import Options

    engine = RayEngine.start(str(ckpt), None, "cpu", "auto", None, Options(max_new_tokens=N), RaySettings())
    states = []

    class OwnedRay:  # the cluster of this module, as if the engine had started it: record the shutdown
        def __getattr__(self, name):
            return getattr(ray, name)

        def shutdown(self):
            states.append(inspect.getgeneratorstate(run))

    engine.ray, engine.owned = OwnedRay(), True
    run = engine.results([(Entry((p,)), frozenset()) for p in paths(folder)], StopSignal())
    with pytest.raises(BrokenPipeError), engine:
        for _ in run:
            raise BrokenPipeError
    assert states == [inspect.GEN_CLOSED]
    assert ray.is_initialized()  # the module's cluster, untouched


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--actors", 4], "need 0 GPUs and 3 CPUs"),  # 4 x 0.5 CPU + one reading task > 2 CPUs
        (["--gpus-per-actor", 1], "need 1 GPUs"),
    ],
)
def test_a_pool_the_cluster_cannot_hold_is_refused(cluster, ckpt, folder, tmp_path, args, fragment):
    """Ray would wait forever for actors it cannot place: one line, exit 2, nothing written."""
    out = tmp_path / "r.jsonl"
    r = batch(folder, "-m", ckpt, "--out", out, "--engine", "ray", *args)
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2, r.output
    assert fragment in str(r.exception) and "the Ray cluster has 0 GPUs and 2 CPUs" in str(r.exception)
    assert out.read_text() == ""


def test_resuming_a_finished_segmented_run_adds_nothing(cluster, ckpt, tmp_path):
    """Every segment of the video answered: a second run finds them all done (their records reach
    the video's end) and writes no record (no "lost" error for a video with nothing left to answer)."""
    media = tmp_path / "media"
    media.mkdir()
    make_video(media / "v.mp4", seconds=2.0, fps=6, size=(56, 42))
    out = tmp_path / "seg.jsonl"
    common = [media, "-m", ckpt, "--max-new-tokens", N, "--out", out, "--engine", "ray", "--segments", 1]
    r = batch(*common)
    assert r.exit_code == 0, r.output
    first = out.read_bytes()
    records = read_jsonl(out)
    assert sorted((rec["segment_start"], rec["segment_end"]) for rec in records) == [(0.0, 1.0), (1.0, 2.0)]
    assert not any(rec["error"] for rec in records)
    r = batch(*common)
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == first


def test_the_reader_streams_parts_and_keeps_those_read_before_a_failure(monkeypatch, tmp_path):
    """`_read` yields one row per window as soon as it is read (the task never holds a video's
    windows all at once), and a file that breaks after two windows still gives those two, then its
    error (named as the user spelled the path). Called in-process, without Ray."""
    import numpy as np

    from vl3cli import distributed, pipeline
    from vl3cli.inputs import Entry
    from vl3cli.errors import MediaError

    read = []

    def parts(item, processor, media, options):
        for n in range(2):
            read.append(n)
            yield (f"window {n}",), 0.1
        raise MediaError(f"{item.media[0]}: damaged after 2 windows")

    monkeypatch.setattr(pipeline, "read_parts", parts)
    monkeypatch.setattr(distributed, "_spelled", lambda part, entry: part)
    monkeypatch.chdir(tmp_path)
    batch = {"index": np.array([7]), "entry": distributed._objects([Entry(("v.mp4",), "What?")]),
             "skip": distributed._objects([frozenset()])}  # fmt: skip
    rows = distributed._read(batch, None, None, None)
    first = next(rows)
    assert read == [0] and first["prepared"][0] == (("window 0",), 0.1)  # the second window not read yet
    rest = list(rows)
    assert [r["prepared"][0] for r in rest[:1]] == [(("window 1",), 0.1)] and len(rest) == 2
    error = rest[1]["prepared"][0]
    assert isinstance(error, MediaError) and str(error) == "v.mp4: damaged after 2 windows"
    assert all(int(r["index"][0]) == 7 for r in [first, *rest])


def test_a_video_that_cannot_fit_is_refused_by_the_reader(cluster, ckpt, tmp_path):
    """The reading tasks know the context: 20 frames of 448x448 without pruning need 20 x 256 =
    5120 visual tokens, over the 4096 positions, and the record says so from the plan (the refusal
    after decoding would count the prompt's positions instead)."""
    media = tmp_path / "media"
    media.mkdir()
    make_video(media / "big.mp4", seconds=2.0, fps=10, size=(448, 448))
    out = tmp_path / "big.jsonl"
    r = batch(media, "-m", ckpt, "--max-new-tokens", N, "--out", out, "--engine", "ray", "--no-prune", "--fps", 10)
    assert r.exit_code == 1, r.output
    (record,) = read_jsonl(out)
    assert "20 frames of 448x448 need at least 5120 visual tokens" in record["error"], record["error"]


def test_a_lost_item_is_an_error_record_with_the_runs_dtype_and_device(monkeypatch):
    """An item no actor answered (its worker died) becomes a "lost" error record after the run,
    naming its media and prompt, with the dtype and device the actors reported in their records
    (none answered: null). Ray's dataset is a stand-in here that yields the first item's record only."""
    from types import SimpleNamespace

    from vl3cli import distributed
    from vl3cli.inputs import Entry
    from vl3cli.options import Options
    from vl3cli.output import Result, to_json

    answered = Result(path="a.png", media=["a.png"], prompt="Describe.", text="A cat.", model="m", dtype="bfloat16",
                      device="cpu")  # fmt: skip
    dataset = SimpleNamespace(map_batches=lambda *args, **kwargs: dataset)
    context = SimpleNamespace(**distributed.DATA_CONTEXT)
    fake_ray = SimpleNamespace(data=SimpleNamespace(from_items=lambda rows: dataset, ActorPoolStrategy=lambda size: None,
                                                    DataContext=SimpleNamespace(get_current=lambda: context)))  # fmt: skip
    todo = [(Entry(("a.png",)), frozenset()), (Entry(("b.mp4",), prompt="What?"), frozenset())]
    load = {"name": "m", "quantize": None}
    engine = distributed.RayEngine(fake_ray, load, Options(), None, None, 0.0, distributed.RaySettings(), owned=False)
    for rows, dtype, device in [([{"index": 0, "record": to_json(answered)}], "bfloat16", "cpu"), ([], None, None)]:
        monkeypatch.setattr(distributed, "_rows", lambda ds, stop, rows=rows: iter(rows))
        records = list(engine.results(todo if rows else todo[1:], stop=None))
        lost = records[-1]
        assert (lost.media, lost.prompt, lost.error) == (["b.mp4"], "What?", distributed.LOST)
        assert (lost.dtype, lost.device, lost.model) == (dtype, device, "m")
    assert records[:-1] == [] and len(records) == 1
