"""Decoding: every format in, the right frames and metadata out; broken input -> MediaError."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from media_factory import frame_pixels, make_animated, make_image, make_video, require_encoder
from PIL import Image

from vl3cli import media, video
from vl3cli.errors import MediaError, UsageError
from vl3cli.preprocess import MediaOptions, ProcessorConfig, prepare_visual

CONFIG = ProcessorConfig()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Shared test clips, encoded once per module."""
    d = tmp_path_factory.mktemp("clips")
    return {
        "h264": make_video(d / "h264.mp4", "h264"),
        "static": make_video(d / "static.mp4", "h264", static=True),
        "one": make_video(d / "one.mp4", "h264", frames=1),
        "long": make_video(d / "long.mkv", "h264", seconds=30, fps=5, size=(64, 48), gop=10),
    }


@pytest.mark.parametrize(
    "codec,suffix", [("h264", "mp4"), ("hevc", "mp4"), ("vp9", "webm"), ("av1", "mp4"), ("av1", "mkv"), ("mpeg4", "avi")]
)
def test_codecs_decode(tmp_path, codec, suffix):
    require_encoder(codec)
    path = make_video(tmp_path / f"clip.{suffix}", codec, seconds=2.0, fps=10, size=(64, 64))
    v = prepare_visual(path, CONFIG, MediaOptions())
    assert v.kind == "video"
    assert v.timestamps == [0.0, 0.5, 1.0, 1.5]
    assert v.duration == pytest.approx(2.0, abs=0.11) and v.fps == pytest.approx(10.0)
    assert (v.source_width, v.source_height) == (64, 64)
    assert v.grid_thw == (4, v.resized_height // 14, v.resized_width // 14)
    assert v.pixel_values.shape == (4 * v.grid_thw[1] * v.grid_thw[2], 3 * 14 * 14)
    if codec == "av1":
        assert v.decoder == "pyav"  # decord cannot read AV1
    assert len(v.tokens_per_frame) == 4 and v.tokens_per_frame[0] == v.visual_tokens // 4


def test_frames_are_the_right_ones(clips):
    """The frame used for timestamp t is source frame round-down(t * fps): check the colour
    channel that encodes the frame number."""
    for backend in ("decord", "pyav"):
        plan = lambda meta: ([0.0, 0.5, 1.0, 1.5, 1.94], (64, 48))  # noqa: E731
        v = media.read_video(clips["h264"], plan, backend=backend)
        blue = [int(np.median(f[..., 2])) for f in v.frames]
        expected = [int(frame_pixels(i, (64, 48))[0, 0, 2]) for i in (0, 5, 10, 15, 19)]
        assert np.allclose(blue, expected, atol=6), (backend, blue, expected)


def test_decord_and_pyav_agree(clips):
    plan = lambda meta: ([0.0, 3.0, 3.2, 11.0, 11.1, 25.0, 29.8], (64, 48))  # noqa: E731
    a = media.read_video(clips["long"], plan, backend="decord")
    b = media.read_video(clips["long"], plan, backend="pyav")
    assert a.backend == "decord" and b.backend == "pyav"
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 2


def test_pyav_seeking_equals_sequential(clips, monkeypatch):
    plan = lambda meta: ([0.0, 0.4, 7.0, 7.2, 19.0, 24.4, 29.8], (64, 48))  # noqa: E731
    seeking = media.read_video(clips["long"], plan, backend="pyav").frames
    monkeypatch.setattr(video, "SEEK_MIN_GAP", 1e9)
    sequential = media.read_video(clips["long"], plan, backend="pyav").frames
    assert np.array_equal(seeking, sequential)


def test_fallback_without_decord(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    v = prepare_visual(clips["h264"], CONFIG, MediaOptions())
    assert v.decoder == "pyav" and v.timestamps == [0.0, 0.5, 1.0, 1.5]


def test_static_clip_pruned(clips):
    v = prepare_visual(clips["static"], CONFIG, MediaOptions())
    assert v.tokens_per_frame[1:] == [1, 1, 1]
    assert v.tokens_per_frame[0] == v.visual_tokens // 4
    assert v.visual_tokens_kept == v.tokens_per_frame[0] + 3
    off = prepare_visual(clips["static"], CONFIG, MediaOptions(prune=False))
    assert off.keep is None and off.visual_tokens_kept == off.visual_tokens
    no_compression = ProcessorConfig(use_token_compression=False)
    assert prepare_visual(clips["static"], no_compression, MediaOptions()).keep is None


def test_moving_clip_keeps_tokens(clips):
    v = prepare_visual(clips["h264"], CONFIG, MediaOptions())
    assert all(n > 1 for n in v.tokens_per_frame)


def test_one_frame_clip(clips):
    v = prepare_visual(clips["one"], CONFIG, MediaOptions())
    assert v.timestamps == [0.0] and v.grid_thw[0] == 1 and v.visual_tokens_kept == v.visual_tokens


def test_start_end_and_max_frames(clips):
    v = prepare_visual(clips["long"], CONFIG, MediaOptions(start=10.0, end=20.0))
    assert v.timestamps == [10.0 + k for k in range(10)]
    v = prepare_visual(clips["long"], CONFIG, MediaOptions(max_frames=6, prune=False))
    assert v.timestamps == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    v = prepare_visual(clips["long"], CONFIG, MediaOptions(start=29.0, prune=False))
    assert v.timestamps == pytest.approx([29.0, 29.2, 29.4, 29.6])  # min_frames over the clip


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_are_videos(tmp_path, fmt):
    path = make_animated(tmp_path / f"anim.{fmt.lower()}", fmt, durations_ms=(500, 500, 1000, 500, 500, 1000))
    v = prepare_visual(path, CONFIG, MediaOptions())
    assert v.kind == "video" and v.decoder == "pillow"
    assert v.duration == pytest.approx(4.0)
    assert v.timestamps == [0.0, 1.0, 2.0, 3.0]  # frames 0, 2, 3, 5
    assert v.grid_thw[0] == 4


def test_pyav_encoded_gif(tmp_path):
    path = make_video(tmp_path / "clip.gif", "gif", seconds=2.0, fps=10)
    v = prepare_visual(path, CONFIG, MediaOptions())
    assert v.kind == "video" and v.timestamps == [0.0, 0.5, 1.0, 1.5]


def test_still_gif_and_multipage_tiff_are_images(tmp_path):
    still = make_image(tmp_path / "still.gif", mode="P", fmt="GIF")
    assert prepare_visual(still, CONFIG, MediaOptions()).kind == "image"
    pages = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    pages[0].save(tmp_path / "pages.tiff", save_all=True, append_images=pages[1:])
    assert prepare_visual(tmp_path / "pages.tiff", CONFIG, MediaOptions()).kind == "image"


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "TIFF"), ("P", "GIF"),
     ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("I;16", "PNG"), ("I;16", "TIFF"),
     ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("1", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("YCbCr", "JPEG")],
)  # fmt: skip
def test_image_modes_to_rgb(tmp_path, mode, fmt):
    path = make_image(tmp_path / f"x.{fmt.lower()}", size=(40, 30), mode=mode, fmt=fmt)
    im = media.load_image(path)
    assert im.mode == "RGB" and im.size == (40, 30)
    if mode.startswith("I") or mode == "F":
        assert 20 < np.asarray(im).mean() < 235  # scaled to 8 bits, not clipped to white


