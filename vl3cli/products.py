"""The language model's matrix products on a CPU that computes in bfloat16.

Two kernels for a bf16 weight W (out x in), both computing y = x W^T + b with bf16 values
multiplied exactly and summed in float32 (they differ only in the order of the sums):

- `PackedLinear`: W reordered once, at load, for oneDNN. The fastest way to read weights: a
  decode step (one row per sequence) streams every weight once and is bound by memory reads.
- `wide_product`: float32 products for many rows (a prefill, an encode). On CPUs whose bf16 dot
  product runs no faster than float32 multiply-adds (AVX512-BF16 without AMX: Intel Xeons issue
  `vdpbf16ps` on one port and float32 FMAs on two), a product of many rows is compute-bound and
  faster in float32: W is read from the mapped checkpoint 512 rows at a time, widened to float32
  (exact) and multiplied, and its pages are handed back as it goes (they stay in the page cache).
  2-core Xeon (AVX512-BF16, no AMX), 8960x1536: packed 41.0 ms against 28.4 ms for 256 rows,
  10.1 against 9.9 ms for 64, 4.9 against 8.4 ms for 32; so rows >= `WIDE_ROWS` go this way.

Which is faster depends on the CPU (AMX, or AMD's bf16 units, turn it around), so it is
measured once per process (`measured_faster`, about 50 ms) unless `VL3_FLOAT32_PRODUCTS` says
`on` or `off`. The language model reads the checkpoint's pages again on every long product, so
it only does so (`wide_language`) where memory holds the packed copy and the file's pages
together; the vision tower's weights are views of the file in any case (`WideLinear`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

PACK_BLOCK_BYTES = 64 << 20  # a larger weight is packed a block of rows at a time (PackedLinear)
WIDE_ROWS = 96  # products of at least this many rows run in float32 where that is faster
WIDE_BLOCK = 512  # rows of W widened at a time: 3 MB of float32 at in = 1536, within the cache
WIDE_MARGIN = 4 << 30  # memory left for everything else when the file's pages are kept (wide_language)
ENV = "VL3_FLOAT32_PRODUCTS"

# (first output row, the rows of W as a mapped bf16 view, release(first, stop) or None)
Source = tuple[int, torch.Tensor, Callable[[int, int], None] | None]


def wide_product(x2: torch.Tensor, sources: list[Source], out_features: int,
                 bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """(M, K) -> (M, N) in x2's dtype: y = x W^T + b with W's rows given by `sources`, computed in
    float32 a block of `WIDE_BLOCK` rows at a time; each block's pages handed back once used."""
    xf = x2.float()
    out = torch.empty(x2.shape[0], out_features, dtype=torch.float32, device=x2.device)
    for row, weight, release in sources:
        rows = weight.shape[0]
        for first in range(0, rows, WIDE_BLOCK):
            stop = min(first + WIDE_BLOCK, rows)
            torch.mm(xf, weight[first:stop].float().t(), out=out[:, row + first : row + stop])
            if release is not None:
                release(first, stop)
        if release is not None and rows > WIDE_BLOCK:
            release(0, rows)  # the pages that straddle two blocks
    if bias is not None:
        out.add_(bias)
    return out.to(x2.dtype)


