"""Random-weight VideoLLaMA3 checkpoints at real and mid size, for benchmarks without real weights.

    python bench/random_checkpoint.py --geometry 2b --out /tmp/vl3-2b     # the 2B geometry
    python bench/random_checkpoint.py --geometry mid --out /tmp/vl3-mid   # CPU-sized

Writes an HF-format folder (config.json, model.safetensors, tokenizer.json, generation and
processor configs) that both vl3 and transformers load. The geometry of `2b` and `7b` is that
of the published checkpoints (see tests/data/*.config.json); `mid` is Qwen2.5-0.5B's decoder
with a 12-layer vision encoder, a size that runs at a usable speed on a laptop CPU; `tiny` is for
smoke runs of the benchmarks. The weights are stored in bf16 (like every published checkpoint)
unless --dtype says otherwise, and config.json says so (`torch_dtype`).
The tokenizer is a small byte-level BPE trained here: its ids stay below the model's vocab.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

GEOMETRIES = {
    "2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
    ),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
    ),
    "tiny": dict(  # smoke tests of the benchmarks (bench_gpu.py --smoke)
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
    "mid": dict(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>"]
CORPUS = [
    "Describe this image in detail. Describe this video in detail.",
    "A red square moves from the left to the right of a blue background, then a cat jumps.",
    "The quick brown fox jumps over the lazy dog. Time 0.0s: 1.0s: 2.0s: 0123456789 .,:;!?",
]


def train_tokenizer() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 8, trainer=trainer)
    return tok.to_str()


def make(geometry: str, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write the checkpoint (skipped when `out` already holds one of this geometry)."""
    from safetensors.torch import save_file

    from vl3cli.config import ModelConfig
    from vl3cli.model import VideoLlama3
    from vl3cli.weights import checkpoint_key, checkpoint_shapes

    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "bench-geometry.txt"
    if stamp.is_file() and stamp.read_text() == geometry and (out / "model.safetensors").is_file():
        return out
    from tokenizers import Tokenizer

    tokenizer = train_tokenizer()
    ids = {t: Tokenizer.from_str(tokenizer).token_to_id(t) for t in SPECIAL}
    geo = GEOMETRIES[geometry]
    tied = geo["text"]["tie_word_embeddings"]
    config = {
        "architectures": ["VideoLlama3ForConditionalGeneration"],
        "model_type": "video_llama_3",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "tie_word_embeddings": tied,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "text_config": dict(geo["text"], model_type="qwen2", max_position_embeddings=32768, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, hidden_act="silu"),
        "vision_config": dict(geo["vision"], model_type="video_llama_3_vision", patch_size=14,
                              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3),
    }
    with torch.device("meta"):
        model = VideoLlama3(ModelConfig.from_dict(config))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in checkpoint_shapes(model).items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("bias"):
            value = torch.randn(shape, generator=gen) * 0.02
        elif len(shape) == 1:
            value = torch.ones(shape)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        state[checkpoint_key(name, "hf")] = value.to(dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(tokenizer)
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    )
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VideoLlama3ImageProcessor", "min_pixels": 3136, "max_pixels": 3211264,
        "patch_size": 14, "merge_size": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }))
    (out / "video_preprocessor_config.json").write_text(json.dumps({
        "merge_size": 2, "min_pixels": 12544, "max_pixels": 12845056, "min_frames": 4, "max_frames": 180,
        "fps": 1, "use_token_compression": True, "patch_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }))
    stamp.write_text(geometry)
    return out


def image_prompt_ids(model: Path, visual: int) -> list[int]:
    """The chat prompt "Describe this image in detail." with `visual` image placeholders, as token ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    special = tok.token_to_id
    return (
        [special("<|im_start|>")] + tok.encode("user\n").ids + [special("<|image_pad|>")] * visual
        + tok.encode("\nDescribe this image in detail.").ids + [special("<|im_end|>")] + tok.encode("\n").ids
        + [special("<|im_start|>")] + tok.encode("assistant\n").ids
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="mid")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    path = make(args.geometry, args.out, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{path}: {args.geometry} geometry, {size / 1e9:.2f} GB of weights")


if __name__ == "__main__":
    main()
