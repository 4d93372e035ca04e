"""vl3 against transformers on the same checkpoint and image, each with its defaults, side by side.

    python bench/bench_speed.py                         # 2B geometry stored in bf16, CPU, defaults
    python bench/bench_speed.py --runs 5 --geometry mid
    python bench/bench_speed.py --batch 8 --skip-compare --geometry mid

Each run starts fresh processes, in a rotating order: `vl3 describe` with its defaults, the same
with `--quantize int8` and `--quantize int4`, and transformers (bench/hf_runner.py) with its
defaults (`dtype="auto"`: the checkpoint's dtype), plus a plain read of 1 GiB of RAM
(`x.sum()`, the machine's read bandwidth at that moment). Tables give medians over the runs:
whole run, load, encode, prefill, decode tokens/s and peak RSS (os.wait4) with ratios; the decode's
share of the read bandwidth (bytes of weights read per generated token x tokens/s / bandwidth);
`vl3 --help` against `python -c "import torch"`. vl3's phases come from its one run (`--debug`
timings); transformers' encode, prefill and decode from warm repeats after its timed call (see
hf_runner.py), which, if anything, favours transformers. Targets are vl3's speed and memory goals.
With --batch, a folder captioned by `vl3 batch` one item at a time and several per forward pass.
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
# Bytes of weights one decode step reads (bench_gpu.weight_bytes), from an engine loaded as vl3 runs it.
BYTES_SCRIPT = (
    "import sys, json\n"
    f"sys.path.insert(0, {str(HERE)!r})\n"
    "from bench_gpu import weight_bytes\n"
    "from vl3cli.engine import Engine\n"
    "e = Engine.load(sys.argv[1], device='cpu', quantize=sys.argv[2] or None)\n"
    "print(json.dumps({'bytes': weight_bytes(e), 'dtype': str(e.dtype)}))\n"
)

# What this machine allows each part of a run (the "least time" table), in a fresh process: the
# FLOPs of the encode and prefill's linear layers (from the checkpoint's tensor shapes), the best
# float32 product rate on the prefill's largest product with its weight already in float32, and the
# rate of writing fresh memory (what a packed copy of the weights costs to lay down).
FLOOR_SCRIPT = (
    "import json, struct, sys, time\n"
    "from pathlib import Path\n"
    "import torch\n"
    "folder, tokens, patches, visual = Path(sys.argv[1]), *map(int, sys.argv[2:5])\n"
    "params = {'language': 0, 'vision': 0, 'projector': 0}\n"
    "for f in sorted(folder.glob('*.safetensors')):\n"
    "    with open(f, 'rb') as fh:\n"
    "        header = json.loads(fh.read(struct.unpack('<Q', fh.read(8))[0]))\n"
    "    for name, t in header.items():\n"
    "        if name == '__metadata__' or len(t['shape']) != 2 or not name.endswith('.weight'):\n"
    "            continue\n"
    "        n = t['shape'][0] * t['shape'][1]\n"
    "        if 'language_model.layers.' in name: params['language'] += n\n"
    "        elif 'vision_model.encoder.layers.' in name: params['vision'] += n\n"
    "        elif 'projector.' in name: params['projector'] += n\n"
    "flops = 2 * (params['language'] * tokens + params['vision'] * patches + params['projector'] * visual)\n"
    "text = json.loads((folder / 'config.json').read_text())['text_config']\n"
    "x = torch.randn(tokens, text['hidden_size'])\n"
    "w = torch.randn(text['intermediate_size'], text['hidden_size'])\n"
    "best = 1e9\n"
    "for _ in range(6):\n"
    "    t = time.perf_counter(); torch.mm(x, w.t()); best = min(best, time.perf_counter() - t)\n"
    "rate = 2 * x.shape[0] * w.numel() / best\n"
    "fresh = 1e9\n"
    "for _ in range(3):\n"
    "    t = time.perf_counter(); torch.empty(2**30, dtype=torch.uint8).fill_(1); fresh = min(fresh, time.perf_counter() - t)\n"
    "print(json.dumps({'flops': flops, 'rate': rate, 'fresh': 2**30 / fresh}))\n"
)


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


def read_bandwidth() -> float:
    """GB/s of a plain read of 1 GiB (best of 5 sums), in a fresh process."""
    code = ("import time, torch\nx = torch.ones(2**28)\nbest = 1e9\n"
            "for _ in range(6):\n    t = time.perf_counter(); x.sum(); best = min(best, time.perf_counter() - t)\n"
            "print(2**30 / best / 1e9)\n")
    return float(run_measured([sys.executable, "-c", code])[2])


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
          f"{args.device}, median of {args.runs} runs (whole process, load included)")
    print("\n| --batch-size | images/s | speed-up | same answers |\n|---|---|---|---|")
    print(f"| 1 | {median(rates[1]):.3f} | 1.00x | |")
    print(f"| {args.batch} | {median(rates[args.batch]):.3f} | {median(rates[args.batch]) / median(rates[1]):.2f}x | "
          f"{'yes' if same else 'NO'} |")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(random_checkpoint.GEOMETRIES), default="2b")
    parser.add_argument("--checkpoint", type=Path, help="an existing HF-format checkpoint folder instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--image-size", default="224x224", help="WxH of the synthetic test image")
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
    if args.batch:
        batch_table(model, args, ["--device", args.device], n)
    if args.skip_compare:
        return

    vl3 = VL3 + ["describe", str(image), "--model", str(model), "--max-new-tokens", str(n), "--ignore-eos",
                 "--format", "json", "--no-stream", "--device", args.device]
    commands = {
        "vl3": vl3,
        "transformers": [sys.executable, str(HERE / "hf_runner.py"), "--model", str(model), "--image", str(image),
                         "--max-new-tokens", str(n), "--device", args.device, "--dtype", "auto"],
        "vl3 int8": vl3 + ["--quantize", "int8"],
        "vl3 int4": vl3 + ["--quantize", "int4"],
    }
    results: dict[str, dict[str, list[float]]] = {name: {} for name in commands}
    bandwidth: list[float] = []

    def add(name, key, value):
        results[name].setdefault(key, []).append(value)

    names = list(commands)
    for i in range(args.runs):
        bandwidth.append(read_bandwidth())
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
            wall, rss, out = run_measured(commands[name])
            add(name, "rss", rss)
            if name == "transformers":
                t = json.loads(out)
                # the encode and one-token prefill measurements come after the timed user run
                add(name, "whole", wall - t["encode_s"] - t["prefill_s"] - t["generate_warm_s"])
                for k in ("load_s", "encode_s"):
                    add(name, k, t[k])
                add(name, "prefill_s", t["prefill_s"] - t["encode_s"])  # generate(1 token) encodes too
                add(name, "tok_s", (t["tokens"] - 1) / (t["generate_warm_s"] - t["prefill_s"]))  # both warm
            else:
                rec = json.loads(out)
                t = rec["timings"]
                add(name, "whole", wall)
                add(name, "rest_s", wall - t["total_s"])  # start-up, imports, exit
                for k in ("load_s", "encode_s", "prefill_s"):
                    add(name, k, t[k])
                if name == "vl3":
                    sizes = (rec["prompt_tokens"], rec["visual_tokens"], rec["resized"])
                add(name, "tok_s", (rec["generated_tokens"] - 1) / t["decode_s"])
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    bandwidth.append(read_bandwidth())

    help_t, torch_t = [], []
    for _ in range(5):
        help_t.append(run_measured(VL3 + ["--help"])[0])
        torch_t.append(run_measured([sys.executable, "-c", "import torch"])[0])
    per_token = {}
    for name, quantize in (("vl3", ""), ("vl3 int8", "int8"), ("vl3 int4", "int4")):
        info = json.loads(run_measured([sys.executable, "-c", BYTES_SCRIPT, str(model), quantize])[2])
        per_token[name] = info["bytes"]
        dtype = info["dtype"]

    (tokens, visual, (rw, rh)) = sizes
    patch = json.loads((model / "config.json").read_text())["vision_config"]["patch_size"]
    floor = json.loads(run_measured([sys.executable, "-c", FLOOR_SCRIPT, str(model), str(tokens),
                                     str((rw // patch) * (rh // patch)), str(visual)])[2])  # fmt: skip

    m = {name: {k: median(v) for k, v in r.items()} for name, r in results.items()}
    ours, theirs = m["vl3"], m["transformers"]
    bw = median(bandwidth)
    print(f"\nvl3 vs transformers, each with its defaults: {args.checkpoint or args.geometry} checkpoint "
          f"(stored in bf16), {args.device}, vl3 ran {dtype}, {w}x{h} image, {n} new tokens, "
          f"median of {args.runs} runs, read bandwidth {bw:.1f} GB/s")
    print("\n| measure | vl3 | transformers | ratio | target | |\n|---|---|---|---|---|---|")

    def line(label, key, unit, target=None, higher=False):
        a, b = ours[key], theirs[key]
        ratio = a / b
        ok = "" if target is None else verdict(ratio >= target if higher else ratio <= target)
        goal = "" if target is None else f"{'>=' if higher else '<='} {target}x"
        print(f"| {label} | {a:.3f} {unit} | {b:.3f} {unit} | {ratio:.2f}x | {goal} | {ok} |")

    line("whole run (process start to exit)", "whole", "s", 0.5)
    line("model load", "load_s", "s")
    line("vision encode", "encode_s", "s")
    line("prefill (to first token)", "prefill_s", "s")
    line("decode", "tok_s", "tok/s", 1.15, higher=True)
    line("peak RSS", "rss", "MB")
    h_ratio = median(help_t) / median(torch_t)
    print(f"| `vl3 --help` vs `python -c 'import torch'` | {median(help_t):.3f} s | {median(torch_t):.3f} s | "
          f"{h_ratio:.2f}x | <= 0.3x | {verdict(h_ratio <= 0.3)} |")

    print(f"\nDecode against the read bandwidth ({bw:.1f} GB/s) and quantization (vl3 default = {dtype}):")
    print("\n| vl3 | decode tok/s | vs default | weights read per token | GB/s | of read bandwidth | peak RSS MB "
          "| vs default | targets |\n|---|---|---|---|---|---|---|---|---|")
    base = m["vl3"]
    for name, targets in (("vl3", (None, None)), ("vl3 int8", (1.7, None)), ("vl3 int4", (2.5, 0.45))):
        r = m[name]
        speed, mem = r["tok_s"] / base["tok_s"], r["rss"] / base["rss"]
        gbs = per_token[name] * r["tok_s"] / 1e9
        goals = []
        if name == "vl3":
            goals.append(f">= 60% of bandwidth: {verdict(gbs / bw >= 0.6)}")
        if targets[0]:
            goals.append(f"decode >= {targets[0]}x: {verdict(speed >= targets[0])}")
        if targets[1]:
            goals.append(f"RSS <= {targets[1]}x: {verdict(mem <= targets[1])}")
        print(f"| {name.replace('vl3 ', '--quantize ') if name != 'vl3' else 'default'} | {r['tok_s']:.2f} | "
              f"{speed:.2f}x | {per_token[name] / 1e9:.2f} GB | {gbs:.1f} | {gbs / bw:.0%} | {r['rss']:.0f} | "
              f"{mem:.2f}x | {'; '.join(goals)} |")

    least_time_table(ours, theirs["whole"], floor, per_token["vl3"], bw, median(torch_t), n)


def least_time_table(ours: dict, theirs_whole: float, floor: dict, per_token: float, bw: float,
                     import_s: float, n: int) -> None:  # fmt: skip
    """Each part of vl3's run against the least time this machine allows it, and their sums."""
    decode_s = (n - 1) / ours["tok_s"]
    parts = [
        ("start-up, imports, exit", ours["rest_s"], import_s, "`python -c 'import torch'`"),
        ("load", ours["load_s"], per_token / floor["fresh"],
         f"the packed weights ({per_token / 1e9:.2f} GB) written to fresh memory at {floor['fresh'] / 1e9:.1f} GB/s"),
        ("encode + prefill", ours["encode_s"] + ours["prefill_s"], floor["flops"] / floor["rate"],
         f"{floor['flops'] / 1e12:.2f} TFLOP of linear layers at {floor['rate'] / 1e9:.0f} GFLOP/s "
         "(float32 product, weight already float32)"),
        (f"decode ({n - 1} tokens)", decode_s, (n - 1) * per_token / (bw * 1e9),
         f"{per_token / 1e9:.2f} GB per token at {bw:.1f} GB/s"),
    ]
    print("\nThe least time each part of the run can take on this machine (a part at its measured limit):")
    print("\n| part | vl3 | least | limit |\n|---|---|---|---|")
    for label, actual, least, how in parts:
        print(f"| {label} | {actual:.2f} s | {least:.2f} s | {how} |")
    actual, least = sum(p[1] for p in parts), sum(p[2] for p in parts)
    print(f"| sum | {actual:.2f} s | {least:.2f} s | |")
    print(f"| sum / transformers' whole run ({theirs_whole:.2f} s) | {actual / theirs_whole:.2f}x | "
          f"{least / theirs_whole:.2f}x | target <= 0.5x |")


if __name__ == "__main__":
    main()
