"""Attention backends, chosen at run time.

Vision attention is block-diagonal: a patch attends only to the patches of its own frame (or
image). Three ways to compute it, best first:

- `flash`  : flash-attn's `flash_attn_varlen_func` over the packed patches (CUDA, fp16/bf16,
             flash-attn installed);
- `varlen` : `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16, recent PyTorch);
- `sdpa`   : `scaled_dot_product_attention` with the frames of one run of same-sized frames
             (the frames of a video) stacked as the batch dimension.

None of them ever builds a mask across frames, so memory grows linearly with the number of
frames. The language model always uses SDPA (its shapes suit it on every device).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa")

# Largest number of attention scores one SDPA call may hold (64 Mi floats = 256 MB in fp32).
SCORE_BUDGET = 64 * 1024 * 1024


def has_flash_attn() -> bool:
    """flash-attn imports for real (a broken build or a CUDA mismatch fails here, not mid-run)."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 -- any failure to import means: not usable
        return False
    return True


def has_torch_varlen() -> bool:
    """PyTorch's varlen attention, in a version that takes `scale=` (older ones do not)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "scale" in inspect.signature(varlen_attn).parameters


def fast_kernels_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """flash / varlen kernels: CUDA with compute capability >= 8.0 (Ampere on), fp16 or bf16."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_vision_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The vision attention backend to use for `device`/`dtype` (`requested` = auto picks the best)."""
    fast_ok = fast_kernels_ok(device, dtype)
    if requested == "auto":
        if fast_ok and has_flash_attn():
            return "flash"
        if fast_ok and has_torch_varlen():
            return "varlen"
        return "sdpa"
    if requested in ("flash", "varlen") and not fast_ok:
        raise ValueError(f"attention backend {requested!r} needs a CUDA GPU of compute capability >= 8.0 and fp16/bf16")
    if requested == "flash" and not has_flash_attn():
        raise ValueError("attention backend 'flash' needs the flash-attn package (pip install 'vl3cli[flash]')")
    if requested == "varlen" and not has_torch_varlen():
        raise ValueError("attention backend 'varlen' needs a PyTorch whose torch.nn.attention.varlen takes scale=")
    return requested


@dataclass(frozen=True)
class Segments:
    """The frames of one vision call: their lengths, and for the varlen kernels the cumulative
    offsets on the device, built once per call (not per layer)."""

    lengths: list[int]
    cu: torch.Tensor | None = None
    longest: int = 0

    @classmethod
    def build(cls, lengths: list[int], backend: str, device) -> Segments:
        if backend not in ("flash", "varlen"):
            return cls(lengths)
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(lengths, cu.to(device, non_blocking=True), max(lengths))


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    backend: str,
    scale: float,
) -> torch.Tensor:
    """Attention of packed patches (N, heads, d) within each segment -> (N, heads, d)."""
    seqlens = segments.lengths
    if backend in ("flash", "varlen"):
        cu, longest = segments.cu, segments.longest
        if backend == "flash":
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale)
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)
    out = torch.empty_like(q)
    heads = q.shape[1]
    start = 0
    for length, count in _runs(seqlens):
        # Bound the score matrices of one call (frames x heads x length^2), whatever SDPA kernel runs.
        step = max(1, SCORE_BUDGET // (heads * length * length))
        for first in range(0, count, step):
            n = min(step, count - first)
            end = start + n * length
            # (n*length, H, d) -> (n, H, length, d): one batch entry per frame.
            qs, ks, vs = (x[start:end].view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
            out[start:end] = o.transpose(1, 2).reshape(end - start, *q.shape[1:])
            start = end
    return out


def _runs(seqlens: list[int]) -> list[tuple[int, int]]:
    """Consecutive equal lengths grouped: [4, 4, 4, 9] -> [(4, 3), (9, 1)]."""
    runs: list[tuple[int, int]] = []
    for n in seqlens:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs
