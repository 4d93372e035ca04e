"""Tiny random VideoLLaMA3 checkpoints, written to disk in either published format.

`make_checkpoint(dir, fmt="hf"|"original", tied=..., sharded=..., seed=...)` writes a complete
checkpoint folder (config.json, safetensors weights, tokenizer.json trained in-process,
tokenizer_config.json, generation_config.json, processor configs). The same `seed` gives the
same weights in both formats, so the two loaders can be compared with each other and with
transformers (`hf_reference`), which reads the HF-format folder.

The key names of the original format are written here from the layout documented for the
published checkpoints, independently of vl3's own renaming code.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<image>"]

TEXT = dict(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
)

_CORPUS = [
    "Describe this image in detail.",
    "Describe this video in detail.",
    "What happens after the cat jumps? The cat lands on the table and looks around.",
    "A red square moves from the left to the right of a blue background.",
    "Time 0.0s: Time 1.0s: Time 2.0s: frames, seconds, colours and shapes",
    "The quick brown fox jumps over the lazy dog. 0123456789 .,:;!?'\"()",
    "Ünïcödé: café, naïve, 東京, 😀 emoji and accents",
]


@lru_cache(maxsize=None)
def tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained on a small corpus, serialised as tokenizer.json.

    Special tokens come first in the vocabulary, so their ids (0..5) differ from the real ones.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def token_id(token: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json()).token_to_id(token)


def placeholder_ids(folder: str | Path) -> list[int]:
    """The visual placeholder tokens of checkpoint `folder` (its config's image and video ids): vl3
    never draws them, so a reference's generate() runs with them suppressed (`suppress_tokens`) for
    a like-for-like comparison."""
    from vl3cli.config import ModelConfig

    config = ModelConfig.from_dir(Path(folder))
    return sorted({config.image_token_id, config.video_token_id})


def hf_config(tied: bool, vision: dict | None = None) -> dict:
    text = dict(TEXT, model_type="qwen2", tie_word_embeddings=tied)
    return {
        "architectures": ["VideoLlama3ForConditionalGeneration"],
        "model_type": "video_llama_3",
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "tie_word_embeddings": tied,
        "text_config": text,
        "vision_config": dict(vision or VISION, model_type="video_llama_3_vision"),
    }


def original_config(tied: bool, vision: dict | None = None) -> dict:
    return dict(
        TEXT,
        architectures=["Videollama3Qwen2ForCausalLM"],
        model_type="videollama3_qwen2",
        image_token_index=token_id("<image>"),
        tie_word_embeddings=tied,
        use_token_compression=True,
        mm_projector_type="mlp2x_gelu",
        vision_encoder=None,
        vision_encoder_config=dict(vision or VISION, model_type="videollama3_vision_encoder"),
        an_unknown_field_that_must_be_ignored=[1, 2, 3],
    )


def hf_state_dict(seed: int, tied: bool, vision: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights under transformers' HF-format key names, with a non-trivial scale."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    config = VideoLlama3Config(**hf_config(tied, vision))
    with torch.device("meta"):
        model = VideoLlama3ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(p.shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            value = 0.3 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
            value = torch.randn(p.shape, generator=gen) * (2.0 / math.sqrt(fan_in))
        state[name] = value.contiguous()
    return state


def to_original_key(key: str) -> str:
    """HF-format key -> the key the original-format checkpoint stores for the same tensor."""
    for hf, orig in (
        ("model.vision_model.", "model.vision_encoder."),
        ("model.projector.", "model.mm_projector."),
        ("model.language_model.", "model."),
    ):
        if key.startswith(hf):
            return orig + key[len(hf) :]
    return key


def _write_weights(folder: Path, state: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    shards = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_checkpoint(
    folder: str | Path, fmt: str = "hf", tied: bool = True, sharded: bool = False, seed: int = 0,
    vision: dict | None = None,
) -> Path:
    """Write a complete tiny checkpoint of format `fmt` into `folder` and return it (`vision`: other
    vision-tower dimensions than `VISION`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(seed, tied, vision)
    if fmt == "hf":
        config = hf_config(tied, vision)
        (folder / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "VideoLlama3ImageProcessor",
                    "min_pixels": 3136,
                    "max_pixels": 3211264,
                    "patch_size": 14,
                    "merge_size": 1,
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                }
            )
        )
        (folder / "video_preprocessor_config.json").write_text(
            json.dumps(
                {
                    "merge_size": 2,
                    "min_pixels": 12544,
                    "max_pixels": 12845056,
                    "min_frames": 4,
                    "max_frames": 180,
                    "fps": 1,
                    "use_token_compression": True,
                    "patch_size": 14,
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                }
            )
        )
    elif fmt == "original":
        config = original_config(tied, vision)
        state = {to_original_key(k): v for k, v in state.items()}
        (folder / "processor_config.json").write_text(
            json.dumps({"fps": 1, "max_frames": 128, "image_merge_size": 1, "video_merge_size": 2})
        )
        (folder / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5],
                    "patch_size": 14,
                    "min_tokens": 16,
                    "max_tokens": 16384,
                    "resample": 3,
                }
            )
        )
        # Remote code ships with original-format checkpoints; vl3 must never run it.
        (folder / "modeling_videollama3.py").write_text("raise SystemExit('remote code must never run')\n")
    else:
        raise ValueError(fmt)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    eos = [token_id("<|im_end|>"), token_id("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": True}))
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 32768})
    )
    _write_weights(folder, state, sharded)
    return folder


def hf_reference(folder: str | Path, attn: str = "sdpa"):
    """transformers' VideoLlama3ForConditionalGeneration on an HF-format folder, float32, eval."""
    from transformers import VideoLlama3ForConditionalGeneration

    model = VideoLlama3ForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation=attn
    )
    return model.eval()
