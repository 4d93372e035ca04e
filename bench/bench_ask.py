"""Several questions about one video: the shared prompt start prefilled once, against every
question prefilled whole.

    python bench/bench_ask.py                          # 5 questions, 32-frame video, mid geometry
    python bench/bench_ask.py --geometry tiny --runs 5

`Model.ask` with 5 questions about a 32-frame video (decoded and encoded once either way) runs
with prefix reuse (the default: the system turn and the video's tokens are prefilled once, each
question prefills only its own tokens) and without it (`model.runner.share_prefix = False`: each
question's whole prompt is prefilled), alternating, in one process; the table gives medians of
the whole call and of the prefill time summed over the answers' records. The answers must be
identical both ways (greedy).
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
sys.path.insert(0, str(HERE.parent / "tests"))

QUESTIONS = ["What happens first?", "What colours are there?", "Is anything moving?", "How does it end?",
             "Describe the background."]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="mid", help="mid (bench/random_checkpoint.py), 2b, or tiny (the test model)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--size", default=None, help="video frame size WxH (default: 448x336; tiny: 224x168, its context is short)")
    args = parser.parse_args()

    import vl3cli
    from media_factory import make_video

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.geometry == "tiny":
            import tiny

            ckpt = tiny.make_checkpoint(tmp / "ckpt", "hf", tied=True, seed=0)
        else:
            import random_checkpoint

            ckpt = random_checkpoint.make(args.geometry, tmp / "ckpt")
        size = args.size or ("224x168" if args.geometry == "tiny" else "448x336")
        clip = make_video(tmp / "clip.mp4", seconds=args.frames, fps=2, size=tuple(map(int, size.split("x"))))
        model = vl3cli.load(str(ckpt), max_new_tokens=args.max_new_tokens, ignore_eos=True, max_frames=args.frames)
        model.ask(str(clip), QUESTIONS[:2])  # warm-up
        wall = {True: [], False: []}
        prefill = {True: [], False: []}
        answers = {}
        for r in range(args.runs):
            for share in (True, False) if r % 2 == 0 else (False, True):
                model.runner.share_prefix = share
                start = time.perf_counter()
                results = model.ask(str(clip), QUESTIONS)
                wall[share].append(time.perf_counter() - start)
                prefill[share].append(sum(x.timings["prefill_s"] for x in results))
                answers[share] = [x.text for x in results]
                if share:
                    cached = max(x.prompt_tokens_cached for x in results)
        tokens = results[0].prompt_tokens
    assert answers[True] == answers[False], "prefix reuse changed an answer"
    print(f"\n{len(QUESTIONS)} questions about a {args.frames}-frame video ({args.geometry} geometry, prompts of "
          f"{tokens} tokens, {cached} of them shared), {args.max_new_tokens} tokens each; medians of {args.runs} runs\n")  # fmt: skip
    print("| | whole ask | prefill (sum over the answers) |")
    print("|---|---|---|")
    for share, name in ((False, "every question prefilled whole"), (True, "shared start prefilled once")):
        print(f"| {name} | {statistics.median(wall[share]):.2f} s | {statistics.median(prefill[share]):.2f} s |")
    print(f"\nprefix reuse: {statistics.median(wall[False]) / statistics.median(wall[True]):.2f}x faster in all, "
          f"{statistics.median(prefill[False]) / statistics.median(prefill[True]):.2f}x less prefill; same answers")


if __name__ == "__main__":
    main()
