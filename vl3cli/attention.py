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

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa")

# Largest number of attention scores one SDPA call may hold (64 Mi floats = 256 MB in fp32).
SCORE_BUDGET = 64 * 1024 * 1024


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def choose_vision_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The vision attention backend to use for `device`/`dtype` (`requested` = auto picks the best)."""
    fast_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if fast_ok and has_flash_attn():
            return "flash"
        if fast_ok and has_torch_varlen():
            return "varlen"
        return "sdpa"
    if requested in ("flash", "varlen") and not fast_ok:
        raise ValueError(f"attention backend {requested!r} needs CUDA and fp16/bf16")
    if requested == "flash" and not has_flash_attn():
        raise ValueError("attention backend 'flash' needs the flash-attn package (pip install 'vl3cli[flash]')")
    if requested == "varlen" and not has_torch_varlen():
        raise ValueError("attention backend 'varlen' needs a PyTorch with torch.nn.attention.varlen")
    return requested


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: list[int],
    backend: str,
    scale: float,
) -> torch.Tensor:
    """Attention of packed patches (N, heads, d) within segments of lengths `seqlens` -> (N, heads, d)."""
    if backend in ("flash", "varlen"):
        cu = torch.tensor([0, *seqlens], device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(seqlens)
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
