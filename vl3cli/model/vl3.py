"""VideoLLaMA3: vision encoder + projector + Qwen2 decoder + lm_head.

`encode_pixels` turns patches into language-model embeddings, one per merged visual token;
`embed` places such features at the placeholder positions of a prompt; `logits` applies the
head. The decoder itself is driven by the engine (prefill / decode steps over a KV cache).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .language import Qwen2Model
from .projector import Projector
from .vision import VisionEncoder


class VideoLlama3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.projector = Projector(config.vision.hidden_size, config.text.hidden_size)
        self.language = Qwen2Model(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def encode_pixels(
        self,
        pixel_values: torch.Tensor,
        grids: list[tuple[int, int, int]],
        merge_sizes: list[int],
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """(N, 3*p*p) patches of the given grids -> (merged tokens, D_text) embeddings."""
        return self.projector(self.vision(pixel_values, grids, merge_sizes, backend))

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (L, D) of `input_ids` (L,) with `features` (P, D) at `positions` (P,)."""
        embeds = self.language.embed_tokens(input_ids)
        if features is not None and features.shape[0]:
            embeds.index_copy_(0, positions, features.to(embeds.dtype))
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
