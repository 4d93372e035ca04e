"""vl3 against transformers on the same checkpoint and inputs, side by side.

    python bench/bench_speed.py                         # mid-size random checkpoint, CPU, fp32
    python bench/bench_speed.py --geometry 2b --device cuda --dtype bfloat16 --runs 5

Each run starts fresh processes for `vl3 describe` and for transformers (bench/hf_runner.py),
alternating which goes first, and the table gives medians over the runs and vl3/transformers
ratios (for times, < 1 means vl3 is faster; for tokens/s, > 1). Peak memory is each process's
peak RSS (os.wait4), plus peak CUDA memory where a GPU is used. It also times `vl3 --help`
against `python -c "import torch"`, and with --batch a folder captioned by `vl3 batch` one item
at a time and several per forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_checkpoint  # noqa: E402

VL3 = [sys.executable, "-m", "vl3cli.cli"]


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; (wall seconds, peak RSS MB of that process alone, stdout)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, out_file.fileno(), 1), (os.POSIX_SPAWN_DUP2, err_file.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def make_image(path: Path, size: tuple[int, int]) -> Path:
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (w + h))], axis=-1).astype("uint8")
    Image.fromarray(rgb).save(path)
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def row(name: str, ours: list[float], theirs: list[float], unit: str, higher_better: bool = False) -> str:
    a, b = median(ours), median(theirs)
    ratio = a / b if b else float("nan")
    better = "vl3" if (ratio > 1) == higher_better else "transformers"
    return f"| {name} | {a:.3f} {unit} | {b:.3f} {unit} | {ratio:.2f}x | {better} |"


def batch_table(model: Path, args, common: list[str], n: int) -> None:
    """Images per second of `vl3 batch` on N different images: one at a time against N together."""
    folder = args.work / f"batch-{args.batch}"
    folder.mkdir(exist_ok=True)
    w, h = (int(v) for v in args.image_size.split("x"))
    for i in range(args.batch):
        make_image(folder / f"img{i:03d}.png", (w + 14 * (i % 3), h))
    rates: dict[int, list[float]] = {1: [], args.batch: []}
    texts: dict[int, dict] = {}
    for i in range(args.runs):
        for size in (1, args.batch) if i % 2 == 0 else (args.batch, 1):
            out = args.work / f"batch-{size}.jsonl"
            out.unlink(missing_ok=True)
            wall, _, _ = run_measured(VL3 + ["batch", str(folder), "--model", str(model), "--out", str(out),
                                              "--batch-size", str(size), "--max-new-tokens", str(n), "--ignore-eos", *common])
            rates[size].append(args.batch / wall)
            texts[size] = {r["path"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    same = texts[1] == texts[args.batch]
    print(f"\nvl3 batch: {args.batch} images of about {w}x{h}, {n} new tokens each (greedy), "
          f"{args.device}, {args.dtype}, median of {args.runs} runs (whole process, load included)")
    print("\n| --batch-size | images/s | speed-up | same answers |\n|---|---|---|---|")
    print(f"| 1 | {median(rates[1]):.3f} | 1.00x | |")
    print(f"| {args.batch} | {median(rates[args.batch]):.3f} | {median(rates[args.batch]) / median(rates[1]):.2f}x | "
          f"{'yes' if same else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(random_checkpoint.GEOMETRIES), default="mid")
    parser.add_argument("--checkpoint", type=Path, help="an existing HF-format checkpoint folder instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", default="448x336", help="WxH of the synthetic test image")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vl3-bench")
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="also caption a folder of N images with `vl3 batch`, --batch-size 1 against N")
    parser.add_argument("--skip-compare", action="store_true", help="only the --batch measurement")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.checkpoint or random_checkpoint.make(args.geometry, args.work / f"ckpt-{args.geometry}")
    w, h = (int(v) for v in args.image_size.split("x"))
    image = make_image(args.work / f"image-{w}x{h}.png", (w, h))
    n = args.max_new_tokens
    common = ["--device", args.device, "--dtype", args.dtype]
    vl3_cmd = VL3 + ["describe", str(image), "--model", str(model), "--max-new-tokens", str(n), "--ignore-eos",
                     "--format", "json", "--no-stream", *common]
    hf_cmd = [sys.executable, str(HERE / "hf_runner.py"), "--model", str(model), "--image", str(image),
              "--max-new-tokens", str(n), *common]

    ours: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}

    def add(store, key, value):
        store.setdefault(key, []).append(value)

    if args.batch:
        batch_table(model, args, common, n)
    if args.skip_compare:
        return

    for i in range(args.runs):
        order = ("vl3", "hf") if i % 2 == 0 else ("hf", "vl3")
        for who in order:
            if who == "vl3":
                wall, rss, out = run_measured(vl3_cmd)
                rec = json.loads(out)
                t = rec["timings"]
                add(ours, "whole", wall)
                add(ours, "rss", rss)
                for k in ("load_s", "media_s", "encode_s", "prefill_s"):
                    add(ours, k, t[k])
                add(ours, "tok_s", (rec["generated_tokens"] - 1) / t["decode_s"])
            else:
                wall, rss, out = run_measured(hf_cmd)
                t = json.loads(out)
                # the encode and one-token prefill measurements come after the timed user run
                add(theirs, "whole", wall - t["encode_s"] - t["prefill_s"])
                add(theirs, "rss", rss)
                for k in ("load_s", "media_s", "encode_s"):
                    add(theirs, k, t[k])
                # generate(1 token) runs the vision encoder too; vl3 reports encode and prefill apart
                add(theirs, "prefill_s", t["prefill_s"] - t["encode_s"])
                add(theirs, "tok_s", (t["tokens"] - 1) / (t["generate_s"] - t["prefill_s"]))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)

    help_t, torch_t = [], []
    for _ in range(5):
        help_t.append(run_measured(VL3 + ["--help"])[0])
        torch_t.append(run_measured([sys.executable, "-c", "import torch"])[0])

    print(f"\nvl3 vs transformers: {args.checkpoint or args.geometry} checkpoint, {args.device}, {args.dtype}, "
          f"{w}x{h} image, {n} new tokens, median of {args.runs} runs")
    print("\n| measure | vl3 | transformers | ratio | faster |\n|---|---|---|---|---|")
    print(row("whole run (process start to exit)", ours["whole"], theirs["whole"], "s"))
    print(row("model load", ours["load_s"], theirs["load_s"], "s"))
    print(row("media decode + preprocess", ours["media_s"], theirs["media_s"], "s"))
    print(row("vision encode", ours["encode_s"], theirs["encode_s"], "s"))
    print(row("prefill (to first token)", ours["prefill_s"], theirs["prefill_s"], "s"))
    print(row("decode", ours["tok_s"], theirs["tok_s"], "tok/s", higher_better=True))
    print(row("peak RSS", ours["rss"], theirs["rss"], "MB"))
    print(f"| `vl3 --help` vs `python -c 'import torch'` | {median(help_t):.3f} s | {median(torch_t):.3f} s | "
          f"{median(help_t) / median(torch_t):.2f}x | |")


if __name__ == "__main__":
    main()
