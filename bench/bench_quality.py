"""What --quantize int8 / int4 cost in quality: logits against the unquantized model, teacher-forced.

    python bench/bench_quality.py                      # 2B geometry (random weights, stored in bf16)
    python bench/bench_quality.py --positions 64 --dtype float32

The unquantized model (the checkpoint's dtype, as `--dtype auto` picks it) answers an image prompt
greedily for --positions tokens; then each variant reads the same prompt + answer in one forward
pass (teacher forcing) and the logits at the answer's positions are compared with the unquantized
ones: cosine similarity (mean and worst position), top-1 agreement, and the largest logit
difference relative to the logits' spread. Each variant runs in its own process, so only one
model is in memory at a time.

Random weights are harsher than a trained model's: their logits are nearly flat (top-1 margins
are small), so top-1 agreement here is a lower bound of what a real checkpoint shows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from random_checkpoint import image_prompt_ids  # noqa: E402

GRID = (1, 16, 16)  # a 224x224 image at merge size 1: 256 visual tokens


def run_side(model: Path, quantize: str | None, dtype: str, positions: int, out: Path) -> None:
    import torch

    from vl3cli.decoding import DecodingParams
    from vl3cli.engine import Engine
    from vl3cli.generate import Request, generate

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(GRID[1] * GRID[2], 588, generator=gen)
    ids = image_prompt_ids(model, GRID[1] * GRID[2])
    engine = Engine.load(model, device="cpu", dtype=dtype, quantize=quantize)
    with torch.inference_mode():
        features = engine.encode_pixels(pixels, GRID, 1)
        answer_file = out.parent / "quality-answer.pt"  # the unquantized answer, shared by the variants
        if quantize is None:
            params = DecodingParams(max_new_tokens=positions, ignore_eos=True)
            answer = [step[0] for step in generate(engine, [Request(ids, features)], params)]
            torch.save(answer, answer_file)
        answer = torch.load(answer_file)
        logits = engine.forward_logits(ids + answer[:-1], features)[len(ids) - 1 :]  # predicts each answer token
    torch.save(logits.float().clone(), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="2b")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vl3-bench")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args.checkpoint, None if args.side == "none" else args.side, args.dtype, args.positions, args.out)
        return

    import random_checkpoint
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.checkpoint or random_checkpoint.make(args.geometry, args.work / f"ckpt-{args.geometry}")
    logits = {}
    for side in ("none", "int8", "int4"):
        out = args.work / "quality-ref.pt" if side == "none" else args.work / f"quality-{side}.pt"
        subprocess.run([sys.executable, __file__, "--side", side, "--checkpoint", str(model), "--dtype", args.dtype,
                        "--positions", str(args.positions), "--out", str(out)], check=True)
        logits[side] = torch.load(out)
    ref = logits["none"]
    print(f"\n--quantize against the unquantized model: {args.checkpoint or args.geometry} checkpoint (random "
          f"weights), --dtype {args.dtype}, {ref.shape[0]} teacher-forced answer positions after a 256-token image prompt")
    print("\n| --quantize | cosine similarity (mean) | (worst position) | top-1 agreement | max abs diff / logit std |")
    print("|---|---|---|---|---|")
    for side in ("int8", "int4"):
        q = logits[side]
        cos = torch.nn.functional.cosine_similarity(q, ref, dim=-1)
        top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean()
        rel = (q - ref).abs().max() / ref.std()
        print(f"| {side} | {cos.mean():.5f} | {cos.min():.5f} | {top1:.1%} ({int(top1 * ref.shape[0])}/{ref.shape[0]}) "
              f"| {rel:.3f} |")


if __name__ == "__main__":
    main()
