"""Qwen2 decoder: prefill over a prompt chunk, and a static single-token decode step.

Stock Qwen2: RMSNorm, grouped-query attention with biases on q/k/v only, SwiGLU MLP, 1-D RoPE
(rotate-half). The model takes embeddings (visual features already in place). q/k/v and
gate/up are fused into one matrix each (`qkv_proj`, `gate_up_proj`); the loader fills them from
the checkpoint's separate tensors (`parts` names them, in order).

`KVCache` is the one record of what each row holds: static buffers (layers, B, kv_heads, T, d)
allocated once, `lengths` on the device (mirrored on the host for scheduling), and the only
ways lengths change are `set_row` (a prefill) and `advance` (one decode step). A decode step
(`Qwen2Model.decode_step`) is pure tensor code: RoPE from a precomputed table gathered at each
row's length, one mask per step over the slots in use, the new keys written in place at each
row's length, logits into a preallocated buffer. Given no span it attends over all T slots, and
every shape is fixed: it can be traced as one graph and, on CUDA, captured once per batch bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


@dataclass
class KVCache:
    k: torch.Tensor  # (layers, B, kv_heads, T, d)
    v: torch.Tensor
    lengths: torch.Tensor  # (B,) long: valid positions per row; a new token goes to slot lengths[b]
    active: torch.Tensor  # (B,) long: 1 for rows that advance in a decode step, 0 for free rows
    host_lengths: np.ndarray  # (B,) int64: lengths, readable without a device sync
    host_active: np.ndarray  # (B,) bool
    row_index: torch.Tensor  # (B,) arange, and slot_index (T,) arange: built once, not per layer or step
    slot_index: torch.Tensor

    @classmethod
    def allocate(cls, config: TextConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
            np.zeros(batch, dtype=np.int64),
            np.zeros(batch, dtype=bool),
            torch.arange(batch, device=device),
            torch.arange(max_len, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def rows(self, count: int) -> KVCache:
        """Rows 0..count-1 as a view: same storage, so writes (and graphs captured on it) land here."""
        return KVCache(self.k[:, :count], self.v[:, :count], self.lengths[:count], self.active[:count],
                       self.host_lengths[:count], self.host_active[:count], self.row_index[:count], self.slot_index)

    def set_row(self, row: int, length: int, active: bool = True) -> None:
        """Row `row` now holds `length` valid positions (after a prefill), and decodes when active."""
        self.lengths[row] = length
        self.active[row] = int(active)
        self.host_lengths[row] = length
        self.host_active[row] = active

    def advance(self) -> None:
        """After a decode step: every active row holds one more position."""
        self.lengths += self.active
        self.host_lengths += self.host_active

    def write(self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values (kv, n, d) of one row's chunk into slots start..start+n-1 of `layer`."""
        n = k.shape[-2]
        self.k[layer, row, :, start : start + n] = k
        self.v[layer, row, :, start : start + n] = v

    def slots(self) -> torch.Tensor:
        """(B,) the slot each row's next token goes to: lengths[b] (kept inside the buffers for free rows)."""
        return self.lengths.clamp(max=self.max_len - 1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Decode: each row's new key/value (B, kv, 1, d) into its slot (`slots()`, once per step)."""
        # (B, kv, T, d)[rows, :, slots] selects (B, kv, d): one slot per row.
        self.k[layer][self.row_index, :, slots] = k[:, :, 0]
        self.v[layer][self.row_index, :, slots] = v[:, :, 0]

    def mask(self, span: int | None = None) -> torch.Tensor:
        """(B, 1, 1, S) additive over the first S = `span` slots (all T when None), in the cache's
        dtype: 0 where slot j is visible to row b's new token (j <= lengths[b]), -inf elsewhere.
        Additive once per step: a boolean mask would be converted to this by every layer's
        attention call, with the same result."""
        visible = (self.slot_index[None, :span] <= self.lengths[:, None])[:, None, None, :]
        return torch.zeros(visible.shape, dtype=self.k.dtype, device=self.k.device).masked_fill_(~visible, float("-inf"))

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (keys, values, length, activity) over row `dst`."""
        n = int(self.host_lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.set_row(dst, n, bool(self.host_active[src]))


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, with rotate_half(x) = (-x2, x1): the halves swapped by one roll,
    and the sign in the table (`signed_sin` = (-sin, sin) per half). Equal to the usual form bit for
    bit: (-a) b and a (-b) round alike."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class FusedLinear(nn.Linear):
    """A linear layer whose output rows are several checkpoint tensors stacked (`parts`: name, rows)."""

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool):
        super().__init__(in_features, sum(rows for _, rows in parts), bias=bias)
        self.parts = parts


@dataclass
class Pass:
    """What every layer of one forward pass shares.

    Prefill (`start` is an int): one cache row, a chunk of L tokens at slots start..start+L-1;
    `mask` (1, 1, L, start+L) says which slots each query sees, None = causal over a fresh row.
    Decode (`start` is None): every row of `cache`, one token each at slot lengths[b];
    `mask` (B, 1, 1, S), additive, from `KVCache.mask`: the step attends over the first S slots.
    """

    cos: torch.Tensor  # (B, 1, L, d)
    sin: torch.Tensor  # signed, see apply_rope
    cache: KVCache
    mask: torch.Tensor | None
    row: int = 0
    start: int | None = None
    slots: torch.Tensor | None = None  # decode: (B,) where each row's new key goes


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.qkv_proj = FusedLinear(d, (("q_proj", h * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)), bias=True)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x: torch.Tensor, p: Pass, layer: int, keep: int | None = None) -> torch.Tensor:
        """Attention output of every position of `x`, or (prefill, `keep` set) of its last `keep`
        positions only; the keys and values of every position go into the cache either way."""
        b, n, _ = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv_proj(x).split([(h + kv) * hd, kv * hd], dim=-1)
        qk = apply_rope(qk.view(b, n, h + kv, hd).transpose(1, 2), p.cos, p.sin)  # queries and keys at once
        q, k = qk[:, :h], qk[:, h:]  # (B, H, L, d), (B, kv, L, d)
        v = v.view(b, n, kv, hd).transpose(1, 2)
        if keep is not None and keep < n:
            return self._last_queries(q, k, v, p, layer, keep)
        if p.start is None:
            p.cache.append(layer, k, v, p.slots)
            # The query heads that share a KV head form one block of G queries: no KV repeat, and
            # SDPA's own kernel (fp32 softmax, scale inside) as in prefill.
            span = p.mask.shape[-1]  # the slots in use, or all T
            out = F.scaled_dot_product_attention(
                q.reshape(b, kv, h // kv, hd), p.cache.k[layer, :, :, :span], p.cache.v[layer, :, :, :span],
                attn_mask=p.mask,
            )  # (B, kv, G, d)
        elif p.mask is None:
            # A fresh row: the keys are exactly this chunk, laid down from slot 0.
            p.cache.write(layer, p.row, 0, k[0], v[0])
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=True)
        else:
            p.cache.write(layer, p.row, p.start, k[0], v[0])
            end = p.start + n
            keys, values = p.cache.k[layer, p.row : p.row + 1, :, :end], p.cache.v[layer, p.row : p.row + 1, :, :end]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=p.mask, enable_gqa=True)
        return self.output(out, b, n)

    def output(self, out: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """o_proj over the heads' outputs (B, H, L, d), or decode's (B, kv, G, d) with L = 1."""
        h, hd = self.num_heads, self.head_dim
        return self.o_proj(out.reshape(b, h, n, hd).transpose(1, 2).reshape(b, n, h * hd))

    def _last_queries(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Pass, layer: int, keep: int
    ) -> torch.Tensor:
        """Prefill of one row where only the last `keep` positions' outputs are wanted: every key
        and value is cached, and only those queries attend (the last one sees every key: no mask)."""
        start, n = p.start or 0, q.shape[2]
        p.cache.write(layer, p.row, start, k[0], v[0])
        end = start + n
        keys, values = p.cache.k[layer, p.row : p.row + 1, :, :end], p.cache.v[layer, p.row : p.row + 1, :, :end]
        mask = None
        if keep > 1:
            slots = torch.arange(end, device=q.device)
            mask = (slots[None, :] <= slots[end - keep :, None])[None, None]  # (1, 1, keep, end)
        out = F.scaled_dot_product_attention(q[:, :, n - keep :], keys, values, attn_mask=mask, enable_gqa=True)
        return self.output(out, 1, keep)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = FusedLinear(d, (("gate_proj", i), ("up_proj", i)), bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, p: Pass, layer: int, keep: int | None = None) -> torch.Tensor:
        """The layer over `x` (B, L, D); with `keep`, the output of its last `keep` positions only
        (the keys and values of all of them are cached)."""
        attended = self.self_attn(self.input_layernorm(x), p, layer, keep)
        x = (x if keep is None else x[:, x.shape[1] - keep :]) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_cos: torch.Tensor | None = None  # (max_position_embeddings, d), see init_rope
        self.rope_sin: torch.Tensor | None = None  # signed: (-sin, sin) per half

    def init_rope(self, device, dtype) -> None:
        """The cos and signed sin (see apply_rope) tables of every position, computed in fp32 then
        cast (as transformers does)."""
        d, n = self.config.head_dim, self.config.max_position_embeddings
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))
        freqs = torch.arange(n, device=device).float()[:, None] * inv_freq  # (n, d/2): each angle once
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        self.rope_cos, self.rope_sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (n, d)

    def prefill(
        self, embeds: torch.Tensor, cache: KVCache, row: int, start: int, keep: int | None = None
    ) -> torch.Tensor:
        """Run one row's chunk `embeds` (L, D) at positions start..start+L-1; final hidden states (L, D),
        or of the last `keep` >= 1 positions only (keep, D). With `keep`, the last layer runs its
        attention output and MLP for those positions alone: nothing after it reads the others."""
        n = embeds.shape[0]
        cos, sin = self.rope_cos[start : start + n][None, None], self.rope_sin[start : start + n][None, None]
        mask = None
        if start:
            slots = torch.arange(start + n, device=embeds.device)
            queries = torch.arange(start, start + n, device=embeds.device)
            mask = (slots[None, :] <= queries[:, None])[None, None]  # (1, 1, L, start+L)
        p = Pass(cos, sin, cache, mask, row=row, start=start)
        x = embeds[None]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, p, i, keep if i == last else None)
        return self.norm(x[0])

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, span: int | None = None) -> torch.Tensor:
        """One token (B,) for every row of `cache`, entering at slot lengths[b]; hidden states (B, D).

        Pure tensor code (no host reads); the caller then calls `cache.advance()`. With `span`
        (the longest active row's length + 1), attention reads only the slots in use, not all T:
        the same values (the others are masked), and a step's attention costs what the rows hold,
        not what the cache could (2B geometry, 2-core Xeon: 26 against 88 us a layer for 290 of
        1300 slots). Without it every shape is fixed, as a captured graph needs.
        """
        x = self.embed_tokens(tokens)[:, None]  # (B, 1, D)
        positions = cache.lengths.clamp(max=self.rope_cos.shape[0] - 1)
        cos, sin = self.rope_cos[positions][:, None, None], self.rope_sin[positions][:, None, None]  # (B, 1, 1, d)
        p = Pass(cos, sin, cache, cache.mask(span), slots=cache.slots())
        for i, layer in enumerate(self.layers):
            x = layer(x, p, i)
        return self.norm(x[:, 0])
