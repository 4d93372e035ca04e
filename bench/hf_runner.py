"""transformers' side of bench/bench_speed.py: what a user of transformers runs, timed by phase.

    python bench/hf_runner.py --model DIR --image IMG --max-new-tokens 32 [--device cpu] [--dtype auto]

Prints one JSON object: import_s, load_s, media_s, generate_s (prefill + all new tokens, as a
user calls it), then the extra measurements encode_s (vision encoder alone), prefill_s
(generate with one new token) and generate_warm_s (generate again), and tokens. Decode speed
comes from the two warm calls, generate_warm_s - prefill_s: the first call's one-off costs
(first touch of the mapped weights) stay out of it. The prompt follows VideoLLaMA3's chat layout with
one image placeholder per merged token, as transformers' processor writes it.
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (transformers' default: the checkpoint's dtype) or a dtype")
    args = parser.parse_args()

    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerFast, VideoLlama3ForConditionalGeneration
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

    timings = {"import_s": time.perf_counter() - T0}
    start = time.perf_counter()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = VideoLlama3ForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    dtype = model.dtype
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{args.model}/tokenizer.json")
    processor = VideoLlama3ImageProcessorPil.from_pretrained(args.model)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    image = Image.open(args.image).convert("RGB")
    inputs = processor(images=[image], return_tensors="pt")
    tokens = int(inputs["image_grid_thw"][0].prod())
    prompt = (
        "<|im_start|>user\n" + "<|image_pad|>" * tokens + "\nDescribe this image in detail.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    pixels = inputs["pixel_values"].to(args.device, dtype)
    grid = inputs["image_grid_thw"].to(args.device)
    merge = inputs["image_merge_sizes"].to(args.device)
    timings["media_s"] = time.perf_counter() - start

    def run(n: int):
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grid,
                image_merge_sizes=merge, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
            )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    out = run(args.max_new_tokens)
    timings["generate_s"] = time.perf_counter() - start
    timings["tokens"] = int(out.shape[1] - ids.shape[1])
    timings["whole_internal_s"] = time.perf_counter() - T0

    start = time.perf_counter()
    with torch.inference_mode():
        model.model.get_image_features(pixels, grid, merge)
    timings["encode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    run(1)
    timings["prefill_s"] = time.perf_counter() - start
    start = time.perf_counter()
    run(args.max_new_tokens)  # again, warm like the prefill above: decode = the difference of the two
    timings["generate_warm_s"] = time.perf_counter() - start
    timings["prompt_tokens"] = int(ids.shape[1])
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
