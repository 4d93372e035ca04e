"""Vision encoder (SigLIP-derived) with 2-D axial RoPE and per-frame attention.

Input: `pixel_values` (N, 3*p*p), the patches of one or more frames in merge-window order, and
the frames' grids. Output: one feature per merged token, (sum over frames of h/m * w/m, D).

- Patch embedding: Conv2d(3, D, p, stride p) on each 3 x p x p patch (no absolute positions).
- RoPE: each patch's (row, col) in its frame, rotate-half style, computed and applied in fp32.
- Attention is block-diagonal per frame (`vl3cli.attention.frame_attention`).
- Downsampling: per frame, bilinear resize from (h, w) to (h/m, w/m); for m = 2 this is the
  mean of each 2 x 2 window, for m = 1 the identity.
- `after_layer(i)`, when set, is called once layer i is done in a forward pass: the loader uses it
  to hand back the pages of weights that are views of the checkpoint file (`Engine.load`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Segments, frame_attention
from ..config import VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c, p = self.config.num_channels, self.config.patch_size
        weight = self.patch_embedding.weight
        # (N, 3*p*p) -> (N, 3, p, p) -> conv -> (N, D, 1, 1) -> (N, D)
        x = self.patch_embedding(pixel_values.to(weight.dtype).view(-1, c, p, p))
        return x.view(-1, self.config.hidden_size)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, cos, sin, segments: Segments, backend: str) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        # RoPE in fp32 whatever the model dtype; cos/sin are (N, 1, head_dim).
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(x.dtype)
        out = frame_attention(q, k, v, segments, backend, self.head_dim**-0.5)  # (N, H, d)
        return self.out_proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, segments: Segments, backend: str) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, segments, backend)
        return x + self.mlp(self.layer_norm2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = TransformerEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.after_layer: Callable[[int], None] | None = None

    def rope(self, grids: list[tuple[int, int, int]], merge_sizes: list[int], device) -> tuple:
        """cos, sin of shape (N, 1, head_dim) for the patches of `grids`, in merge-window order."""
        quarter = self.config.head_dim // 4
        inv_freq = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float, device=device) / (2 * quarter))
        )
        positions = []
        for (t, h, w), m in zip(grids, merge_sizes):
            rows = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            # (h/m, m, w/m, m) -> (h/m, w/m, m, m): merge-window row, col, then row/col inside the window.
            pos = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
            positions.append(pos.repeat(t, 1))
        pos = torch.cat(positions).float()  # (N, 2)
        freqs = pos[:, :, None] * inv_freq  # (N, 2, d/4)
        half = freqs.flatten(1)  # (N, d/2): row frequencies then column frequencies
        emb = torch.cat([half, half], dim=-1)[:, None, :]  # (N, 1, d)
        return emb.cos(), emb.sin()

    def forward(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        merge_sizes: list[int],
        backend: str = "sdpa",
    ) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        segments = Segments.build([h * w for t, h, w in grids for _ in range(t)], backend, x.device)
        cos, sin = self.rope(grids, merge_sizes, x.device)
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, cos, sin, segments, backend)
            if self.after_layer is not None:
                self.after_layer(i)
        x = self.post_layernorm(x)
        return downsample(x, grids, merge_sizes)


def downsample(x: torch.Tensor, grids: list[tuple[int, int, int]], merge_sizes: list[int]) -> torch.Tensor:
    """Per frame, bilinear resize (h, w) -> (h/m, w/m); rows come in and go out in merge-window order."""
    out = []
    start = 0
    for (t, h, w), m in zip(grids, merge_sizes):
        chunk = x[start : start + t * h * w]
        start += t * h * w
        if m == 1:
            out.append(chunk)
            continue
        c = chunk.shape[-1]
        # merge-window order (t, h/m, w/m, m, m, c) -> raster (t, c, h, w)
        img = chunk.view(t, h // m, w // m, m, m, c).permute(0, 5, 1, 3, 2, 4).reshape(t, c, h, w)
        small = F.interpolate(img, size=(h // m, w // m), mode="bilinear")  # (t, c, h/m, w/m)
        out.append(small.permute(0, 2, 3, 1).reshape(-1, c))
    return torch.cat(out)
