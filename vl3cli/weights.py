"""Checkpoint weights: safetensors shards -> a state dict under vl3's own parameter names.

- Only safetensors are read. `.bin` / `.pt` / `.pth` / `.ckpt` (pickle) are refused, never
  unpickled; `*.py` files in a checkpoint are ignored.
- `rename_key(key, fmt)` is the one pure function per format that maps a checkpoint key to the
  name of the parameter in `vl3cli.model.VideoLlama3` (None = not a weight of ours).
- Tensors are read one at a time straight into the requested dtype and device, so the model
  (built on the meta device) is materialised without a second copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# checkpoint prefix -> vl3 prefix, tried in order (the first that matches wins).
_PREFIXES = {
    "hf": (
        ("model.vision_model.", "vision."),
        ("model.projector.", "projector."),
        ("model.language_model.", "language."),
        ("lm_head.", "lm_head."),
    ),
    "original": (
        ("model.vision_encoder.", "vision."),
        ("model.mm_projector.", "projector."),
        ("model.", "language."),
        ("lm_head.", "lm_head."),
    ),
}


def rename_key(key: str, fmt: str) -> str | None:
    """Checkpoint key -> vl3 parameter name, or None for keys that are not ours."""
    for src, dst in _PREFIXES[fmt]:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def checkpoint_key(name: str, fmt: str) -> str:
    """The inverse of `rename_key`: how the checkpoint of format `fmt` spells parameter `name`."""
    for src, dst in _PREFIXES[fmt]:
        if name.startswith(dst):
            return src + name[len(dst) :]
    return name


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order; refuses pickle-only folders."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"cannot read {index}: {exc}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{path}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); vl3 loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise WeightsError(f"{path} holds no *.safetensors weights")


def iter_tensors(
    files: list[Path], fmt: str, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (vl3 name, checkpoint key, tensor) for every weight, converted on the fly.

    Floating-point tensors become `dtype`; each tensor is read and moved on its own, so peak
    host memory stays at about one tensor beyond the model itself.
    """
    from safetensors import safe_open

    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"cannot read {file}: {exc}") from None
        with handle:
            for key in handle.keys():
                name = rename_key(key, fmt)
                if name is None:
                    yield key, key, None
                    continue
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(device=device, dtype=dtype)
                else:
                    tensor = tensor.to(device=device)
                yield name, key, tensor


def load_into(
    model: torch.nn.Module, path: Path, fmt: str, device: torch.device, dtype: torch.dtype, tie_lm_head: bool
) -> None:
    """Fill a meta-device `model` with the checkpoint's weights (assign, no second copy).

    Raises WeightsError naming every missing, unexpected or wrongly shaped key.
    """
    expected = {name: p for name, p in model.named_parameters()}
    shapes = {name: tuple(p.shape) for name, p in expected.items()}
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    wrong_names: set[str] = set()
    for name, key, tensor in iter_tensors(weight_files(path), fmt, device, dtype):
        if tensor is None or name not in shapes:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != shapes[name]:
            wrong_shape.append(f"{key} {tuple(tensor.shape)} (expected {shapes[name]})")
            wrong_names.add(name)
            continue
        loaded[name] = tensor
    if tie_lm_head and "lm_head.weight" in shapes and "lm_head.weight" not in loaded:
        embed = loaded.get("language.embed_tokens.weight")
        if embed is not None:
            loaded["lm_head.weight"] = embed
    missing = sorted(set(shapes) - set(loaded) - wrong_names)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_names([checkpoint_key(n, fmt) for n in missing])}")
    if wrong_shape:
        problems.append(f"wrong shape: {_names(wrong_shape)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    if problems:
        raise WeightsError(f"{path}: the weights do not match config.json: " + "; ".join(problems))
    model.load_state_dict(loaded, strict=True, assign=True)


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
