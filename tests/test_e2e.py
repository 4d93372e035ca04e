"""End to end through the `vl3` command on tiny checkpoints of both formats.

- describe / ask text equals transformers' greedy generation on the same inputs (our own
  pre-processing, the prompt spelled out here independently of prompt.py; the original-format
  checkpoint is compared with transformers on the HF-format copy of the same weights);
- JSON records follow the schema; --stream prints the same text; sampling repeats with --seed;
- batch: error records, resume, retry, shards, --files-from, Ctrl-C then resume;
- the offline Hub cache; bad inputs give one-line errors.

The checkpoints are untied (seed 1), the other layout from the engine tests' tied ones; their
random output varies, invalid UTF-8 included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from interrupt import interrupt_after_first_record, signal_when
from links import linked_file
from media_factory import make_image, make_video
from typer.testing import CliRunner

from vl3cli.cli import app
from vl3cli.errors import UsageError
from vl3cli.options import Options
from vl3cli.output import TIMING_KEYS
from vl3cli.preprocess import ProcessorConfig, prepare_visual

runner = CliRunner()
N = 12  # max new tokens in the comparisons


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e-ckpt")
    return {fmt: tiny.make_checkpoint(root / fmt, fmt, tied=False, seed=1) for fmt in ("hf", "original")}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e-media")
    return {
        "image": make_image(root / "photo.png", size=(64, 48)),
        "video": make_video(root / "clip.mp4", seconds=3.0, fps=10, size=(64, 48)),
        "static": make_video(root / "still.mp4", seconds=5.0, fps=5, size=(56, 56), static=True),
    }


@pytest.fixture(scope="module")
def ref(ckpt):
    return tiny.hf_reference(ckpt["hf"])


def cli(*args, input=None) -> list[dict]:
    r = runner.invoke(app, [str(a) for a in args], input=input)
    assert r.exit_code == 0, (r.output, r.exception)
    return [json.loads(x) for x in r.stdout.splitlines()]


def reference_answer(ref, folder: Path, path: Path, question: str, system: str | None = None) -> tuple[str, int]:
    """transformers' greedy answer on vl3's pre-processing of `path` for checkpoint `folder`."""
    from tokenizers import Tokenizer

    processor = ProcessorConfig.from_dir(folder)
    v = prepare_visual(path, processor, Options().media(processor))
    if v.kind == "image":
        visual = "<|image_pad|>" * v.visual_tokens_kept
        inputs = {"pixel_values": v.pixel_values, "image_grid_thw": torch.tensor([v.grid_thw]), "image_merge_sizes": torch.tensor([v.merge_size])}
    else:
        visual = ",".join(f"Time {t:.1f}s:" + "<|video_pad|>" * n for t, n in zip(v.timestamps, v.tokens_per_frame))
        keep = v.keep if v.keep is not None else torch.ones(v.visual_tokens, dtype=torch.bool)
        inputs = {
            "pixel_values_videos": v.pixel_values, "video_grid_thw": torch.tensor([v.grid_thw]),
            "video_merge_sizes": torch.tensor([v.merge_size]), "video_compression_mask": keep,
        }  # fmt: skip
    tok = Tokenizer.from_str(tiny.tokenizer_json())
    prompt = f"<|im_start|>user\n{visual}\n{question}<|im_end|>\n<|im_start|>assistant\n"
    if system is not None:
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n" + prompt
    ids = tok.encode(prompt, add_special_tokens=False).ids
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    with torch.inference_mode():
        out = ref.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=N, eos_token_id=eos, pad_token_id=0, suppress_tokens=tiny.placeholder_ids(folder), **inputs,
        )[0, len(ids) :].tolist()  # fmt: skip
    generated = [t for t in out if t not in eos]
    return tok.decode(generated, skip_special_tokens=True), len(generated)


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_describe_and_ask_equal_transformers(fmt, ckpt, media, ref):
    (rec,) = cli("describe", media["image"], "-m", ckpt[fmt], "--max-new-tokens", N, "--format", "jsonl")
    assert rec["prompt"] == "Describe this image in detail."
    assert (rec["text"], rec["generated_tokens"]) == reference_answer(ref, ckpt[fmt], media["image"], rec["prompt"])
    assert rec["text"].strip()  # a non-trivial answer
    questions = ["What happens after the cat jumps?", "Ünïcödé: café?"]
    recs = cli("ask", media["video"], *questions, "-m", ckpt[fmt], "--max-new-tokens", N, "--format", "jsonl")
    for q, r in zip(questions, recs, strict=True):
        assert r["prompt"] == q and r["kind"] == "video"
        assert (r["text"], r["generated_tokens"]) == reference_answer(ref, ckpt[fmt], media["video"], q)
    # the media is decoded and encoded once: its cost is on the first record only
    assert recs[0]["timings"]["media_s"] > 0 and recs[1]["timings"]["media_s"] == recs[1]["timings"]["encode_s"] == 0


def test_system_prompt_equals_transformers(ckpt, media, ref):
    system = "You are a helpful assistant."
    (rec,) = cli("ask", media["image"], "What?", "--system", system, "-m", ckpt["original"], "--max-new-tokens", N, "-f", "jsonl")
    assert (rec["text"], rec["generated_tokens"]) == reference_answer(ref, ckpt["original"], media["image"], "What?", system)
    (plain,) = cli("ask", media["image"], "What?", "-m", ckpt["original"], "--max-new-tokens", N, "-f", "jsonl")
    assert plain["prompt_tokens"] < rec["prompt_tokens"]


def test_pruned_video_equals_transformers(ckpt, media, ref):
    (rec,) = cli("describe", media["static"], "-m", ckpt["hf"], "--max-new-tokens", N, "--format", "jsonl")
    assert rec["visual_tokens_kept"] < rec["visual_tokens"]
    assert (rec["text"], rec["generated_tokens"]) == reference_answer(ref, ckpt["hf"], media["static"], rec["prompt"])
    (whole,) = cli("describe", media["static"], "-m", ckpt["hf"], "--max-new-tokens", 2, "--no-prune", "--format", "jsonl")
    assert whole["visual_tokens_kept"] == whole["visual_tokens"] == rec["visual_tokens"]


def test_json_record_schema(ckpt, media, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["describe", str(media["video"]), "-m", str(ckpt["original"]), "--max-new-tokens", "5",
                            "--format", "json", "--out", str(out), "--fps", "2"])  # fmt: skip
    assert r.exit_code == 0 and r.stdout == ""
    rec = json.loads(out.read_text())
    assert list(rec) == [
        "id", "path", "media", "kind", "segment_start", "segment_end", "prompt", "system", "text", "model", "dtype", "device", "quantize", "width",
        "height", "duration", "frames", "timestamps", "resized", "media_info", "visual_tokens", "visual_tokens_kept",
        "prompt_tokens", "prompt_tokens_cached", "generated_tokens", "finish_reason", "options", "timings", "warnings", "error",
    ]  # fmt: skip
    assert rec["media"] == [str(media["video"])] and rec["id"] is None and rec["media_info"] is None
    assert rec["path"] == str(media["video"]) and rec["kind"] == "video" and rec["model"] == str(ckpt["original"])
    assert (rec["system"], rec["dtype"], rec["device"], rec["quantize"], rec["warnings"]) == (None, "float32", "cpu", None, [])
    assert rec["options"]["prompt"] is None and rec["options"]["fps"] == 2.0 and rec["options"]["max_new_tokens"] == 5
    assert (rec["width"], rec["height"], rec["duration"]) == (64, 48, pytest.approx(3.0, abs=0.1))
    assert rec["frames"] == len(rec["timestamps"]) == 6 and rec["timestamps"][:2] == [0.0, 0.5]  # --fps 2
    assert len(rec["resized"]) == 2 and all(x % 28 == 0 for x in rec["resized"])
    assert 0 < rec["visual_tokens_kept"] <= rec["visual_tokens"] < rec["prompt_tokens"]
    assert rec["generated_tokens"] == 5 and rec["finish_reason"] == "length" and rec["error"] is None
    assert list(rec["timings"]) == list(TIMING_KEYS) and all(v >= 0 for v in rec["timings"].values())
    t = rec["timings"]
    assert t["total_s"] == pytest.approx(sum(t[k] for k in TIMING_KEYS[:-1]), abs=1e-3) and t["load_s"] > 0
    (img,) = cli("describe", media["image"], "-m", ckpt["hf"], "--max-new-tokens", 1, "--format", "jsonl")
    assert img["kind"] == "image" and img["frames"] == 1 and img["timestamps"] is None and img["duration"] is None


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_file_name_that_is_not_utf8_is_written_and_read_back(ckpt, media, tmp_path, fmt):
    """A name of arbitrary bytes (as Linux allows) is recorded as JSON escapes: valid UTF-8 that
    json.loads turns back into the name os.fsdecode gives."""
    name = os.fsdecode(bytes(tmp_path) + b"/\xff\xfe photo.png")
    shutil.copy(media["image"], name)
    out = tmp_path / f"r.{fmt}"
    r = runner.invoke(app, ["describe", name, "-m", str(ckpt["hf"]), "--max-new-tokens", "2", "--format", fmt,
                            "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, (r.output, r.exception)
    data = out.read_bytes()
    data.decode("utf-8")  # strict: the file is valid UTF-8
    rec = json.loads(data)
    assert rec["path"] == name and rec["error"] is None and rec["generated_tokens"] == 2


def test_stream_prints_the_same_text(ckpt, media):
    args = ["ask", str(media["image"]), "What?", "-m", str(ckpt["hf"]), "--max-new-tokens", "20"]
    streamed = runner.invoke(app, [*args, "--stream"])
    plain = runner.invoke(app, [*args, "--no-stream"])
    (rec,) = cli(*args, "--format", "jsonl")
    assert streamed.exit_code == plain.exit_code == 0
    assert streamed.stdout == plain.stdout == rec["text"] + "\n"
    two = [*args[:3], "Who?", *args[3:]]
    streamed, plain = runner.invoke(app, [*two, "--stream"]), runner.invoke(app, [*two, "--no-stream"])
    assert streamed.stdout == plain.stdout and streamed.stdout.startswith("Q: What?\n") and "\n\nQ: Who?\n" in streamed.stdout


def test_sampling_repeats_with_a_seed(ckpt, media):
    base = ["describe", media["image"], "-m", ckpt["hf"], "--max-new-tokens", 16, "--format", "jsonl"]
    sample = [*base, "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]
    a = [cli(*sample, "--seed", s)[0]["text"] for s in (1, 1, 2, 3)]
    assert a[0] == a[1] and len(set(a[1:])) > 1
    greedy = {cli(*base, "--seed", s)[0]["text"] for s in (1, 2)}
    assert greedy == {cli(*base)[0]["text"]}


def test_ignore_eos_runs_to_max_new_tokens(ckpt, media):
    (rec,) = cli("describe", media["image"], "-m", ckpt["hf"], "--max-new-tokens", 40, "--ignore-eos", "--format", "jsonl")
    assert rec["generated_tokens"] == 40 and rec["finish_reason"] == "length"


# ----------------------------------------------------------------------------- batch


@pytest.fixture
def dataset(tmp_path, media) -> Path:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    shutil.copy(media["image"], d / "a.png")
    shutil.copy(media["video"], d / "sub" / "b.mp4")
    make_image(d / "sub" / "c.jpg", size=(40, 60), fmt="JPEG", seed=2)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (d / "notes.txt").write_text("ignored: not an image or video extension")
    return d


def batch(*args, input=None):
    return runner.invoke(app, ["batch", *[str(a) for a in args]], input=input)


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(x) for x in text.splitlines()]


def test_batch_errors_resume_and_retry(ckpt, dataset, tmp_path, monkeypatch):
    from vl3cli import pipeline

    decoded = []
    real = pipeline.prepare_visual
    monkeypatch.setattr(pipeline, "prepare_visual", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    out = tmp_path / "r.jsonl"
    common = ["-m", ckpt["hf"], "--max-new-tokens", 4, "--out", out]
    r = batch(dataset, *common)
    assert r.exit_code == 1  # one item failed
    recs = read_jsonl(out)
    by_path = {rec["path"]: rec for rec in recs}
    assert sorted(by_path) == sorted(str(dataset / p) for p in ("a.png", "broken.mp4", "sub/b.mp4", "sub/c.jpg"))
    assert len(recs) == 4
    bad = by_path[str(dataset / "broken.mp4")]
    assert "broken.mp4" in bad["error"] and bad["text"] is None and bad["model"] == str(ckpt["hf"])
    assert all(rec["error"] is None and rec["text"] is not None for p, rec in by_path.items() if "broken" not in p)
    assert "3 ok, 1 failed" in r.stderr

    decoded.clear()
    r = batch(dataset, *common)  # resume (the default): nothing left to decode
    assert r.exit_code == 1 and decoded == [] and read_jsonl(out) == recs
    assert "3 already done" in r.stderr and "1 failed earlier" in r.stderr

    shutil.copy(dataset / "a.png", dataset / "new.png")
    r = batch(dataset, *common, "--resume")
    assert decoded == [str(dataset / "new.png")] and len(read_jsonl(out)) == 5

    shutil.copy(dataset / "sub" / "b.mp4", dataset / "broken.mp4")  # repaired
    decoded.clear()
    r = batch(dataset, *common, "--retry-failed")
    assert r.exit_code == 0 and decoded == [str(dataset / "broken.mp4")]
    recs = read_jsonl(out)
    assert len(recs) == len({rec["path"] for rec in recs}) == 5 and all(rec["error"] is None for rec in recs)

    r = batch(dataset, *common, "--overwrite")
    assert r.exit_code == 0 and len(read_jsonl(out)) == 5 and len(decoded) == 6


def test_batch_shards_partition_and_files_from(ckpt, dataset, tmp_path):
    common = ["-m", ckpt["hf"], "--max-new-tokens", 2, "--ext", "png,jpg,mp4"]
    paths = []
    for k in range(3):
        out = tmp_path / f"part{k}.jsonl"
        batch(dataset, *common, "--shard", f"{k}/3", "--out", out)
        paths += [rec["path"] for rec in read_jsonl(out)]
    assert sorted(paths) == sorted(str(p) for p in dataset.rglob("*") if p.suffix in (".png", ".jpg", ".mp4"))
    r = batch("--files-from", "-", *common, input=f"{dataset / 'a.png'}\n\n{dataset / 'missing.png'}\n")
    # no --out: JSONL on stdout, in the order items finish (a failed file is known first)
    recs = sorted((json.loads(x) for x in r.stdout.splitlines()), key=lambda rec: rec["path"])
    assert [rec["path"] for rec in recs] == [str(dataset / "a.png"), str(dataset / "missing.png")]
    assert recs[0]["error"] is None and "no such file" in recs[1]["error"] and r.exit_code == 1


def vl3_process(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vl3cli.cli", *[str(a) for a in args]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})), **kw,
    )  # fmt: skip


def test_batch_sigint_then_resume_gives_one_record_per_item(ckpt, media, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(12):
        make_image(d / f"{i:02d}.png", size=(32, 32), seed=i)
    out = tmp_path / "r.jsonl"
    args = ["batch", d, "-m", ckpt["hf"], "--out", out, "--max-new-tokens", 200, "--ignore-eos"]
    p = vl3_process(*args)
    stderr, seconds = interrupt_after_first_record(p, out)
    assert seconds < 5  # the item in progress is abandoned, not finished
    assert p.returncode == 130, stderr
    assert "Interrupted" in stderr
    first = read_jsonl(out)
    assert 1 <= len(first) < 12
    p = vl3_process(*args)  # the same request: resumes
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert f"{len(first)} already done" in stderr
    recs = read_jsonl(out)
    assert recs[: len(first)] == first
    assert sorted(rec["path"] for rec in recs) == sorted(str(x) for x in d.iterdir())


def lines_in_temp_files(folder: Path) -> int:
    return max((p.read_bytes().count(b"\n") for p in folder.glob(".*vl3-tmp")), default=0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_keep_the_finished_answers(ckpt, media, tmp_path, sig):
    """`kill` (or a closed terminal) after some segments are answered: --out holds them, no
    temporary file is left, and the exit status is 128 + the signal's number."""
    out = tmp_path / "seg.txt"
    p = vl3_process("describe", media["video"], "--segments", 0.1, "-m", ckpt["hf"], "--max-new-tokens", 1000,
                    "--ignore-eos", "-o", out)  # fmt: skip
    stderr, seconds = signal_when(p, lambda: lines_in_temp_files(tmp_path) >= 1, sig)
    assert p.returncode == 128 + sig and seconds < 10, stderr
    assert stderr.endswith(f"Interrupted ({signal.Signals(sig).name}).\n")
    assert out.read_text().count("\n") >= 1 and not list(tmp_path.glob(".*vl3-tmp"))


