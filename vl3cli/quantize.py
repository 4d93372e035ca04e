"""Weight-only int8 / int4 quantization: packed weights and their linear layer.

`--quantize int8|int4` applies to the language model's linear layers (qkv, o, gate/up, down) and
to the output head `lm_head` (with tied embeddings the head gets its own quantized copy, while
the token embeddings stay in the compute dtype); the vision tower, the projector and the norms
are never quantized. The loader fills a `QuantizedLinear` a block of rows at a time
(`fill_rows`), so neither a full-precision copy of the model nor of one large matrix is held.

- int8: one symmetric scale per output channel: w ~ q * s, q in [-127, 127], s = max|w_row| / 127.
- int4: per output channel and group of `group_size` input columns (128, else 64 or 32),
  asymmetric: w ~ (q - 8) * s + z, q in [0, 15], s = (max - min) / 15, z = min + 8 s (the
  convention of PyTorch's int4 kernels). Two 4-bit values per byte.
Scales (and zero points) are rounded to the compute dtype before q is computed, so q is chosen
against the scale the kernels will actually use.

Kernels (`kernel`):
- "onednn", int8 on a CPU with VNNI: oneDNN's integer matrix product on the weight prepacked at
  load (`torch.ops.onednn.qlinear_*`). That kernel multiplies int8 weights by 8-bit activations,
  so each row of activations x is written as two 8-bit digits of a 16-bit fixed-point number,
  X = round(x / s) = d0 + 256 d1 with s = max|x| / ~2^15 per row; the two digit rows go through
  one product (int32 sums, exact) and y = s w_scale (Y0 + 256 Y1). (A decode step's single row
  takes a shorter path: its max|x| is read on the host and given to the kernel as the activation
  scale, four fewer operations per layer, about 3% of an int8 step.) An element's rounding is at
  most 3/4 s: below bf16's own rounding for every element within 2^6 of its row's largest, and
  for the smaller ones at most 2^-15 of that largest, so a product's error from it is bounded by
  3/4 s sum|w| (tested) and small against the weights' own rounding. Measured at the 2B geometry
  (bench_quality.py), the logits differ from those of `_weight_int8pack_mm` (bf16 activations,
  unrounded) no more than those of a 24-bit (three-digit) version did (norm of the difference 47.7
  against 46.7, where each differs from the unquantized model's by 128). On the 2-core AVX512-BF16
  Xeon a decode step's int8 products took 91 ms with two digits and 105 with three (the packed
  bf16 ones 152-161; `_weight_int8pack_mm` was already 1.3x slower than three digits), and
  prefill is faster than bf16's too (integer products at twice the rate of bf16 ones).
- "packed" on CPU: PyTorch's own kernels for packed weights, `torch._weight_int8pack_mm` (int8
  where "onednn" is not available) and `torch._weight_int4pack_mm_for_cpu` (int4; torchao's CPU
  int4 layout is built on the same kernel, so vl3 does without that dependency).
- "generic", on every other device and for shapes the packed kernels refuse, dequantizes the
  layer's weight to the compute dtype right before its matmul: correct anywhere, and the memory
  saving stays (only one layer's weight is ever expanded). Fast CUDA / MPS kernels belong to the
  GPU work.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

MODES = ("int8", "int4")
INT4_GROUPS = (128, 64, 32)
INT4_BLOCK = 64  # rows of one block of the CPU int4 kernel's layout: each block is laid out on its own
PACK_ROWS = 4096  # rows repacked at a time by finish() (a multiple of INT4_BLOCK)
QUANTIZE_ELEMENTS = 1 << 18  # weights quantized at a time: their float32 temporaries stay in the CPU's cache
# (3x faster than whole 32 MB blocks on a 2-core Xeon, the same values)


DIGITS_OFFSET = 128 * (1 + 256)  # X + this = the two digits as unsigned bytes (zero point 128 each)
DIGITS_MAX = (1 << 16) - 1 - DIGITS_OFFSET  # the largest |X| whose two digits fit: 32,639, about 2^15
DIGITS_STEPS = DIGITS_MAX - 2  # max|x| maps to this: its quotient may round a step above, never past DIGITS_MAX
_HALF_OFFSET = torch.tensor(DIGITS_OFFSET + 0.5)
_HALF_OFFSET_ROW = torch.tensor([DIGITS_OFFSET + 0.5])  # one dimension: float32 wins type promotion over bf16


def int4_group_size(in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def check_int4(text) -> None:
    """UsageError unless every layer int4 applies to (`text`: the language model's TextConfig) has
    in_features divisible by the smallest group: hidden_size (q/k/v, o, gate/up, head) and
    intermediate_size (down). Checked from the config, before any weight is read."""
    odd = {name: n for name, n in (("hidden_size", text.hidden_size), ("intermediate_size", text.intermediate_size))
           if int4_group_size(n) is None}  # fmt: skip
    if odd:
        sizes = ", ".join(f"{name} {n}" for name, n in odd.items())
        raise UsageError(f"--quantize int4 needs the language model's dimensions divisible by {INT4_GROUPS[-1]} "
                         f"(this model has {sizes}); use --quantize int8")


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q int8 (N, K), scales (N,) in `dtype`."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
    q = (w / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype,
                  qdtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N, K) float -> q (N, K) in 0..15 as `qdtype`, scales_and_zeros (K/group, N, 2) in `dtype`."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, K/g); 7x faster than aminmax over groups of 128
    scales = ((hi - lo) / 15).to(dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a constant group: any scale
    zeros = (lo + 8 * scales.float()).to(dtype)
    q = (wg - zeros.float()[..., None]).div_(scales.float()[..., None]).add_(8).round_().clamp_(0, 15)
    return q.to(qdtype).view(n, k), torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, even columns in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def dequantize(mode: str, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in `dtype` that plain-layout quantized storage stands for."""
    if mode == "int8":
        return qweight.to(dtype) * scales[:, None].to(dtype)
    q = unpack_int4(qweight)
    n, k = q.shape
    groups = scales.shape[0]
    s, z = scales.to(dtype).permute(1, 0, 2).unbind(-1)  # (N, K/g) each
    w = (q.view(n, groups, k // groups).to(dtype) - 8) * s[..., None] + z[..., None]
    return w.view(n, k)


@cache
def onednn_int8() -> bool:
    """Whether oneDNN's int8 product is available here and exact over the full 8-bit ranges.

    Checked by running it: without VNNI, x86 int8 kernels may saturate 16-bit partial sums."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return False
    try:
        if not torch.cpu._is_vnni_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (48, 256), dtype=torch.int8, generator=gen)
        w[0], w[1] = 127, -127  # the largest sums of both signs
        x = torch.randint(0, 256, (5, 256), dtype=torch.uint8, generator=gen)
        x[0], x[1] = 255, 0
        with torch.inference_mode():
            y = _qlinear(x, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(48), torch.zeros(48, dtype=torch.long))
        return torch.equal(y.double(), (x.double() - 128) @ w.double().T)
    except (AttributeError, RuntimeError):
        return False


def _qlinear(qx: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor, w_zeros: torch.Tensor,
             x_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """oneDNN: x_scale (qx - 128) @ W^T * w_scales, qx uint8 (M, K), as float32 (M, N)."""
    return torch.ops.onednn.qlinear_pointwise(qx, x_scale, 128, packed, w_scales, w_zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")  # fmt: skip


def activation_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> the digits (2M, K) uint8 (rows 0..M-1 the lower, zero point 128) and each
    row's max|x| as float32 (M, 1) (1e-30 for a zero row): with s = max|x| / DIGITS_STEPS,
    x ~ s * (d0 + 256 d1), |x - s X| <= 3/4 s. For one row the digits are a strided view."""
    m, k = x.shape
    top = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-30)
    # X + DIGITS_OFFSET = floor(DIGITS_STEPS x / max|x| + DIGITS_OFFSET + 1/2), in float32 (positive,
    # below 2^16, so converting to int32 floors it): two roundings of at most 2^-9 each, x never written
    whole = torch.addcdiv(_HALF_OFFSET, x, top, value=DIGITS_STEPS).to(torch.int32)
    return _digit_rows(whole), top


def _row_runs(blocks: list[int], size: int, most: int, rows: int) -> list[tuple[int, int]]:
    """Sorted block numbers -> row ranges (start, stop) of consecutive blocks, at most `most` rows
    each (a multiple of `size`), the last one ending at `rows`: [0, 1, 2, 5], 64 -> (0, 192), (320, 384)."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        start, stop = b * size, min(rows, (b + 1) * size)
        if runs and runs[-1][1] == start and stop - runs[-1][0] <= most:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs


def _digit_rows(whole: torch.Tensor) -> torch.Tensor:
    """(M, K) int32 X + DIGITS_OFFSET -> its two low bytes as rows (2M, K) uint8, the lower first."""
    m, k = whole.shape
    return whole.view(torch.uint8).as_strided((2, m, k), (1, 4 * k, 4)).reshape(2 * m, k)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 or int4 (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, mode: str, bias: bool, dtype: torch.dtype,
                 device: torch.device, kernel: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r}")
        self.in_features, self.out_features, self.mode, self.dtype = in_features, out_features, mode, dtype
        self.group_size = int4_group_size(in_features) if mode == "int4" else None
        if mode == "int4" and self.group_size is None:
            raise ValueError(f"int4 needs in_features divisible by 32 (got {in_features})")
        if kernel == "auto":
            cpu = torch.device(device).type == "cpu"
            kernel = "generic" if not (cpu and self.packable) else "onednn" if mode == "int8" and onednn_int8() else "packed"
        self.kernel = kernel
        n, k = out_features, in_features
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device), persistent=False)
            self.register_buffer("scales", torch.empty(n, dtype=dtype, device=device), persistent=False)
        else:
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device), persistent=False)
            self.register_buffer("scales", torch.empty(k // self.group_size, n, 2, dtype=dtype, device=device),
                                 persistent=False)
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype, device=device)) if bias else None
        self._packed = False
        self._plain_blocks: set[int] = set()  # int4 "packed": blocks still in the plain nibble layout

    @property
    def packable(self) -> bool:
        """Whether PyTorch's packed CPU kernel takes this shape."""
        return self.mode == "int8" or self.out_features % 16 == 0

    def fill_rows(self, start: int, w: torch.Tensor) -> None:
        """Quantize rows start..start+len(w)-1 of the full-precision weight into this layer (each row
        once, in any order, then `finish()`)."""
        step = max(1, QUANTIZE_ELEMENTS // self.in_features)
        if self._int4_packed:  # whole blocks of the kernel's layout, so that they are laid out as they come
            step = max(INT4_BLOCK, step - step % INT4_BLOCK)
        for first in range(0, w.shape[0], step):
            self._fill(start + first, w[first : first + step])

    def _fill(self, start: int, w: torch.Tensor) -> None:
        stop = start + w.shape[0]
        if self.mode == "int8":
            q, s = quantize_int8(w, self.dtype)
            self.qweight[start:stop] = q.to(self.qweight.device)
            self.scales[start:stop] = s.to(self.scales.device)
        elif self._int4_packed and start % INT4_BLOCK == 0 and (stop % INT4_BLOCK == 0 or stop == self.out_features):
            # whole blocks: straight into the CPU kernel's layout (no plain nibbles in between)
            q, sz = quantize_int4(w, self.group_size, self.dtype, torch.int32)
            self.qweight[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scales[:, start:stop] = sz
        else:
            q, sz = quantize_int4(w, self.group_size, self.dtype)
            self.qweight[start:stop] = pack_int4(q).to(self.qweight.device)
            self.scales[:, start:stop] = sz.to(self.scales.device)
            if self._int4_packed:  # laid out by finish()
                self._plain_blocks.update(range(start // INT4_BLOCK, (stop - 1) // INT4_BLOCK + 1))

    @property
    def _int4_packed(self) -> bool:
        return self.mode == "int4" and self.kernel == "packed"

    def finish(self) -> None:
        """After every row is filled: prepack int8 for oneDNN, or lay out for the CPU int4 kernel the
        blocks that were filled in pieces smaller than a block."""
        if self._packed:
            return
        if self.kernel == "onednn":
            # laid out for a decode step's two digit rows; any number of rows works
            self.qweight = torch.ops.onednn.qlinear_prepack(self.qweight, [2, self.in_features])  # the plain copy is freed
            self.scales = self.scales.float() / DIGITS_STEPS  # times a row's max|x| below: s w_scale
            self.register_buffer("zeros", torch.zeros(self.out_features, dtype=torch.long), persistent=False)
        elif self._int4_packed:
            for start, stop in _row_runs(sorted(self._plain_blocks), INT4_BLOCK, PACK_ROWS, self.out_features):
                block = unpack_int4(self.qweight[start:stop]).to(torch.int32)
                self.qweight[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(block, 1)
            self._plain_blocks.clear()
        else:
            return  # the plain layout is the kernel's
        self._packed = True

    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight in the compute dtype (generic kernel, tests)."""
        if self._packed:
            raise RuntimeError("the weight is in the CPU kernel's layout")
        return dequantize(self.mode, self.qweight, self.scales, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "generic":
            y = F.linear(x2, self.weight())
        elif self.kernel == "onednn":
            return self._onednn(x2).view(*shape[:-1], self.out_features)
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, self.group_size, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _onednn(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N): y = s w_scale (Y0 + 256 Y1) + b, summed in float32 and rounded once."""
        m = x2.shape[0]
        if m == 1:  # a decode step: max|x| read on the host is the kernel's activation scale (fewer operations)
            top = max(float(x2.abs().max()), 1e-30)
            whole = torch.add(_HALF_OFFSET_ROW, x2, alpha=DIGITS_STEPS / top).to(torch.int32)  # as activation_digits
            y2 = _qlinear(_digit_rows(whole), self.qweight, self.scales, self.zeros, x_scale=top)
            y = torch.add(y2[:1], y2[1:], alpha=256)
        else:
            digits, top = activation_digits(x2)
            y2 = _qlinear(digits, self.qweight, self.scales, self.zeros)  # (2M, N) float32, w_scale / DIGITS_STEPS in
            y = torch.add(y2[:m], y2[m:], alpha=256).mul_(top)
        if self.bias is not None:
            y.add_(self.bias)  # in float32
        return y.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, kernel={self.kernel}"


def quantizable(name: str, module: nn.Module) -> bool:
    """The layers `--quantize` applies to: the language model's linears and the output head."""
    return isinstance(module, nn.Linear) and (name.startswith("language.") or name == "lm_head")
