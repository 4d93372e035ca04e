"""Properties of the model code that need no reference: memory growth, RoPE order, downsampling."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from vl3cli.config import VisionConfig
from vl3cli.model.vision import VisionEncoder, downsample

PEAK_SCRIPT = r"""
import json, resource, sys, torch
from vl3cli.config import VisionConfig
from vl3cli.model.vision import VisionEncoder

frames, side = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
encoder = VisionEncoder(VisionConfig(hidden_size=128, intermediate_size=2048, num_hidden_layers=2,
                                     num_attention_heads=4, patch_size=14)).eval()
pixels = torch.randn(frames * side * side, 588)
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
before = rss_kb()
with torch.inference_mode():
    out = encoder(pixels, [(frames, side, side)], [2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"delta_kb": peak - before, "tokens": out.shape[0]}))
"""


def peak_growth_kb(frames: int, side: int = 14) -> int:
    """Peak RSS growth (kB) while encoding `frames` frames of side x side patches, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(frames), str(side)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["tokens"] == frames * (side // 2) ** 2
    return result["delta_kb"]


def test_vision_memory_is_linear_in_frames():
    """32 frames must cost < 5x the peak of 8 frames (a mask across frames would cost ~16x)."""
    small, large = peak_growth_kb(8), peak_growth_kb(32)
    assert small > 0
    assert large < 5 * small, (small, large)


def test_rope_positions_follow_merge_window_order():
    config = VisionConfig(hidden_size=16, num_attention_heads=1, intermediate_size=8, num_hidden_layers=1)
    encoder = VisionEncoder(config)
    cos, _ = encoder.rope([(1, 4, 4)], [2], "cpu")
    # Recover (row, col) from the first frequency of each half: inv_freq[0] = 1, so angle = position.
    quarter = config.head_dim // 4
    angles = torch.acos(cos[:, 0, :].clamp(-1, 1))
    rows, cols = angles[:, 0].round().long(), angles[:, quarter].round().long()
    expected = [(r, c) for br in range(2) for bc in range(2) for r in (2 * br, 2 * br + 1) for c in (2 * bc, 2 * bc + 1)]
    assert list(zip(rows.tolist(), cols.tolist())) == expected


def test_downsample_by_two_is_the_mean_of_each_window():
    t, h, w, c = 2, 4, 6, 3
    x = torch.randn(t * h * w, c)  # merge-window order: each run of 4 rows is one 2x2 window
    out = downsample(x, [(t, h, w)], [2])
    assert torch.allclose(out, x.view(-1, 4, c).mean(1), atol=1e-6)
    assert torch.equal(downsample(x, [(t, h, w)], [1]), x)


def test_per_frame_attention_equals_attention_on_each_frame_alone():
    """Encoding a 3-frame video equals encoding each frame as its own image (frames never mix)."""
    torch.manual_seed(0)
    config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          patch_size=14)
    encoder = VisionEncoder(config).eval()
    pixels = torch.randn(3 * 16, 588)
    with torch.inference_mode():
        video = encoder(pixels, [(3, 4, 4)], [2])
        frames = torch.cat([encoder(pixels[i * 16 : (i + 1) * 16], [(1, 4, 4)], [2]) for i in range(3)])
    assert torch.allclose(video, frames, atol=1e-5)
    # and the frames do influence themselves: changing frame 2 leaves frames 0 and 1 untouched
    changed = pixels.clone()
    changed[32:] += 1
    with torch.inference_mode():
        other = encoder(changed, [(3, 4, 4)], [2])
    assert torch.equal(other[:8], video[:8]) and not torch.allclose(other[8:], video[8:])



def test_sdpa_frame_chunks_give_the_same_result(monkeypatch):
    """Frames split over several SDPA calls (a small score budget) == all frames in one call."""
    import vl3cli.attention as attention

    torch.manual_seed(0)
    heads, d = 2, 8
    seqlens = [16] * 5 + [9, 9, 4]  # a 5-frame video, a 2-frame video, an image
    q, k, v = (torch.randn(sum(seqlens), heads, d) for _ in range(3))
    whole = attention.frame_attention(q, k, v, attention.Segments(seqlens), "sdpa", d**-0.5)
    monkeypatch.setattr(attention, "SCORE_BUDGET", heads * 16 * 16 * 2)  # two 16-patch frames per call
    chunked = attention.frame_attention(q, k, v, attention.Segments(seqlens), "sdpa", d**-0.5)
    assert torch.allclose(whole, chunked, atol=1e-6)
    # and each segment is attention over itself alone
    start = 0
    for n in seqlens:
        qs, ks, vs = (x[start : start + n].transpose(0, 1) for x in (q, k, v))
        alone = torch.softmax(qs @ ks.transpose(1, 2) * d**-0.5, dim=-1) @ vs
        assert torch.allclose(whole[start : start + n], alone.transpose(0, 1), atol=1e-5)
        start += n
