"""Qwen2 decoder with a preallocated KV cache.

Stock Qwen2: RMSNorm, grouped-query attention with biases on q/k/v only, SwiGLU MLP, 1-D RoPE
(rotate-half). The model takes embeddings (visual features already in place) and positions.

The KV cache (`KVCache`) holds fixed-shape buffers (layers x batch x kv_heads x max_len x d):
row b's keys live at positions 0..lengths[b]-1 and a new token of row b is written at
position lengths[b]. Decode steps therefore never reallocate, and rows of different lengths
share one batch (a key is visible to row b iff its position <= that row's current position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer (B, kv_heads, max_len, d)
    v: list[torch.Tensor]
    lengths: torch.Tensor  # (B,) long: valid positions per row
    host_lengths: list[int] = field(default_factory=list)  # the same on the host: no device sync to read it

    @classmethod
    def allocate(cls, config: TextConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            torch.zeros(batch, dtype=torch.long, device=device),
            [0] * batch,
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows start..stop-1: writes through it land in this cache (host_lengths excepted)."""
        return KVCache(
            [t[start:stop] for t in self.k],
            [t[start:stop] for t in self.v],
            self.lengths[start:stop],
            self.host_lengths[start:stop],
        )

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (keys, values, length) over row `dst`."""
        n = self.host_lengths[src]
        for t in (*self.k, *self.v):
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = self.lengths[src]
        self.host_lengths[dst] = n

    def grown(self, max_len: int) -> KVCache:
        """A copy with room for `max_len` positions per row."""
        if max_len <= self.max_len:
            return self
        def bigger(t):
            out = t.new_zeros(*t.shape[:2], max_len, t.shape[3])
            out[:, :, : self.max_len] = t
            return out
        return KVCache([bigger(t) for t in self.k], [bigger(t) for t in self.v], self.lengths, self.host_lengths)


class Embedding(nn.Module):
    """Token embeddings without nn.Embedding's random init (its normal_ on the meta device
    imports PyTorch's Python decompositions: over a second of start-up for nothing)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=True)
        self.k_proj = nn.Linear(d, kv * hd, bias=True)
        self.v_proj = nn.Linear(d, kv * hd, bias=True)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, write_pos, mask, attend_len) -> torch.Tensor:
        """x (B, L, D); cos/sin (B, 1, L, d); write_pos (B, L) cache slots for the new keys;
        mask (B, 1, L, attend_len) bool or None (None = plain causal over a fresh cache)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if mask is None:
            # Fresh single-row prefill: the keys are exactly this chunk, laid down from slot 0.
            k_cache[:, :, :n] = k
            v_cache[:, :, :n] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=True)
        else:
            rows = torch.arange(b, device=x.device)[:, None].expand(b, n)
            # (B, kv, L, d) -> (B, L, kv, d) to scatter each row's new keys at its own slots.
            k_cache.transpose(1, 2)[rows, write_pos] = k.transpose(1, 2)
            v_cache.transpose(1, 2)[rows, write_pos] = v.transpose(1, 2)
            keys, values = k_cache[:, :, :attend_len], v_cache[:, :, :attend_len]
            if n == 1:
                out = self._decode_attention(q, keys, values, mask)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _decode_attention(self, q, keys, values, mask) -> torch.Tensor:
        """One query per row: two small matmuls, several times faster than SDPA's kernels for q_len 1.

        q (B, H, 1, d); keys/values (B, kv, T, d); mask (B, 1, 1, T) -> (B, H, 1, d).
        """
        b, kv, t = keys.shape[0], self.num_kv_heads, keys.shape[2]
        groups = self.num_heads // kv
        qg = q.view(b, kv, groups, self.head_dim)  # the query heads that share each key head
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.head_dim**-0.5  # (B, kv, G, T)
        scores = scores.masked_fill(~mask.view(b, 1, 1, t), float("-inf"))
        probs = scores.softmax(dim=-1).to(values.dtype)
        return torch.matmul(probs, values).view(b, self.num_heads, 1, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Qwen2Model(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, L, d) in `dtype` for integer positions (B, L); computed in fp32."""
        d = self.config.head_dim
        inv_freq = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=positions.device) / d)
        )
        freqs = positions[..., None].float() * inv_freq  # (B, L, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        embeds: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        attend_len: int,
    ) -> torch.Tensor:
        """Run embeds (B, L, D) at `positions` (B, L), which are also their cache slots.

        `mask` (B, 1, L, attend_len) says which cache slots each query sees; None means a fresh
        single-row prefill (causal, slots 0..L-1). Returns the final hidden states (B, L, D).
        """
        cos, sin = self.rope(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            h = layer.self_attn(
                layer.input_layernorm(x), cos, sin, cache.k[i], cache.v[i], positions, mask, attend_len
            )
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)
