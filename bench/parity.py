"""vl3 against transformers at real size: the same random-weight checkpoint, the same inputs.

    python bench/parity.py --geometry 2b                        # CPU, float32
    python bench/parity.py --geometry 2b --device cuda --dtype bfloat16

Each side runs in its own process (so the two models are never in memory together) and saves
the logits of the last 40 prompt positions for an image prompt; the parent prints the largest
difference and how often the two agree on the next token.
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

GRID = (1, 16, 22)  # a 224x308 image at merge size 1


def run_side(which: str, model: Path, device: str, dtype: str, out: Path) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(GRID[1] * GRID[2], 588, generator=gen)
    ids = image_prompt_ids(model, GRID[1] * GRID[2])
    with torch.inference_mode():
        if which == "vl3":
            from vl3cli.engine import Engine

            engine = Engine.load(model, device=device, dtype=dtype)
            logits = engine.forward_logits(ids, engine.encode_pixels(pixels, GRID, 1))
        else:
            from transformers import VideoLlama3ForConditionalGeneration

            ref = VideoLlama3ForConditionalGeneration.from_pretrained(
                str(model), dtype=getattr(torch, dtype), attn_implementation="sdpa"
            ).to(device).eval()
            logits = ref(
                input_ids=torch.tensor([ids], device=device),
                pixel_values=pixels.to(device, getattr(torch, dtype)),
                image_grid_thw=torch.tensor([GRID], device=device),
                image_merge_sizes=torch.tensor([1], device=device),
            ).logits[0]
    torch.save(logits[-40:].float().cpu().clone(), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="2b")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vl3-bench")
    parser.add_argument("--side", choices=["vl3", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        run_side(args.side, args.checkpoint, args.device, args.dtype, args.out)
        return
    import random_checkpoint
    import torch

    model = args.checkpoint or random_checkpoint.make(args.geometry, args.work / f"ckpt-{args.geometry}")
    logits = {}
    for side in ("vl3", "transformers"):
        out = args.work / f"parity-{side}.pt"
        subprocess.run([sys.executable, __file__, "--side", side, "--checkpoint", str(model), "--device", args.device,
                        "--dtype", args.dtype, "--out", str(out)], check=True)
        logits[side] = torch.load(out)
    a, b = logits["vl3"], logits["transformers"]
    print(f"{args.checkpoint or args.geometry}, {args.device}, {args.dtype}: max |diff| {(a - b).abs().max().item():.3g} "
          f"(logits up to {b.abs().max().item():.3g}), same next token at {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.0%} "
          f"of {a.shape[0]} positions")


if __name__ == "__main__":
    main()
