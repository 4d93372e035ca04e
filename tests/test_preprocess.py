"""Pre-processing: equality with transformers' PIL image processor, resize budget, config files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from media_factory import make_image, make_video
from PIL import Image, ImageOps

from vl3cli.errors import ConfigError, ContextError, MediaError, UsageError
from vl3cli.preprocess import (
    MediaOptions,
    ProcessorConfig,
    patchify,
    prepare_visual,
    resized_size,
    smart_resize,
)

pil_module = pytest.importorskip("transformers.models.video_llama_3.image_processing_pil_video_llama_3")


def hf_processor(config: ProcessorConfig):
    return pil_module.VideoLlama3ImageProcessorPil(
        min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels, patch_size=config.patch_size,
        merge_size=config.image_merge_size, image_mean=list(config.image_mean), image_std=list(config.image_std),
    )  # fmt: skip


@pytest.mark.parametrize(
    "size,mode,fmt",
    [
        ((64, 48), "RGB", "PNG"),
        ((333, 211), "RGBA", "PNG"),
        ((1999, 1333), "RGB", "JPEG"),  # scaled down to the budget
        ((20, 9), "L", "BMP"),  # scaled up to the minimum
        ((300, 200), "P", "GIF"),
        ((150, 100), "LA", "PNG"),
        ((90, 120), "RGB", "WEBP"),
        ((100, 70), "RGB", "TIFF"),
    ],
)
def test_image_equals_transformers(tmp_path, size, mode, fmt):
    path = make_image(tmp_path / f"x.{fmt.lower()}", size=size, mode=mode, fmt=fmt)
    config = ProcessorConfig()
    ours = prepare_visual(path, config, MediaOptions())
    ref = hf_processor(config)(Image.open(path), return_tensors="pt")
    assert ours.kind == "image" and ours.keep is None and ours.timestamps == []
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert (ours.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert (ours.source_width, ours.source_height) == size
    assert ours.visual_tokens == ours.visual_tokens_kept == ours.tokens_per_frame[0] == ours.pixel_values.shape[0]


def test_image_custom_budget_and_stats_equal_transformers(tmp_path):
    path = make_image(tmp_path / "x.png", size=(500, 300))
    config = ProcessorConfig(image_min_pixels=20000, image_max_pixels=60000, image_mean=(0.4, 0.5, 0.6),
                             image_std=(0.2, 0.3, 0.25))  # fmt: skip
    ours = prepare_visual(path, config, MediaOptions())
    ref = hf_processor(config)(Image.open(path), return_tensors="pt")
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert (ours.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_exif_orientation_applied(tmp_path):
    path = make_image(tmp_path / "rot.jpg", size=(80, 40), fmt="JPEG", exif_orientation=6)
    ours = prepare_visual(path, ProcessorConfig(), MediaOptions())
    assert (ours.source_width, ours.source_height) == (40, 80)
    upright = ImageOps.exif_transpose(Image.open(path))
    ref = hf_processor(ProcessorConfig())(upright, return_tensors="pt")
    assert (ours.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 5000), w=st.integers(1, 5000), factor=st.sampled_from([14, 28]),
    lo=st.integers(1, 20000), hi=st.integers(784, 4_000_000),
)  # fmt: skip
def test_smart_resize_equals_transformers(h, w, factor, lo, hi):
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(MediaError):
            smart_resize(h, w, factor, lo, hi)
        return
    assert smart_resize(h, w, factor, lo, hi) == pil_module.smart_resize(h, w, factor, lo, hi)


def test_video_budget_shared_and_token_cap():
    kw = {"patch_size": 14, "merge_size": 2, "min_pixels": 12544, "max_pixels": 12845056}
    h, w = resized_size(1080, 1920, frames=180, **kw)
    assert h * w <= 12845056 // 180 and h % 28 == 0 and w % 28 == 0
    h1, w1 = resized_size(1080, 1920, frames=1, **kw)
    assert h1 * w1 > h * w
    h, w = resized_size(1080, 1920, frames=10, max_tokens=1000, **kw)
    assert 10 * (h // 28) * (w // 28) <= 1000
    with pytest.raises(UsageError):
        resized_size(1080, 1920, frames=10, max_tokens=5, **kw)
    h, w = resized_size(480, 640, patch_size=14, merge_size=1, min_pixels=3136, max_pixels=3211264, max_tokens=64)
    assert (h // 14) * (w // 14) <= 64


def test_small_picture_under_a_token_cap_takes_the_largest_size_within_it():
    """The cap also lowers the min budget; scaling a small picture up to it can round past it,
    and then the largest size within the cap is used rather than refusing the picture."""
    kw = {"patch_size": 14, "merge_size": 1, "min_pixels": 3136, "max_pixels": 3211264}
    # 30x30 -> 784 px < min 1960 (10 tokens): scaled by sqrt(1960/900) and ceiled it is 56x56 (16 tokens);
    # the largest within 10 tokens is 42x42 (30 * sqrt(1960/900) = 44.3 -> floor to 42).
    assert resized_size(30, 30, max_tokens=10, **kw) == (42, 42)
    assert resized_size(9, 20, max_tokens=4, **kw) == (14, 28)
    # a video asked for more frames than its budget has pixels: one merged token per frame, no division by zero
    assert resized_size(32, 32, patch_size=14, merge_size=2, min_pixels=12544, max_pixels=12845056,
                        frames=13_000_000) == (28, 28)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 3000), w=st.integers(1, 3000), merge=st.sampled_from([1, 2]), frames=st.integers(1, 40),
    per_frame=st.integers(1, 400),
)  # fmt: skip
def test_token_cap_is_met_whenever_the_aspect_ratio_allows(h, w, merge, frames, per_frame):
    """A cap of at least ceil(aspect ratio) tokens per frame always fits (one token on the short
    side); the result is within it, and equals transformers' smart_resize (given the same lowered
    budget) wherever that one stays within the cap."""
    ratio = max(h, w) / min(h, w)
    if ratio > 200:
        return
    factor, cap = 14 * merge, frames * max(per_frame, math.ceil(ratio))
    lo = 16 * factor * factor
    got = resized_size(h, w, patch_size=14, merge_size=merge, min_pixels=lo, max_pixels=10**8, frames=frames,
                       max_tokens=cap)  # fmt: skip
    assert got[0] % factor == 0 and got[1] % factor == 0
    assert frames * (got[0] // factor) * (got[1] // factor) <= cap
    hi = (cap // frames) * factor * factor
    ref = pil_module.smart_resize(h, w, factor, min(lo, hi), hi)
    if ref[0] * ref[1] <= hi:
        assert got == ref


def test_max_visual_tokens_option(tmp_path):
    path = make_image(tmp_path / "x.png", size=(640, 480))
    v = prepare_visual(path, ProcessorConfig(), MediaOptions(max_visual_tokens=100))
    assert v.visual_tokens <= 100
    clip = make_video(tmp_path / "c.mp4", seconds=2.0, fps=10, size=(160, 120))
    v = prepare_visual(clip, ProcessorConfig(), MediaOptions(max_visual_tokens=40, prune=False))
    assert v.visual_tokens <= 40 and v.keep is None


def test_context_check_counts_every_token_when_the_checkpoint_does_not_prune(tmp_path):
    """A checkpoint with use_token_compression off keeps every frame whole, so a video whose
    frames cannot all fit is refused before it is decoded, as with --no-prune."""
    clip = make_video(tmp_path / "c.mp4", seconds=4.0, fps=5, size=(64, 48))
    base = MediaOptions(token_budget=50)  # 4 frames of 20 tokens: 23 when pruned, 80 when not
    assert prepare_visual(clip, ProcessorConfig(), base).visual_tokens == 80
    with pytest.raises(ContextError, match="at least 80 visual tokens"):
        prepare_visual(clip, ProcessorConfig(), MediaOptions(token_budget=50, prune=False))
    with pytest.raises(ContextError, match="at least 80 visual tokens"):
        prepare_visual(clip, ProcessorConfig(use_token_compression=False), base)


def test_the_context_advice_names_a_value_that_is_taken(tmp_path):
    """4 frames of 20 tokens (80 unpruned) over a budget: the suggested --max-visual-tokens is the
    budget less 64 for the prompt's text, when that is one token per frame at least, and taken:
    budget 70 -> 6, 1 token (28x28) per frame, 4 in all. Budget 67 -> 3, under one per frame for
    4 frames, which resized_size refuses: fewer frames or a shorter answer instead."""
    clip = make_video(tmp_path / "c.mp4", seconds=4.0, fps=5, size=(64, 48))
    with pytest.raises(ContextError, match=r"context leaves 70 after the answer: pass --max-visual-tokens 6 \("):
        prepare_visual(clip, ProcessorConfig(), MediaOptions(token_budget=70, prune=False))
    v = prepare_visual(clip, ProcessorConfig(), MediaOptions(token_budget=70, prune=False, max_visual_tokens=6))
    assert (v.visual_tokens, tuple(v.grid_thw)) == (4, (4, 2, 2))  # 2x2 patches of 14: one merged token a frame
    with pytest.raises(ContextError) as e:
        prepare_visual(clip, ProcessorConfig(), MediaOptions(token_budget=67, prune=False))
    assert str(e.value).endswith("context leaves 67 after the answer: lower --max-new-tokens or --max-frames"), e.value


def test_patchify_matches_transformers_layout():
    p, m = 14, 2
    frames = np.random.default_rng(0).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)  # (t, H, W, 3)
    ours = patchify(frames, p, m)
    # transformers' video patchify, written on (1, t, C, H, W)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]
    gh, gw = 56 // p, 84 // p
    ref = x.reshape(1, 3, 1, 3, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    ref = ref.reshape(3 * gh * gw, 3 * p * p)
    assert np.array_equal(ours, ref.numpy())


def test_aspect_ratio_refused(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (1005, 5)).save(path)
    with pytest.raises(MediaError, match=r"strip\.png.*aspect ratio"):
        prepare_visual(path, ProcessorConfig(), MediaOptions())


@pytest.mark.parametrize(
    "options",
    [MediaOptions(fps=0), MediaOptions(min_frames=0), MediaOptions(max_frames=2, min_frames=3),
     MediaOptions(start=3, end=2), MediaOptions(max_visual_tokens=0), MediaOptions(prune_threshold=-1)],
)  # fmt: skip
def test_impossible_options(tmp_path, options):
    path = make_image(tmp_path / "x.png")
    with pytest.raises(UsageError):
        prepare_visual(path, ProcessorConfig(), options)


def write(d, name, data):
    (d / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_config_defaults_when_missing(tmp_path):
    assert ProcessorConfig.from_dir(tmp_path) == ProcessorConfig()


def test_config_hf_format(tmp_path):
    write(tmp_path, "preprocessor_config.json", {
        "image_processor_type": "VideoLlama3ImageProcessor", "merge_size": 1, "patch_size": 14,
        "size": {"shortest_edge": 3136, "longest_edge": 1000000}, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "unknown_key": 1,
    })  # fmt: skip
    write(tmp_path, "video_preprocessor_config.json", {
        "merge_size": 2, "min_pixels": 25088, "max_pixels": 5000000, "min_frames": 2, "max_frames": 64,
        "fps": 2, "use_token_compression": False,
    })  # fmt: skip
    c = ProcessorConfig.from_dir(tmp_path)
    assert (c.image_min_pixels, c.image_max_pixels, c.image_merge_size) == (3136, 1000000, 1)
    assert (c.video_min_pixels, c.video_max_pixels, c.video_merge_size) == (25088, 5000000, 2)
    assert (c.min_frames, c.max_frames, c.fps, c.use_token_compression) == (2, 64, 2.0, False)


def test_config_original_format(tmp_path):
    write(tmp_path, "processor_config.json", {"fps": 1, "max_frames": 128, "image_merge_size": 1,
                                              "video_merge_size": 2, "processor_class": "x"})  # fmt: skip
    write(tmp_path, "preprocessor_config.json", {"min_tokens": 16, "max_tokens": 16384, "patch_size": 14,
                                                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3})  # fmt: skip
    c = ProcessorConfig.from_dir(tmp_path)
    assert c == ProcessorConfig()  # the documented defaults are this checkpoint's values; max_frames stays 180
    # the original format says whether to prune in config.json
    write(tmp_path, "config.json", {"model_type": "videollama3_qwen2", "use_token_compression": False})
    assert ProcessorConfig.from_dir(tmp_path).use_token_compression is False


@pytest.mark.parametrize("name", ["preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"])
def test_config_malformed(tmp_path, name):
    write(tmp_path, name, "{not json")
    with pytest.raises(ConfigError, match=name):
        ProcessorConfig.from_dir(tmp_path)


@pytest.mark.parametrize(("name", "values", "message"), [
    ("preprocessor_config.json", {"patch_size": 0}, "patch_size must be positive"),
    ("preprocessor_config.json", {"patch_size": -14}, "patch_size must be positive"),
    ("preprocessor_config.json", {"merge_size": 0}, "image_merge_size must be positive"),
    ("video_preprocessor_config.json", {"merge_size": 0}, "video_merge_size must be positive"),
    ("preprocessor_config.json", {"max_pixels": 0}, "image_max_pixels must be positive"),
    ("preprocessor_config.json", {"max_pixels": float("inf")}, "cannot convert float infinity to integer"),
    ("video_preprocessor_config.json", {"min_frames": float("-inf")}, "cannot convert float infinity to integer"),
    ("preprocessor_config.json", {"min_pixels": 10**12}, "image min_pixels 1000000000000 is above max_pixels"),
    ("video_preprocessor_config.json", {"min_pixels": 10**12, "max_pixels": 10**13}, "video max_pixels"),
    ("preprocessor_config.json", {"image_std": [0, 0, 0]}, "std non-zero"),
    ("preprocessor_config.json", {"image_mean": [float("nan"), 0.5, 0.5]}, "must be finite"),
    ("video_preprocessor_config.json", {"fps": 0}, "fps must be a positive number"),
    ("video_preprocessor_config.json", {"max_frames": 0}, "max_frames must be positive"),
])  # fmt: skip
def test_config_values_that_cannot_work_are_refused_at_load(tmp_path, name, values, message):
    write(tmp_path, name, values)
    with pytest.raises(ConfigError, match=message):
        ProcessorConfig.from_dir(tmp_path)


def test_config_patch_size_must_be_the_vision_towers(tmp_path):
    write(tmp_path, "preprocessor_config.json", {"patch_size": 16})
    assert ProcessorConfig.from_dir(tmp_path).patch_size == 16
    with pytest.raises(ConfigError, match="patch_size 16 differs from the vision tower's 14"):
        ProcessorConfig.from_dir(tmp_path, patch_size=14)
