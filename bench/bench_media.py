"""Video decode benchmark: throughput and peak memory of the media pipeline, per backend.

    python bench/bench_media.py                       # synthesise a 60-minute 1080p H.264 clip
    python bench/bench_media.py --minutes 10          # a shorter one (generation is the slow part)
    python bench/bench_media.py --video movie.mp4     # your own file

Each backend (decord, PyAV) runs ``prepare_visual`` (probe, sample at --fps capped to
--max-frames, decode + resize, normalise, patchify, prune) in a fresh subprocess, so the
peak RSS (VmHWM) of one does not leak into the other. "decode s" is probe + sampled-frame
decoding + resize; "total s" adds normalising, patchifying and pruning.

The synthetic clip is low-complexity content (a gradient with a moving block) encoded
with libx264 ``ultrafast``, keyframes every --gop frames, so generation runs at hundreds of
frames per second; it is cached next to the system temp dir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(path: Path, minutes: float, fps: int, size: tuple[int, int], gop: int) -> None:
    import av
    import numpy as np

    w, h = size
    n = int(minutes * 60 * fps)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 96)], -1).astype(np.uint8)
    variants = []  # 50 precomputed YUV frames reused in turn: the encoder does the work, not numpy
    for i in range(50):
        img = base.copy()
        img[h // 3 : h // 3 + h // 6, (i * 37) % (w - w // 8) :][:, : w // 8] = (255, (i * 5) % 256, 0)
        variants.append(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p"))
    tmp = path.with_suffix(".part.mp4")
    t0 = time.perf_counter()
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "tune": "zerolatency"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        s.thread_type = "AUTO"
        for i in range(n):
            frame = variants[(i // fps) % len(variants)]  # content changes once a second
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
            if i and i % (fps * 600) == 0:
                print(f"  generated {i / fps / 60:.0f} of {minutes:g} min", file=sys.stderr)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    print(f"  generated {path} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def worker(video: str, backend: str, fps: float, max_frames: int) -> None:
    """One measurement, in its own process; prints one JSON line. The steps are those of
    ``prepare_visual`` for a video, timed separately."""
    sys.path.insert(0, str(ROOT))
    from vl3cli import media
    from vl3cli.preprocess import MediaOptions, ProcessorConfig, plan_video, to_pixel_values
    from vl3cli.pruning import prune_mask

    config = ProcessorConfig()
    options = MediaOptions(fps=fps, max_frames=max_frames)
    m, p = config.video_merge_size, config.patch_size
    t0 = time.perf_counter()
    decoded = media.read_video(video, plan_video(video, config, options), backend=backend)
    decode_s = time.perf_counter() - t0
    t, h, w, _ = decoded.frames.shape
    pixel_values = to_pixel_values(decoded.frames, config, m)
    keep = prune_mask(pixel_values, (t, h // p, w // p), m, threshold=options.prune_threshold)
    total_s = time.perf_counter() - t0
    print(json.dumps({
        "backend": decoded.backend, "frames": t, "decode_s": decode_s, "total_s": total_s,
        "peak_rss_mb": peak_rss_mb(), "tokens": keep.numel(), "kept": int(keep.sum()),
        "size": f"{w}x{h}", "duration": decoded.meta.duration,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", help="video to read (default: synthesise one)")
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the synthetic clip")
    ap.add_argument("--video-fps", type=int, default=25, help="frame rate of the synthetic clip")
    ap.add_argument("--size", default="1920x1080", help="WxH of the synthetic clip")
    ap.add_argument("--gop", type=int, default=250, help="keyframe interval of the synthetic clip")
    ap.add_argument("--fps", type=float, default=1.0, help="sampling rate")
    ap.add_argument("--max-frames", type=int, default=180)
    ap.add_argument("--backends", default="decord,pyav")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.video, args.worker, args.fps, args.max_frames)
        return

    video = args.video
    if video is None:
        w, h = (int(v) for v in args.size.split("x"))
        name = f"vl3-bench-{args.minutes:g}min-{w}x{h}-{args.video_fps}fps-gop{args.gop}.mp4"
        path = Path(tempfile.gettempdir()) / name
        if not path.exists():
            print(f"synthesising {path} (this takes a while)...", file=sys.stderr)
            generate(path, args.minutes, args.video_fps, (w, h), args.gop)
        video = str(path)
    size_mb = os.path.getsize(video) / 2**20
    print(f"video: {video} ({size_mb:.0f} MB); sampling {args.fps:g} fps, at most {args.max_frames} frames")
    print(f"{'decoder':<8} {'frames':>6} {'decode s':>9} {'frames/s':>9} {'total s':>8} "
          f"{'peak RSS MB':>12} {'tokens':>7} {'kept':>6}  size")  # fmt: skip
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--worker", backend, "--video", video, "--fps", str(args.fps),
               "--max-frames", str(args.max_frames)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{backend:<8} failed: {err}")
            continue
        r = json.loads(lines[-1])
        print(f"{r['backend']:<8} {r['frames']:>6} {r['decode_s']:>9.2f} {r['frames'] / r['decode_s']:>9.1f} "
              f"{r['total_s']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['tokens']:>7} {r['kept']:>6}  {r['size']}")  # fmt: skip


if __name__ == "__main__":
    main()
