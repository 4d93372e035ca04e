"""Projector: vision features -> language-model embeddings (`mlp2x_gelu`).

`readout` = Linear(D_vision, D_text) -> GELU (exact erf) -> Linear(D_text, D_text); the indices
0 and 2 of the Sequential match the checkpoint keys `readout.0.*` and `readout.2.*`.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.readout = nn.Sequential(
            nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(x)