def test_sighup_completes_a_parquet_batch(ckpt, media, tmp_path):
    """The finished records (here: a broken file's error record, reported first) are in the Parquet file."""
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "many"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not a png")
    for i in range(6):
        make_image(d / f"{i:02d}.png", size=(32, 32), seed=i)
    out = tmp_path / "r.parquet"
    p = vl3_process("batch", d, "-m", ckpt["hf"], "--out", out, "--max-new-tokens", 1000, "--ignore-eos")
    stderr, _ = signal_when(p, lambda: p.stderr.readline().startswith("warning: "), signal.SIGHUP)
    assert p.returncode == 129, stderr
    rows = pq.read_table(out).to_pylist()
    assert 1 <= len(rows) < 7 and any(r["path"].endswith("broken.png") for r in rows)
    assert not list(tmp_path.glob(".*vl3-tmp"))


def test_results_in_an_encoding_without_their_characters(ckpt, media, tmp_path):
    """PYTHONIOENCODING=ascii / latin-1: JSON and JSONL on stdout stay valid and lossless."""
    image = tmp_path / "café ü.png"
    shutil.copy(media["image"], image)
    question = "Qué ist das Bär 中文 😀?"
    for encoding in ("ascii", "latin-1"):
        for fmt in ("json", "jsonl"):
            p = subprocess.run([sys.executable, "-m", "vl3cli.cli", "ask", str(image), question, "-m", str(ckpt["hf"]),
                                "--max-new-tokens", "4", "-f", fmt], capture_output=True, check=False, timeout=120,
                               env=dict(os.environ, PYTHONIOENCODING=encoding))  # fmt: skip
            assert p.returncode == 0, p.stderr
            rec = json.loads(p.stdout.decode(encoding))
            assert (rec["path"], rec["prompt"]) == (str(image), question)


