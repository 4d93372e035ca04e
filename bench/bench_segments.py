"""Long-video segments: wall time, peak RSS and segments/s, batched against one segment at a time,
and shot detection time per minute of video.

    python bench/bench_segments.py                         # 10-minute 720p clip, 30 s segments, tiny model
    python bench/bench_segments.py --minutes 120 --size 1920x1080 --runs 1    # the 2-hour memory check

Each run is `vl3 batch CLIP --segments S --out ...` in a fresh process (peak RSS from os.wait4),
`--batch-size 8` and `--batch-size 1` alternating, medians over --runs. The checkpoint is the
tiny test model unless --model names another, so the figures are the media pipeline's (decoding
once, forward, window by window) plus a small model's. Shot detection (`--segments scenes`'s
FFmpeg scdet pass on quarter-size frames) is timed in this process.

The synthetic clip (bench_media.py's generator: a gradient with a block that moves once a
second, libx264 ultrafast) is cached in the temp dir and reused.
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
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_media import generate  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `cmd`, its output discarded."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null:
        pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null.fileno(), 1),
                                                                    (os.POSIX_SPAWN_DUP2, null.fileno(), 2)])  # fmt: skip
        _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--segments", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", help="a checkpoint folder (default: the tiny test model)")
    args = parser.parse_args()

    w, h = map(int, args.size.split("x"))
    clip = Path(tempfile.gettempdir()) / f"vl3-bench-{args.minutes:g}min-{w}x{h}.mp4"
    if not clip.exists():
        generate(clip, args.minutes, 25, (w, h), 250)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import tiny

            model = str(tiny.make_checkpoint(Path(tmp) / "ckpt", "hf", tied=True, seed=0))
        segments = int(args.minutes * 60 / args.segments + 0.999)
        times: dict[int, list[float]] = {8: [], 1: []}
        rss: dict[int, list[float]] = {8: [], 1: []}
        for r in range(args.runs):
            for size in (8, 1) if r % 2 == 0 else (1, 8):
                out = Path(tmp) / f"r{r}-{size}.jsonl"
                wall, peak = run([sys.executable, "-m", "vl3cli", "batch", str(clip), "--segments", str(args.segments),
                                  "--batch-size", str(size), "--max-new-tokens", str(args.max_new_tokens),
                                  "--ignore-eos", "-m", model, "--out", str(out)])  # fmt: skip
                records = [json.loads(x) for x in out.read_text().splitlines()]
                assert len(records) == segments and all(x["error"] is None for x in records), len(records)
                times[size].append(wall)
                rss[size].append(peak)

        from vl3cli import container, video

        meta = container.probe(clip)
        start = time.perf_counter()
        cuts = video.detect_cuts(clip, meta)
        detect_s = time.perf_counter() - start

    print(f"\n{args.minutes:g}-minute {w}x{h} H.264 clip, --segments {args.segments:g} ({segments} segments), "
          f"{args.max_new_tokens} tokens each, medians of {args.runs} runs\n")  # fmt: skip
    print("| --batch-size | wall | segments/s | peak RSS |")
    print("|---|---|---|---|")
    for size in (1, 8):
        wall = statistics.median(times[size])
        print(f"| {size} | {wall:.1f} s | {segments / wall:.2f} | {statistics.median(rss[size]):.0f} MB |")
    print(f"\nbatched / one at a time: {statistics.median(times[1]) / statistics.median(times[8]):.2f}x segments/s")
    print(f"shot detection (scdet on quarter-size frames): {detect_s:.1f} s, {detect_s / args.minutes:.2f} s per minute "
          f"of video ({len(cuts)} cuts found)")  # fmt: skip


if __name__ == "__main__":
    main()
