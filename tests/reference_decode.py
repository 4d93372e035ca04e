"""The language model's decode as vl3 computed it before the static step, kept as a test reference.

Separate q/k/v and gate/up matrices read straight from the checkpoint file (no vl3 loader),
cos/sin computed from the positions at every step, a mask and an `arange` built for each step
over the `max(lengths) + 1` slots in use, and decode attention as two matrix products with the
scale applied to the scores. Rows of different lengths share a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tiny


class ReferenceDecoder:
    def __init__(self, folder, rows: int, max_len: int):
        state = load_file(str(folder / "model.safetensors"))
        self.w = {k.removeprefix("model.language_model."): v for k, v in state.items()}
        self.head = state.get("lm_head.weight", self.w["embed_tokens.weight"])
        t = tiny.TEXT
        self.layers, self.heads, self.kv = t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"]
        self.d = t["hidden_size"] // self.heads
        self.eps, self.theta = t["rms_norm_eps"], t["rope_theta"]
        shape = (rows, self.kv, max_len, self.d)
        self.k = [torch.zeros(shape) for _ in range(self.layers)]
        self.v = [torch.zeros(shape) for _ in range(self.layers)]
        self.lengths = [0] * rows

    def norm(self, x, name):
        xf = x.float()
        return self.w[name] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def rope(self, positions):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, dtype=torch.float) / self.d))
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, d)
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def layer(self, i, x, cos, sin, attend):
        """attend(q, k, v, i) -> (B, H, L, d) stores the new keys and runs the attention."""
        p = f"layers.{i}."
        h = self.norm(x, p + "input_layernorm.weight")
        b, n, _ = h.shape

        def proj(name, heads):
            w = p + f"self_attn.{name}_proj."
            return F.linear(h, self.w[w + "weight"], self.w[w + "bias"]).view(b, n, heads, self.d).transpose(1, 2)

        q = self.rotate(proj("q", self.heads), cos, sin)
        k = self.rotate(proj("k", self.kv), cos, sin)
        out = attend(q, k, proj("v", self.kv), i)
        x = x + F.linear(out.transpose(1, 2).reshape(b, n, -1), self.w[p + "self_attn.o_proj.weight"])
        h = self.norm(x, p + "post_attention_layernorm.weight")
        gate = F.linear(h, self.w[p + "mlp.gate_proj.weight"])
        up = F.linear(h, self.w[p + "mlp.up_proj.weight"])
        return x + F.linear(F.silu(gate) * up, self.w[p + "mlp.down_proj.weight"])

    def embed(self, ids, features=None):
        x = F.embedding(torch.tensor(ids), self.w["embed_tokens.weight"])
        where = [i for i, t in enumerate(ids) if t in (tiny.token_id("<|image_pad|>"), tiny.token_id("<|video_pad|>"))]
        if where:
            x[where] = features
        return x

    def prefill(self, row, ids, features=None):
        n = len(ids)
        cos, sin = self.rope(torch.arange(n)[None])

        def attend(q, k, v, i):
            self.k[i][row, :, :n], self.v[i][row, :, :n] = k[0], v[0]
            return F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=True)

        x = self.embed(ids, features)[None]
        for i in range(self.layers):
            x = self.layer(i, x, cos, sin, attend)
        self.lengths[row] = n
        return F.linear(self.norm(x[0, -1], "norm.weight"), self.head)

    def decode(self, tokens):
        b = len(tokens)
        positions = torch.tensor(self.lengths[:b])[:, None]  # (B, 1)
        attend_len = max(self.lengths[:b]) + 1
        cos, sin = self.rope(positions)
        keys = torch.arange(attend_len)
        mask = (keys[None, :] <= positions)[:, None, None, :]  # (B, 1, 1, attend)
        rows = torch.arange(b)[:, None]

        def attend(q, k, v, i):
            self.k[i][:b].transpose(1, 2)[rows, positions] = k.transpose(1, 2)
            self.v[i][:b].transpose(1, 2)[rows, positions] = v.transpose(1, 2)
            keys_, values = self.k[i][:b, :, :attend_len], self.v[i][:b, :, :attend_len]
            qg = q.view(b, self.kv, self.heads // self.kv, self.d)
            scores = torch.matmul(qg, keys_.transpose(-1, -2)).float() * self.d**-0.5
            probs = scores.masked_fill(~mask.view(b, 1, 1, attend_len), float("-inf")).softmax(-1)
            return torch.matmul(probs, values).view(b, self.heads, 1, self.d)

        x = F.embedding(torch.tensor(tokens), self.w["embed_tokens.weight"])[:, None]
        for i in range(self.layers):
            x = self.layer(i, x, cos, sin, attend)
        self.lengths[:b] = [n + 1 for n in self.lengths[:b]]
        return F.linear(self.norm(x[:, 0], "norm.weight"), self.head)