def test_results_to_out_need_no_stdout(ckpt, media, tmp_path):
    """`vl3 describe ... -o x.txt >&-`: stdout is not needed, the run succeeds."""
    out = tmp_path / "x.json"
    p = subprocess.run([sys.executable, "-m", "vl3cli.cli", "describe", str(media["image"]), "-m", str(ckpt["hf"]),
                        "--max-new-tokens", "4", "-f", "json", "-o", str(out)], stderr=subprocess.PIPE, text=True,
                       check=False, timeout=120, preexec_fn=lambda: os.close(1))  # fmt: skip
    assert p.returncode == 0 and p.stderr == ""
    assert json.loads(out.read_text())["generated_tokens"] == 4


# ----------------------------------------------------------------------------- Hub cache, errors


def test_offline_hub_cache(ckpt, media, tmp_path):
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny-vl3" / "snapshots" / ("c" * 40)
    shutil.copytree(ckpt["hf"], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("c" * 40)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    args = ["describe", media["image"], "--max-new-tokens", 6, "--format", "jsonl"]
    p = vl3_process(*args, env=dict(env, VL3_MODEL="acme/tiny-vl3"))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    (local,) = cli(*args, "-m", ckpt["hf"])
    assert json.loads(stdout)["text"] == local["text"] and json.loads(stdout)["model"] == "acme/tiny-vl3"
    p = vl3_process(*args, "-m", "acme/tiny-vl3", "--revision", "v2", env=env)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 1 and stderr.count("\n") == 1 and stderr.startswith("Error: acme/tiny-vl3 (revision v2)")


def test_bad_media_gives_one_line_errors(ckpt, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(2000))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (bad, empty):
        p = vl3_process("describe", path, "-m", ckpt["original"])
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 1 and stdout == ""
        assert stderr.count("\n") == 1 and stderr.startswith(f"Error: {path}"), stderr


@pytest.mark.parametrize("sampling", [[], ["--temperature", "1.5", "--top-k", "40", "--seed", "7"]])
def test_batched_outputs_equal_one_at_a_time(ckpt, media, tmp_path, sampling):
    """Several files per forward pass (3 slots, rows leaving and refilling) == one file at a time.

    The files differ in kind and length; sampled answers repeat too, as every item has its own
    sampler seeded with --seed.
    """
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(4):
        make_image(folder / f"img{i}.png", size=(40 + 14 * i, 48), seed=i)
    shutil.copy(media["video"], folder / "clip.mp4")
    shutil.copy(media["static"], folder / "still.mp4")
    (folder / "broken.png").write_bytes(b"not a png")
    runs = {}
    for size in (1, 3):
        out = tmp_path / f"bs{size}.jsonl"
        batch(folder, "-m", ckpt["hf"], "--max-new-tokens", 10, "--batch-size", size, "--out", out, *sampling)
        runs[size] = {rec["path"]: (rec["text"], rec["generated_tokens"], rec["error"]) for rec in read_jsonl(out)}
    assert len(runs[1]) == 7 and sum(err is not None for _, _, err in runs[1].values()) == 1
    assert runs[3] == runs[1]


def test_batch_item_too_long_for_the_model_is_an_error_record(ckpt, tmp_path):
    """A file whose prompt exceeds the context (4096 here) fails alone; the others are answered."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    make_image(folder / "small.png", size=(56, 56))
    make_image(folder / "huge.png", size=(1000, 1000))  # 71 x 71 = 5041 visual tokens
    out = tmp_path / "r.jsonl"
    r = batch(folder, "-m", ckpt["hf"], "--max-new-tokens", 4, "--out", out)
    assert r.exit_code == 1
    recs = {Path(rec["path"]).name: rec for rec in read_jsonl(out)}
    assert recs["small.png"]["error"] is None and recs["small.png"]["generated_tokens"] == 4
    assert "more than the model's 4096" in recs["huge.png"]["error"]


def test_spinner_on_a_terminal_only(ckpt, media):
    """stderr on a terminal shows the loading / reading status; piped stderr stays empty."""
    import pty

    args = ["describe", media["image"], "-m", ckpt["hf"], "--max-new-tokens", 3, "--format", "json"]
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "vl3cli.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    stdout, _ = p.communicate(timeout=120)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert p.returncode == 0 and json.loads(stdout)["generated_tokens"] == 3  # stdout: the result only
    assert b"Loading" in shown and b"Reading" in shown
    piped = vl3_process(*args)
    stdout, stderr = piped.communicate(timeout=120)
    assert piped.returncode == 0 and stderr == ""


# ----------------------------------------------------------------------------- --out of describe / ask


def test_a_run_that_fails_before_an_answer_leaves_out_as_it_was(ckpt, media, tmp_path):
    """Bad options, a wrong model folder or unreadable media: an existing --out is not emptied
    (even with --overwrite), and a new one is not created (it would block the next run)."""
    keep = tmp_path / "keep.txt"
    keep.write_bytes(b"old answer\n")
    bad = tmp_path / "bad.png"
    bad.write_bytes(os.urandom(500))
    failing = [
        ["describe", media["image"], "-m", ckpt["hf"], "--max-new-tokens", 99999],
        ["describe", media["image"], "-m", tmp_path / "no-model"],
        ["describe", bad, "-m", ckpt["hf"]],
        ["ask", bad, "a", "b", "-m", ckpt["hf"]],
    ]
    for args in failing:
        for fmt in ("text", "json", "jsonl"):
            r = runner.invoke(app, [str(a) for a in [*args, "--out", keep, "--overwrite", "-f", fmt]])
            assert r.exit_code in (1, 2) and keep.read_bytes() == b"old answer\n", (args, fmt, r.output)
            new = tmp_path / f"new.{fmt}"
            r = runner.invoke(app, [str(a) for a in [*args, "--out", new, "-f", fmt]])
            assert r.exit_code in (1, 2) and not new.exists(), (args, fmt, r.output)
            r = runner.invoke(app, [str(a) for a in [*args, "-f", fmt]])
            assert r.exit_code in (1, 2) and r.stdout == "", (args, fmt, r.stdout)  # no `[]` for a run that failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "keep.txt"]  # no temporary file left


def test_overwrite_replaces_a_links_target_keeping_its_mode(ckpt, media, tmp_path):
    link, real = linked_file(tmp_path, "answers.json", "old answer\n", 0o600)
    args = ["ask", media["image"], "What is it?", "Which colours?", "-m", ckpt["hf"], "--max-new-tokens", 4]
    want = cli(*args, "-f", "jsonl")
    r = runner.invoke(app, [str(a) for a in [*args, "-f", "json", "--out", link, "--overwrite", "--max-new-tokens", 99999]])
    assert r.exit_code != 0 and link.is_symlink() and real.read_text() == "old answer\n"  # a failed run: as it was
    r = runner.invoke(app, [str(a) for a in [*args, "-f", "json", "--out", link, "--overwrite"]])
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and (real.stat().st_mode & 0o777) == 0o600
    got = json.loads(real.read_text())
    assert [g["text"] for g in got] == [w["text"] for w in want]
    assert sorted(p.name for p in real.parent.iterdir()) == ["answers.json"]


def test_an_interrupted_run_keeps_the_answers_it_finished(ckpt, media, tmp_path, monkeypatch):
    """Ctrl-C after the first answer is written: --out holds it, as a closed JSON array; Ctrl-C
    before any answer leaves --out as it was."""
    from vl3cli.cli import describe

    done = describe._InOrder.done

    def interrupted_after(self, i, result):
        done(self, i, result)
        if self.writer.count:
            raise KeyboardInterrupt

    def interrupted_before(self, i, result):
        raise KeyboardInterrupt

    out = tmp_path / "answers.json"
    out.write_text("old answer\n")
    args = ["ask", media["image"], "What is it?", "Which colours?", "-m", ckpt["hf"], "--max-new-tokens", 4]
    want = cli(*args, "-f", "jsonl")
    monkeypatch.setattr(describe._InOrder, "done", interrupted_before)
    r = runner.invoke(app, [str(a) for a in [*args, "-f", "json", "--out", out, "--overwrite"]])
    assert r.exit_code == 130 and out.read_text() == "old answer\n"  # 130: Typer's handling of Ctrl-C
    monkeypatch.setattr(describe._InOrder, "done", interrupted_after)
    r = runner.invoke(app, [str(a) for a in [*args, "-f", "json", "--out", out, "--overwrite"]])
    assert r.exit_code == 130
    got = json.loads(out.read_text())
    assert 1 <= len(got) and [(g["prompt"], g["text"]) for g in got] == [(w["prompt"], w["text"]) for w in want[: len(got)]]


def test_empty_questions_and_segments_of_an_image_are_usage_errors(ckpt, media):
    """UsageError: exit status 2 (the command line's `main` prints it as one line)."""
    for args in (["ask", media["image"], ""], ["ask", media["image"], "-q", "  "], ["describe", media["image"], "-p", ""]):
        r = runner.invoke(app, [str(a) for a in [*args, "-m", ckpt["hf"]]])
        assert isinstance(r.exception, UsageError) and "an empty question" in str(r.exception), args
    r = runner.invoke(app, ["describe", str(media["image"]), "--segments", "1", "-m", str(ckpt["hf"])])
    assert isinstance(r.exception, UsageError) and f"--segments cuts videos; {media['image']} is an image" in str(r.exception)
    r = runner.invoke(app, ["describe", "", "-m", str(ckpt["hf"])])
    assert isinstance(r.exception, UsageError) and "empty path" in str(r.exception)
