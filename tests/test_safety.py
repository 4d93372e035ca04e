"""Bad input never costs a user their data: --out that is not ours, streams, global checks, Ctrl-C.

Run through the real entry point (`python -m vl3cli`) on the tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tiny
import torch
from media_factory import make_image

N = ["--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.make_checkpoint(tmp_path_factory.mktemp("safety-ckpt") / "hf", "hf", tied=True, seed=2)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(2):
        make_image(d / f"p{i}.png", size=(32, 32), seed=i)
    return d


def vl3(*args, cwd=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VL3_DEBUG"}
    return subprocess.run([sys.executable, "-m", "vl3cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, **kw)  # fmt: skip


def one_line_error(p, code: int, *fragments: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["image", "text"])
def test_batch_refuses_an_out_that_is_not_ours(ckpt, folder, tmp_path, kind):
    """`vl3 batch photos/* --out *.png`-style mistakes: the file stays byte-identical."""
    victim = tmp_path / ("shot.png" if kind == "image" else "notes.txt")
    if kind == "image":
        make_image(victim, size=(40, 30))
    else:
        victim.write_text("first line\nno newline at the end")
    before = victim.read_bytes()
    p = vl3("batch", folder, "--out", victim, "-m", ckpt, *N)
    one_line_error(p, 2, f"{victim} exists and is not a vl3 results file (use --overwrite to replace it)")
    assert victim.read_bytes() == before
    p = vl3("batch", folder, "--out", victim, "-m", ckpt, *N, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert [json.loads(x)["error"] for x in victim.read_text().splitlines()] == [None, None]


def test_describe_refuses_to_replace_a_file_without_overwrite(ckpt, folder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    one_line_error(vl3("describe", folder / "p0.png", "--out", notes, "-m", ckpt, *N), 2, "exists", "--overwrite")
    assert notes.read_text() == "keep me\n"
    assert vl3("describe", folder / "p0.png", "--out", notes, "-m", ckpt, *N, "--overwrite").returncode == 0
    assert notes.read_text() != "keep me\n"
    results = tmp_path / "r.jsonl"
    for _ in range(2):  # jsonl appends to a vl3 file
        assert vl3("describe", folder / "p0.png", "-f", "jsonl", "--out", results, "-m", ckpt, *N).returncode == 0
    assert len(results.read_text().splitlines()) == 2


def test_out_dash_is_stdout(ckpt, folder, tmp_path):
    for args in (["describe", folder / "p0.png", "-f", "jsonl"], ["batch", folder], ["ask", folder / "p0.png", "Hi?", "-f", "jsonl"]):
        p = vl3(*args, "--out", "-", "-m", ckpt, *N, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert all(json.loads(x)["error"] is None for x in p.stdout.splitlines()) and p.stdout
    assert not (tmp_path / "-").exists()


def test_batch_streams_into_a_fifo_without_reading_it(ckpt, folder, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []

    def reader():
        with open(fifo) as f:
            got.extend(f.read().splitlines())

    t = threading.Thread(target=reader)
    t.start()
    p = vl3("batch", folder, "--out", fifo, "-m", ckpt, *N, timeout=60)
    t.join(timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(Path(json.loads(x)["path"]).name for x in got) == ["p0.png", "p1.png"]


def test_dev_full_is_one_line_error(ckpt, folder):
    one_line_error(vl3("batch", folder, "--out", "/dev/full", "-m", ckpt, *N), 1, "/dev/full", "No space left")


def test_another_question_or_model_is_not_resumed_as_done(ckpt, folder, tmp_path):
    out = tmp_path / "r.jsonl"
    assert vl3("batch", folder, "--out", out, "-m", ckpt, *N).returncode == 0
    p = vl3("batch", folder, "--out", out, "-m", ckpt, *N, "--question", "What colour is it?")
    assert p.returncode == 0 and "0 already done" not in p.stderr and "2 ok" in p.stderr, p.stderr
    p = vl3("batch", folder, "--out", out, "-m", ckpt, *N, "--question", "What colour is it?")
    assert "2 already done" in p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs].count("What colour is it?") == 2 and len(recs) == 4


def test_empty_folder_is_a_usage_error(ckpt, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(vl3("batch", tmp_path / "empty", "-m", ckpt), 2, "holds no")
    one_line_error(vl3("batch", folder, "--ext", "mkv", "-m", ckpt), 2, "holds no mkv files")


def test_impossible_global_setting_fails_once_before_loading(ckpt, folder, tmp_path):
    out = tmp_path / "r.jsonl"
    p = vl3("batch", folder, "--out", out, "-m", ckpt, "--max-new-tokens", "5000")
    one_line_error(p, 2, "--max-new-tokens 5000", "4096")
    assert out.read_text() == ""  # no error record per item
    one_line_error(vl3("describe", folder / "p0.png", "-m", ckpt, "--max-new-tokens", "4096"), 2, "--max-new-tokens")


def test_context_error_names_what_helps(ckpt, tmp_path):
    huge = make_image(tmp_path / "huge.png", size=(1000, 1000))  # 5041 visual tokens > 4096
    p = vl3("describe", huge, "-m", ckpt, *N)
    one_line_error(p, 1, "--max-visual-tokens", "more than the model's 4096")
    advised = int(p.stderr.split("--max-visual-tokens ")[1].split()[0])
    p = vl3("describe", huge, "-m", ckpt, *N, "--max-visual-tokens", advised, "-f", "jsonl")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["prompt_tokens"] + 3 <= 4096


def test_error_record_carries_prompt_and_system(ckpt, folder, tmp_path):
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "r.jsonl"
    p = vl3("batch", folder, "--out", out, "-m", ckpt, *N, "--question", "Why?", "--system", "Be brief.")
    assert p.returncode == 1
    recs = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert recs["broken.png"]["error"] and recs["broken.png"]["prompt"] == "Why?"
    assert {r["system"] for r in recs.values()} == {"Be brief."}
    assert "Done: 3 items: 2 ok, 1 failed" in p.stderr


def test_python_m_vl3cli_and_singular_summary(ckpt, folder, tmp_path):
    p = vl3("batch", folder / "p0.png", "-m", ckpt, *N, "--out", tmp_path / "r.jsonl")
    assert p.returncode == 0 and "Done: 1 item: 1 ok" in p.stderr, p.stderr


def test_a_video_that_cannot_fit_is_refused_before_decoding(ckpt, tmp_path, monkeypatch):
    """Without pruning the visual tokens are known from the plan: 20 frames of 448x448 need 5120 > 4096."""
    from typer.testing import CliRunner

    from media_factory import make_video

    from vl3cli import video
    from vl3cli.cli import app
    from vl3cli.errors import ContextError

    clip = make_video(tmp_path / "big.mp4", seconds=2.0, fps=10, size=(448, 448))
    decoded = []
    monkeypatch.setattr(video, "decode", lambda *a, **k: decoded.append(a) or (_ for _ in ()).throw(AssertionError))
    r = CliRunner().invoke(app, ["describe", str(clip), "-m", str(ckpt), "--no-prune", "--fps", "10", *N])
    assert isinstance(r.exception, ContextError) and "--max-visual-tokens" in str(r.exception), r.output
    assert decoded == []


def test_a_pruned_video_whose_first_frame_cannot_fit_is_refused_before_decoding(ckpt, tmp_path, monkeypatch):
    """Pruning keeps the first frame whole: 4 frames of 1792x1792 take 64 x 64 = 4096 tokens for the
    first one alone, plus at least one for each of the 3 others; the context is 4096."""
    from typer.testing import CliRunner

    from media_factory import make_video

    from vl3cli import video
    from vl3cli.cli import app
    from vl3cli.errors import ContextError

    clip = make_video(tmp_path / "wide.mp4", seconds=4.0, fps=1, size=(1792, 1792))
    decoded = []
    monkeypatch.setattr(video, "decode", lambda *a, **k: decoded.append(a) or (_ for _ in ()).throw(AssertionError))
    r = CliRunner().invoke(app, ["describe", str(clip), "-m", str(ckpt), *N])
    assert isinstance(r.exception, ContextError), r.output
    assert "4 frames of 1792x1792 need at least 4099 visual tokens" in str(r.exception)
    assert decoded == []


def test_damaged_checkpoints_are_one_line_errors(ckpt, folder, tmp_path):
    """Integer weights with --quantize int8 used to run (rc 0) on the raw integers; an index naming a
    shard outside the folder used to be read. Both: one `Error:` line, exit 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    ints = shutil.copytree(ckpt, tmp_path / "ints")
    state = load_file(ints / "model.safetensors")
    key = "model.language_model.layers.0.mlp.down_proj.weight"
    state[key] = (state[key] * 100).to(torch.int16)
    save_file(state, ints / "model.safetensors")
    one_line_error(vl3("describe", folder / "p0.png", "-m", ints, "--quantize", "int8", *N), 1,
                   f"tensor {key} has dtype I16; vl3 expects floating-point weights")  # fmt: skip
    outside = shutil.copytree(ckpt, tmp_path / "outside")
    (outside / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    weight_map = dict.fromkeys(state, "../elsewhere.safetensors")
    (outside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_line_error(vl3("describe", folder / "p0.png", "-m", outside, *N), 1, "'../elsewhere.safetensors' is not a file "
                   "inside the checkpoint folder")  # fmt: skip