def test_transparency_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert np.asarray(media.load_image(path)).min() == 255


def check_error(path, *words):
    with pytest.raises(MediaError) as info:
        prepare_visual(path, CONFIG, MediaOptions())
    message = str(info.value)
    assert str(path) in message
    for w in words:
        assert w in message, message


def test_broken_inputs(tmp_path, clips):
    (tmp_path / "zero.mp4").write_bytes(b"")
    check_error(tmp_path / "zero.mp4", "empty")
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    check_error(tmp_path / "random.bin", "not an image or video")
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 20)
    check_error(tmp_path / "notes.mp4", "not an image or video")
    check_error(tmp_path / "missing.mp4", "no such file")
    check_error(tmp_path, "not a regular file")
    data = clips["h264"].read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    check_error(tmp_path / "truncated.mp4", "truncated", "moov")
    (tmp_path / "broken.png").write_bytes(make_image(tmp_path / "ok.png", size=(200, 200)).read_bytes()[:300])
    check_error(tmp_path / "broken.png", "corrupt or truncated image")
    for name in ("garbage.png", "garbage.jpg"):  # FFmpeg's image2 demuxer opens these by extension alone
        (tmp_path / name).write_bytes(b"garbage")
        check_error(tmp_path / name, "not an image Pillow can read")


def test_decompression_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)
    Image.new("1", (side, side)).save(path)  # a few KB on disk, > MAX_IMAGE_PIXELS decoded
    check_error(path, "too large")


def test_audio_only_file(tmp_path):
    import av

    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    check_error(path, "no video stream")


def test_start_past_the_end(clips):
    with pytest.raises(UsageError, match=r"h264\.mp4.*past the end"):
        prepare_visual(clips["h264"], CONFIG, MediaOptions(start=5.0))
