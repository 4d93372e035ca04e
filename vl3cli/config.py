"""Model configuration for both VideoLLaMA3 checkpoint formats.

`ModelConfig.from_dir(path)` reads `config.json` (and `generation_config.json` for the stop ids)
of either format and returns one normalised description of the network:

- HF format (`model_type: video_llama_3`): `text_config` (Qwen2) + `vision_config`,
  `image_token_id` / `video_token_id`. Fields transformers fills with defaults may be absent;
  the same defaults apply here.
- Original format (`model_type: videollama3_qwen2`): Qwen2 fields at top level,
  `vision_encoder_config`, one `image_token_index` used for images and video frames alike.

Unknown keys are ignored; anything that is not a VideoLLaMA3 config raises `ConfigError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

HF_MODEL_TYPE = "video_llama_3"
ORIGINAL_MODEL_TYPE = "videollama3_qwen2"


# RoPE tables hold a (positions, head_dim) cos and sin for every position, built at load: 2**20
# positions take 1 GiB in float32 at head_dim 128. That covers every Qwen2 context published (32768
# for VideoLLaMA3's LLMs, 1,010,000 for Qwen2.5-1M); a larger value is a broken config, not a model.
MAX_POSITIONS = 1 << 20


def _pick(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of `data` that are fields of dataclass `cls` (unknown keys dropped)."""
    names = {f.name for f in fields(cls) if f.init}
    return {k: v for k, v in data.items() if k in names and v is not None}


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    """data[key] as a JSON object ({} when absent)."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {key} must be a JSON object, not {type(value).__name__}")
    return value


def _check_fields(obj, where: str, ints: tuple[str, ...], floats: tuple[str, ...], strings: tuple[str, ...] = ()) -> None:
    """Integer fields are integers > 0 (not bools, not 4.0), float fields finite numbers > 0."""
    for name in ints:
        value = getattr(obj, name)
        if type(value) is not int or value <= 0:
            raise ConfigError(f"config.json: {where}{name} must be a positive integer, not {value!r}")
    for name in floats:
        value = getattr(obj, name)
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config.json: {where}{name} must be a positive number, not {value!r}")
    for name in strings:
        if not isinstance(getattr(obj, name), str):
            raise ConfigError(f"config.json: {where}{name} must be a string, not {getattr(obj, name)!r}")


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder. Defaults are Qwen2's, as transformers applies them."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _check_fields(self, "", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
                      ("rms_norm_eps", "rope_theta"), ("hidden_act",))  # fmt: skip
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(f"config.json: max_position_embeddings {self.max_position_embeddings} is above "
                              f"{MAX_POSITIONS}, more than any Qwen2 model has (the RoPE tables of every position "
                              "are built at load)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        data = dict(data)
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: RoPE scaling {rope!r} is not supported (expected a JSON object or null)")
        if data.get("rope_theta") is None and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"RoPE scaling {rope!r} is not supported")
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP-derived vision encoder. Defaults are transformers' `VideoLlama3VisionConfig`."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self):
        _check_fields(self, "vision ", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "patch_size"),
                      ("layer_norm_eps", "rope_theta"), ("hidden_act",))  # fmt: skip
        if self.num_channels != 3:
            raise ConfigError(f"config.json: vision num_channels must be 3 (vl3 feeds RGB), not {self.num_channels!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        data = dict(data)
        rope = data.get("rope_parameters") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            data.setdefault("rope_theta", rope["rope_theta"])
        if isinstance(data.get("patch_size"), (list, tuple)):
            sizes = set(data["patch_size"])
            if len(sizes) != 1:
                raise ConfigError(f"non-square patch_size {data['patch_size']} is not supported")
            data["patch_size"] = sizes.pop()
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to build and drive the network, whatever the format."""

    format: str  # "hf" | "original"
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # the dtype the weights are stored in, when config.json says

    @classmethod
    def from_dict(cls, data: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        model_type = data.get("model_type")
        text_data = _section(data, "text_config")
        if model_type == HF_MODEL_TYPE:
            text = TextConfig.from_dict(text_data)
            vision = VisionConfig.from_dict(_section(data, "vision_config"))
            image_id = data.get("image_token_id", 151655)
            video_id = data.get("video_token_id", 151656)
            # transformers: the top-level flag wins when set, else the text config's.
            tie = bool(data.get("tie_word_embeddings")) or bool(text_data.get("tie_word_embeddings"))
            fmt = "hf"
        elif model_type == ORIGINAL_MODEL_TYPE:
            text = TextConfig.from_dict(data)
            vision_data = data.get("vision_encoder_config")
            if not isinstance(vision_data, dict):
                raise ConfigError("config.json of a videollama3_qwen2 model has no 'vision_encoder_config'")
            vision = VisionConfig.from_dict(vision_data)
            image_id = data.get("image_token_index")
            if image_id is None:
                raise ConfigError("config.json of a videollama3_qwen2 model has no 'image_token_index'")
            video_id = image_id
            tie = bool(data.get("tie_word_embeddings", False))
            projector = data.get("mm_projector_type", "mlp2x_gelu")
            if projector != "mlp2x_gelu":
                raise ConfigError(f"mm_projector_type {projector!r} is not supported (expected 'mlp2x_gelu')")
            fmt = "original"
        else:
            raise ConfigError(
                f"model_type {model_type!r} is not a VideoLLaMA3 checkpoint "
                f"(expected {HF_MODEL_TYPE!r} or {ORIGINAL_MODEL_TYPE!r})"
            )
        eos = _eos_ids((generation or {}).get("eos_token_id"), "generation_config.json")
        if not eos:
            eos = _eos_ids(data.get("eos_token_id") or text_data.get("eos_token_id"), "config.json")
        stored = next((d[k] for d in (data, text_data) for k in ("torch_dtype", "dtype") if isinstance(d.get(k), str)), None)
        names = ("image_token_id", "video_token_id") if fmt == "hf" else ("image_token_index",) * 2
        for name, value in zip(names, (image_id, video_id)):
            if type(value) is not int or not 0 <= value < text.vocab_size:
                raise ConfigError(f"config.json: {name} {value!r} is not a token id of the vocabulary "
                                  f"(0..{text.vocab_size - 1})")
        return cls(fmt, text, vision, image_id, video_id, tie, eos, stored)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{path} has no config.json: not a model checkpoint folder")
        data = read_json(config_file)
        generation_file = path / "generation_config.json"
        generation = read_json(generation_file) if generation_file.is_file() else None
        return cls.from_dict(data, generation)


def _eos_ids(value: Any, file: str) -> tuple[int, ...]:
    """eos_token_id: an id or a list of ids (token ids are integers >= 0)."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(type(v) is int and v >= 0 for v in ids):
        raise ConfigError(f"{file}: eos_token_id must be a token id or a list of them, not {value!r}")
    return tuple(ids)


def read_json(path: Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON object from `path`, or `error` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
