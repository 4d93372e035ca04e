"""Differential frame pruning ("similarity-based token pruning"): a pure keep-mask.

Contract: given a video's normalised ``pixel_values`` (rows in merge-window order, as
``preprocess.patchify`` lays them out) and its grid ``(t, h, w)`` in patches, return a bool
mask over its merged tokens, ``t * (h/m) * (w/m)`` long, in the same order:

- frame 0 is kept whole;
- for t >= 1 a merged token (its m*m patches, 3*p*p values each) is kept when
  ``mean(|x_t - x_{t-1}|) * 255 > threshold``;
- a frame with nothing kept keeps its first ``min_tokens`` tokens (1 by default);
- a one-frame video keeps everything.

What transformers does (``VideoLlama3VideoProcessor._get_compression_mask``, v5.x), mirrored
op for op: it works on the *normalised* values (with mean = std = 0.5 they lie in
[-1, 1]), views them as ``(t, tokens, m*m*3*p*p)``, takes ``abs(x[1:] - x[:-1]).mean(-1) * 255``
in float32 and compares with ``> threshold``. So the factor 255 multiplies a difference of
normalised values, not of [0, 1] pixels: with std 0.5 the test reads
``mean |raw_t - raw_{t-1}| (in 0..255 units) * 2 > threshold``, i.e. the default 0.1 keeps a
token whose raw pixels moved by more than 0.05 grey levels on average -- any change at all
after 8-bit decoding, in practice. Identical tokens (static content) are always dropped.
Frames are processed one at a time so the memory stays one frame's worth; given uint8 patches and
their normalisation ``table``, each frame is normalised on the fly (to the very same values).
"""

from __future__ import annotations

import torch


def prune_mask(
    pixel_values: torch.Tensor,
    grid_thw: tuple[int, int, int],
    merge_size: int,
    threshold: float = 0.1,
    min_tokens: int = 1,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask (bool, ``t * (h/m) * (w/m)``) over the merged tokens of one video.

    ``pixel_values`` are normalised float values, or uint8 patches when ``table`` is given.
    """
    from .preprocess import normalise  # preprocess imports this module
    t, h, w = (int(v) for v in grid_thw)
    tokens = (h // merge_size) * (w // merge_size)
    keep = torch.ones((t, tokens), dtype=torch.bool)
    if t <= 1:
        return keep.flatten()
    frames = pixel_values.view(t, tokens, -1)  # (t, tokens, m*m*3*p*p)

    def frame(i: int) -> torch.Tensor:  # uint8: normalised patch by patch (each row is 3*p*p channel-first)
        if table is None:
            return frames[i]
        return normalise(frames[i].reshape(-1, pixel_values.shape[-1]), table).view(frames[i].shape)

    previous = frame(0)
    for i in range(1, t):
        current = frame(i)
        diff = torch.abs(current - previous).mean(dim=-1) * 255  # (tokens,)
        previous = current
        row = diff > threshold
        if int(row.sum()) < min_tokens:
            row[:min_tokens] = True
        keep[i] = row
    return keep.flatten()