class PackedLinear(nn.Module):
    """y = x W^T + b in bf16 with W reordered once, at load, for oneDNN (`torch.ops.mkldnn`).

    On a CPU with native bf16, PyTorch's plain bf16 matrix-vector product streams weights at about
    half the speed of oneDNN's with prepacked weights (2-core AVX512-BF16 Xeon: 11.5 against 18.7
    GB/s over 28 matrices of 17920x1536), and decoding reads every weight per token. The same
    arithmetic (bf16 products, fp32 accumulation); only the kernel and the weight's layout differ.
    The plain weight is not kept; where products of many rows run in float32 (`plain`, see the
    module docstring) they read its rows again from the mapped file.

    A weight read from the mapped file (`release` given) of more than `PACK_BLOCK_BYTES` (the
    output head: 467 MB at the 2B geometry, 1.1 GB at the 7B) is packed as several blocks of rows,
    and `release(first, stop)` is called once rows first..stop-1 are packed: the loader hands
    their mapped pages back, so loading holds one block of the plain weight, not all of it, next
    to the packed one (2B, bf16: the load's peak 0.4 GB lower). The blocks' products are
    concatenated: at the 2B geometry the same values as one block, 0.6 ms more per decode step
    (the head's product 17.2 against 16.6 ms, fastest of 40 steps; a step takes 130-140).
    """

    def __init__(self, linear: nn.Linear, release: Callable[[int, int], None] | None = None,
                 plain: list[Source] | None = None):  # fmt: skip
        super().__init__()
        self.plain = plain  # W's rows as views of the mapped file: products of many rows (wide_product)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        step = self.out_features  # one block, unless its rows come from the mapped file
        if release is not None:
            step = max(1, PACK_BLOCK_BYTES // (self.in_features * weight.element_size()))
        bounds = [*range(0, self.out_features, step), self.out_features]
        self.spans = list(zip(bounds, bounds[1:]))  # rows of each block
        for i, (first, stop) in enumerate(self.spans):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight[first:stop], 1)
            self.register_buffer(f"packed{i}", packed, persistent=False)
            if release is not None:
                release(first, stop)
        self.bias = linear.bias
        if hasattr(linear, "parts"):
            self.parts = linear.parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.plain is not None and x2.shape[0] >= WIDE_ROWS:
            y = wide_product(x2, self.plain, self.out_features, self.bias)
        elif len(self.spans) == 1:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed0, self.bias, "none", [], "")
        else:
            bias = [None if self.bias is None else self.bias[a:b] for a, b in self.spans]
            y = torch.cat([torch.ops.mkldnn._linear_pointwise(x2, getattr(self, f"packed{i}"), bias[i], "none", [], "")
                           for i in range(len(self.spans))], dim=-1)  # fmt: skip
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        wide = f", float32 for {WIDE_ROWS}+ rows" if self.plain is not None else ""
        return f"{self.in_features}, {self.out_features}, kernel=oneDNN packed bf16, blocks={len(self.spans)}{wide}"


def packs(device: torch.device, dtype: torch.dtype, quantize: str | None) -> bool:
    """Whether the language model's linears run as PackedLinear: bf16 on a CPU with native bf16."""
    if quantize or device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class WideLinear(nn.Linear):
    """nn.Linear over a bf16 weight whose products of `WIDE_ROWS` rows or more run in float32
    (`wide_product`): the vision tower and projector where that is faster (see the module docstring)."""

    @classmethod
    def of(cls, linear: nn.Linear) -> WideLinear:
        """The same parameters (no copy) in a WideLinear."""
        with torch.device("meta"):
            wide = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        wide.weight, wide.bias = linear.weight, linear.bias
        return wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < WIDE_ROWS * self.in_features or self.weight.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        y = wide_product(x.reshape(-1, self.in_features), [(0, self.weight, None)], self.out_features, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def widen(module: nn.Module) -> int:
    """Make every plain nn.Linear under `module` a WideLinear; returns how many."""
    names = [name for name, m in module.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, WideLinear.of(getattr(owner, child)))
    return len(names)


def setting() -> str:
    """`VL3_FLOAT32_PRODUCTS`: auto (the default: measured), on or off."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    value = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(value, value)
    if value not in ("auto", "on", "off"):
        raise UsageError(f"{ENV}={os.environ[ENV]!r} is not auto, on or off")
    return value


def float32_faster(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products of many rows run in float32 (`wide_product`) for bf16 weights on `device`."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    choice = setting()
    return choice == "on" or (choice == "auto" and measured_faster())


@cache
def measured_faster() -> bool:
    """Time one product of 256 rows by a 1536x1536 weight both ways (best of 4 after a warm-up)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return True  # no native bf16 product to beat
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 1536, generator=gen).to(torch.bfloat16)
    x = torch.randn(256, 1536, generator=gen).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    runs = (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            lambda: wide_product(x, [(0, weight, None)], 1536, None))  # fmt: skip
    best = [math.inf, math.inf]
    with torch.inference_mode():
        for round_ in range(5):  # alternating, the first round a warm-up: a busy moment slows both
            for i, run in enumerate(runs):
                start = time.perf_counter()
                run()
                if round_:
                    best[i] = min(best[i], time.perf_counter() - start)
    return best[1] < 0.85 * best[0]  # clearly faster: a tie keeps the packed kernel (no pages read again)


def wide_language(device: torch.device, dtype: torch.dtype, quantize: str | None, file_bytes: int) -> bool:
    """Whether the packed language model also multiplies many rows in float32, reading its weights
    again from the mapped files (`file_bytes` of them): where float32 is faster and memory holds
    the packed copy, the files' pages and `WIDE_MARGIN` besides (else a prefill might read the
    weights from disk). `VL3_FLOAT32_PRODUCTS=on` asks for it regardless of memory."""
    if not packs(device, dtype, quantize) or not float32_faster(device, dtype):
        return False
    return setting() == "on" or physical_memory() >= 2 * file_bytes + WIDE_MARGIN


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
