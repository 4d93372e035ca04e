"""Decode steps of vl3's defaults, --quantize int8 and int4, interleaved in one process.

    python bench/bench_decode.py                     # 2B geometry stored in bf16, CPU, 40 rounds
    python bench/bench_decode.py --rounds 100 --prompt 1000

The three engines are loaded side by side, a prompt is prefilled into each, then every round times
one decode step of each in turn, so a busy machine slows all three alike. The table gives the
fastest step (the machine at its quietest) and the median, tokens/s, the bytes of weights each
step reads (decoder layers, final norm, output head) and what share of the RAM read bandwidth
(a plain `x.sum()` over 1 GiB, best of 6, measured right after) that stream is. Whole-process
figures, against transformers, are bench_speed.py's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import random_checkpoint  # noqa: E402
from bench_gpu import weight_bytes  # noqa: E402


def read_bandwidth() -> float:
    x = torch.ones(2**28)  # 1 GiB of float32
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return 2**30 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="2b")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--prompt", type=int, default=270, help="prompt tokens prefilled first")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vl3-bench")
    args = parser.parse_args()
    from vl3cli.engine import Engine

    model = args.checkpoint or random_checkpoint.make(args.geometry, args.work / f"ckpt-{args.geometry}")
    variants = {"default": None, "--quantize int8": "int8", "--quantize int4": "int4"}
    engines = {name: Engine.load(model, device="cpu", quantize=q) for name, q in variants.items()}
    ids = list(range(100, 100 + args.prompt))
    room = args.prompt + args.rounds + 1
    times: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        caches = {name: e.new_cache(1, room) for name, e in engines.items()}
        for name, e in engines.items():
            e.prefill(caches[name], 0, ids)
        token = torch.tensor([5])
        for _ in range(args.rounds):
            for name, e in engines.items():
                start = time.perf_counter()
                e.decode(caches[name], token)
                times[name].append(time.perf_counter() - start)
    bandwidth = read_bandwidth()
    dtype = engines["default"].dtype
    print(f"\nDecode steps, {args.checkpoint or args.geometry} checkpoint, CPU, {args.prompt}-token prompt, "
          f"{args.rounds} interleaved rounds; default = {dtype}; read bandwidth {bandwidth:.1f} GB/s\n")
    print("| vl3 | fastest step | median step | tok/s (fastest) | vs default | weights per token | GB/s | of read bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    base = min(times["default"])
    for name, e in engines.items():
        best, per_token = min(times[name]), weight_bytes(e)
        print(f"| {name} | {best * 1000:.1f} ms | {statistics.median(times[name]) * 1000:.1f} ms | {1 / best:.2f} | "
              f"{base / best:.2f}x | {per_token / 1e9:.2f} GB | {per_token / best / 1e9:.1f} | "
              f"{per_token / best / 1e9 / bandwidth:.0%} |")


if __name__ == "__main__":
    main()
