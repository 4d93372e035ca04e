"""Synthetic media for tests: tiny videos encoded with PyAV, images written with Pillow.

    make_video(path, codec="h264", seconds=2.0, fps=10, size=(W, H), static=False) -> Path
    make_image(path, size=(W, H), mode="RGB", fmt="PNG", exif_orientation=None) -> Path
    make_animated(path, fmt="GIF", durations_ms=(100,) * 10, size=(W, H)) -> Path
    encoder_for(codec) -> str | None      # the PyAV encoder that writes `codec`, if any
    require_encoder(codec) -> str         # same, or pytest.skip with the reason

Frame i of a moving clip shows a gradient plus a bright square that moves each frame and
a colour that changes with i, so every frame differs from the one before it; a static
clip repeats frame 0.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

# codec -> (PyAV encoder candidates, container format, extra options)
_ENCODERS = {
    "h264": (("libx264", "h264"), "mp4", {}),
    "hevc": (("libx265", "hevc"), "mp4", {"x265-params": "log-level=none"}),
    "vp9": (("libvpx-vp9",), "webm", {"deadline": "realtime", "cpu-used": "8"}),
    "vp8": (("libvpx",), "webm", {"deadline": "realtime"}),
    "av1": (("libsvtav1", "libaom-av1", "librav1e"), "mp4", {}),
    "mpeg4": (("mpeg4",), "mp4", {}),
}
_AV1_OPTIONS = {"libsvtav1": {"preset": "12"}, "libaom-av1": {"cpu-used": "8"}, "librav1e": {"speed": "10"}}
# Static clips are encoded losslessly where the encoder can, so their decoded frames are
# bit-identical (lossy encoders keep refining the picture for a few frames).
_LOSSLESS = {
    "libx264": {"qp": "0"},
    "libx265": {"x265-params": "lossless=1:log-level=none"},
    "libvpx-vp9": {"lossless": "1"},
}


def encoder_for(codec: str) -> str | None:
    """Name of an available PyAV encoder for ``codec`` ("h264", "hevc", "vp9", "av1", ...)."""
    import av

    names = _ENCODERS[codec][0]
    return next((n for n in names if n in av.codecs_available), None)


def require_encoder(codec: str) -> str:
    import pytest

    name = encoder_for(codec)
    if name is None:
        pytest.skip(f"this PyAV build has no encoder for {codec} (tried {_ENCODERS[codec][0]})")
    return name


def frame_pixels(i: int, size: tuple[int, int], static: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 test picture number ``i`` (frame 0 when ``static``)."""
    w, h = size
    i = 0 if static else i
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, (i * 37) % 256)], -1)
    side = max(4, min(w, h) // 4)
    x0 = (i * 5) % max(w - side, 1)
    img[h // 3 : h // 3 + side, x0 : x0 + side] = 255
    return img.astype(np.uint8)


def make_video(
    path,
    codec: str = "h264",
    seconds: float = 2.0,
    fps: float = 10,
    size: tuple[int, int] = (64, 48),
    static: bool = False,
    frames: int | None = None,
    gop: int | None = None,
) -> Path:
    """Encode a clip of ``frames`` (default ``round(seconds * fps)``) frames; returns the path.

    The container follows the path's suffix (.mp4, .mkv, .webm, .mov, .gif)."""
    import av

    path = Path(path)
    if codec == "gif":
        encoder, options, pix_fmt = "gif", {}, "rgb8"
    else:
        encoder = encoder_for(codec)
        if encoder is None:
            raise RuntimeError(f"no PyAV encoder for {codec}")
        options = dict(_ENCODERS[codec][2]) | _AV1_OPTIONS.get(encoder, {})
        if static:
            options |= _LOSSLESS.get(encoder, {})
        pix_fmt = "yuv420p"
    n = frames if frames is not None else max(1, round(seconds * fps))
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, size, static), format="rgb24")
            if pix_fmt != "rgb24":
                frame = frame.reformat(format=pix_fmt)
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_image(
    path,
    size: tuple[int, int] = (64, 48),
    mode: str = "RGB",
    fmt: str = "PNG",
    exif_orientation: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-noise-plus-gradient picture in ``mode`` and ``fmt``; returns the path."""
    path = Path(path)
    w, h = size
    rng = np.random.default_rng(seed)
    rgb = (frame_pixels(seed, size).astype(np.int16) + rng.integers(-40, 40, (h, w, 3))).clip(0, 255)
    im = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype("<u2") * 257)  # mode I;16
    elif mode in ("RGBA", "LA"):
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        im = im.convert(mode[:-1])
        im.putalpha(alpha)
    elif mode != "RGB":
        im = im.convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    im.save(path, format=fmt, **kwargs)
    return path


def make_animated(
    path,
    fmt: str = "GIF",
    durations_ms=(100,) * 10,
    size: tuple[int, int] = (64, 48),
) -> Path:
    """An animated GIF / WebP / PNG with one frame per entry of ``durations_ms``."""
    path = Path(path)
    frames = [Image.fromarray(frame_pixels(i, size), "RGB") for i in range(len(durations_ms))]
    if fmt == "GIF":
        frames = [f.quantize(64) for f in frames]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(
        path, format=fmt, save_all=True, append_images=frames[1:], duration=list(durations_ms), loop=0,
        **extra,
    )  # fmt: skip
    return path
