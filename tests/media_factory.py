"""Synthetic media for tests: tiny videos encoded with PyAV, images written with Pillow.

    make_video(path, codec="h264", seconds=2.0, fps=10, size=(W, H), static=False) -> Path
    make_clip(path, pictures, pts, rate, codec="h264") -> Path   # any pictures, any presentation times
    make_vfr_clip(path, codec="h264") -> Path   # 30 fps for 5 s, then 5 fps for 5 s
    make_numbered(path, frames, rate, codec="h264", gop=None, fmt=None, options=None) -> Path
    index_picture(i, size) -> array     # frame i shows i as a 16-bit block pattern...
    read_index(frame) -> int            # ... which this reads back from a decoded frame
    exif_jpeg(picture, orientation) -> bytes     # a camera's JPEG: EXIF with make and orientation
    make_camera_mjpeg(path, jpegs, rate=10) -> Path  # those JPEGs as the frames of an MJPEG AVI / MOV
    make_with_cover(path, fmt, numbered=0) -> Path   # audio + cover picture (+ a numbered video)
    make_image(path, size=(W, H), mode="RGB", fmt="PNG", exif_orientation=None) -> Path
    make_animated(path, fmt="GIF", durations_ms=(100,) * 10, size=(W, H)) -> Path
    marked_picture(size) -> array       # black, with a white block in the top-left corner
    set_track_matrix(path, (a, b, c, d)) -> Path   # write a display matrix into an MP4/MOV
    faststart_copy(src, dst) -> Path    # the same packets, index at the front
    trim_with_edit_list(src, dst, start_s, seconds) -> Path  # a lossless trim: only the MP4's 'elst' changes
    make_two_tracks(path, frames=50, rate=10) -> Path  # an MP4 with two numbered video tracks
    cut(src, dst, fraction) -> Path     # the first `fraction` of the bytes
    encoder_for(codec) -> str | None      # the PyAV encoder that writes `codec`, if any
    require_encoder(codec) -> str         # same, or pytest.skip with the reason

Frame i of a moving clip shows a gradient plus a bright square that moves each frame and
a colour that changes with i, so every frame differs from the one before it; a static
clip repeats frame 0. Frame k of the VFR clip is uniformly grey at ``second_level(s)``,
s being the second it is shown in.
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
    "mpeg2video": (("mpeg2video",), "mpg", {}),
    "mjpeg": (("mjpeg",), "avi", {}),
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
    n = frames if frames is not None else max(1, round(seconds * fps))
    pictures = (frame_pixels(i, size, static) for i in range(n))
    return make_clip(path, pictures, range(n), Fraction(fps).limit_denominator(1000), codec, static, gop)


def make_clip(
    path, pictures, pts, rate: Fraction, codec: str = "h264", lossless: bool = False, gop: int | None = None,
    fmt: str | None = None, fmt_options: dict | None = None,
) -> Path:  # fmt: skip
    """Encode ``pictures`` ((H, W, 3) uint8 each, all one size) shown at ``pts`` (in units of
    1/rate, increasing): any frame rate, variable ones included. The container follows the suffix
    unless ``fmt`` (an FFmpeg muxer name, with ``fmt_options``) names it."""
    import av

    path = Path(path)
    if codec == "gif":
        encoder, options, pix_fmt = "gif", {}, "rgb8"
    else:
        encoder = encoder_for(codec)
        if encoder is None:
            raise RuntimeError(f"no PyAV encoder for {codec}")
        options = dict(_ENCODERS[codec][2]) | _AV1_OPTIONS.get(encoder, {})
        if lossless:
            options |= _LOSSLESS.get(encoder, {})
        pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    with av.open(str(path), "w", format=fmt, options=fmt_options or {}) as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.pix_fmt = pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        for k, (picture, t) in enumerate(zip(pictures, pts, strict=True)):
            if k == 0:
                stream.height, stream.width = picture.shape[:2]
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            if pix_fmt != "rgb24":
                frame = frame.reformat(format=pix_fmt)
            frame.pts = t
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def index_picture(i: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """(H, W, 3) picture showing ``i`` (0..65535) in binary: bit b lights block b of a 2 x 8 grid."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    bw, bh = w // 8, h // 2
    for b in range(16):
        if (i >> b) & 1:
            r, c = divmod(b, 8)
            img[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw] = 255
    return img


def read_index(frame: np.ndarray) -> int:
    """The number ``index_picture`` drew, read from the centre of each block of a decoded frame."""
    h, w = frame.shape[:2]
    grey, bw, bh = frame.mean(-1), w // 8, h // 2
    bits = 0
    for b in range(16):
        r, c = divmod(b, 8)
        block = grey[r * bh + bh // 4 : (r + 1) * bh - bh // 4, c * bw + bw // 4 : (c + 1) * bw - bw // 4]
        bits |= int(block.mean() > 128) << b
    return bits


def make_numbered(path, frames: int, rate: int, codec: str = "h264", gop: int | None = None, fmt: str | None = None,
                  options: dict | None = None) -> Path:  # fmt: skip
    """A constant-rate clip whose frame i shows ``index_picture(i)``: the frame shown at t is round(t * rate)."""
    pictures = (index_picture(i) for i in range(frames))
    return make_clip(path, pictures, range(frames), Fraction(rate), codec, gop=gop, fmt=fmt, fmt_options=options)


def exif_jpeg(picture: np.ndarray, orientation: int = 1) -> bytes:
    """A JPEG as a camera writes it: EXIF (camera make, orientation) in front of the picture."""
    import io

    exif = Image.Exif()
    exif[0x010F] = "vl3 test camera"  # Make
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(picture).save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def make_camera_mjpeg(path, jpegs: list[bytes], rate: int = 10) -> Path:
    """Motion JPEG as cameras record it: each JPEG (EXIF included) stored as one frame, unchanged."""
    import io

    import av

    with Image.open(io.BytesIO(jpegs[0])) as im:
        width, height = im.size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        stream.time_base = Fraction(1, rate)
        for i, data in enumerate(jpegs):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.duration = stream, i, i, 1
            packet.time_base, packet.is_keyframe = Fraction(1, rate), True
            container.mux(packet)
    return Path(path)


def make_with_cover(path, fmt: str, numbered: int = 0) -> Path:
    """A second of silence with a red cover picture (an 'attached_pic' stream, as music files carry
    their artwork) in FFmpeg's muxer ``fmt``; with ``numbered`` > 0, then a 10 fps H.264 video whose
    frame i shows ``index_picture(i)``, stored after the cover."""
    import io

    import av
    from av.stream import Disposition

    cover = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(cover, "PNG")
    with av.open(str(path), "w", format=fmt) as container:
        audio = container.add_stream("flac" if fmt == "flac" else "aac", rate=8000)
        audio.layout = "mono"
        art = container.add_stream("png")
        art.width, art.height, art.pix_fmt, art.disposition = 32, 32, "rgb24", Disposition.attached_pic
        if numbered:
            clip = container.add_stream(encoder_for("h264"), rate=10)
            clip.width, clip.height, clip.pix_fmt = 64, 48, "yuv420p"
        packet = av.Packet(cover.getvalue())
        packet.stream, packet.pts, packet.dts, packet.is_keyframe = art, 0, 0, True
        container.mux(packet)
        if numbered:
            for i in range(numbered):
                frame = av.VideoFrame.from_ndarray(index_picture(i), format="rgb24").reformat(format="yuv420p")
                frame.pts = i
                container.mux(clip.encode(frame))
            container.mux(clip.encode())
        size = audio.codec_context.frame_size or 1024
        for k in range(8000 // size + 1):
            samples = np.zeros((1, size), np.int16 if fmt == "flac" else np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="s16" if fmt == "flac" else "fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, k * size
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return Path(path)


def make_late_video(path, video_start: int = 20, frames: int = 30, rate: int = 10, audio_s: float = 5.0) -> Path:
    """Silent AAC audio from time 0 for ``audio_s`` seconds and a ``rate`` fps H.264 video whose
    frame i shows ``index_picture(i)`` at ``(video_start + i) / rate`` s: a video track that begins
    after the audio (an MP4 gets an empty edit before it). The container follows the suffix."""
    import av

    with av.open(str(path), "w") as container:
        clip = container.add_stream(encoder_for("h264"), rate=rate)
        clip.width, clip.height, clip.pix_fmt = 64, 48, "yuv420p"
        clip.codec_context.gop_size = 10
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        size = 1024
        for k in range(int(audio_s * 16000) // size):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, size), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, k * size, Fraction(1, 16000)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(index_picture(i), format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = video_start + i, Fraction(1, rate)
            container.mux(clip.encode(frame))
        container.mux(clip.encode())
    return Path(path)


def second_level(second: int) -> int:
    """Grey level of the VFR clip's frames shown during ``second`` (0..9)."""
    return 20 + 20 * second


def make_vfr_clip(path, codec: str = "h264") -> Path:
    """10 s: 30 fps for 5 s, then 5 fps for 5 s; each frame grey at ``second_level`` of its second."""
    pts = [*range(150), *range(150, 300, 6)]  # units of 1/30 s
    pictures = (np.full((48, 64, 3), second_level(t // 30), np.uint8) for t in pts)
    return make_clip(path, pictures, pts, Fraction(30), codec)


def marked_picture(size: tuple[int, int] = (64, 48), side: int = 16) -> np.ndarray:
    """(H, W, 3) black picture with a white ``side`` x ``side`` block in its top-left corner."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    img[:side, :side] = 255
    return img


def _boxes(data: bytes, start: int, end: int):
    """(type, start, payload start, end) of the ISO-BMFF boxes in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind, body = int.from_bytes(data[pos : pos + 4], "big"), bytes(data[pos + 4 : pos + 8]), pos + 8
        if size == 1:
            size, body = int.from_bytes(data[pos + 8 : pos + 16], "big"), pos + 16
        elif size == 0:
            size = end - pos
        yield kind, pos, body, pos + size
        pos += size


def set_track_matrix(path, abcd: tuple[int, int, int, int]) -> Path:
    """Write the display matrix [a b 0; c d 0; x y 1] into the 'tkhd' box of the video track.

    ISO/IEC 14496-12 / QuickTime: a displayed point is (a*p + c*q + x, b*p + d*q + y) for a
    coded point (p, q), y pointing down; a..d, x, y are 16.16 fixed point, the last column
    2.30. The translation (x, y) keeps the picture at the origin, as cameras write it.
    """
    path = Path(path)
    data = bytearray(path.read_bytes())
    a, b, c, d = abcd
    for kind, _, body, end in _boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for kind, _, trak, trak_end in _boxes(data, body, end):
            if kind != b"trak":
                continue
            children = {k: (s, e) for k, _, s, e in _boxes(data, trak, trak_end)}
            mdia = {k: (s, e) for k, _, s, e in _boxes(data, *children[b"mdia"])}
            if data[mdia[b"hdlr"][0] + 8 : mdia[b"hdlr"][0] + 12] != b"vide":
                continue
            tkhd = children[b"tkhd"][0]
            at = tkhd + 4 + (32 if data[tkhd] == 1 else 20) + 16  # version/flags, times, reserved..volume
            w = int.from_bytes(data[at + 36 : at + 40], "big") >> 16
            h = int.from_bytes(data[at + 40 : at + 44], "big") >> 16
            xs = [a * p + c * q for p in (0, w) for q in (0, h)]
            ys = [b * p + d * q for p in (0, w) for q in (0, h)]
            values = [a << 16, b << 16, 0, c << 16, d << 16, 0, -min(xs) << 16, -min(ys) << 16, 1 << 30]
            data[at : at + 36] = b"".join((v & 0xFFFFFFFF).to_bytes(4, "big") for v in values)
    path.write_bytes(bytes(data))
    return path


def faststart_copy(src, dst) -> Path:
    """Remux ``src`` with the index ('moov') before the data, as streaming sites serve MP4s."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                o.mux(p)
    return Path(dst)


def trim_with_edit_list(src, dst, start_s: float, seconds: float) -> Path:
    """A copy of the MP4 ``src`` that plays ``seconds`` from ``start_s`` on, as QuickTime's or the
    iPhone Photos app's lossless "Trim" writes it: the video track's edit list ('elst', one edit)
    is all that changes; the samples before the new start stay in the file."""
    data = bytearray(Path(src).read_bytes())

    def find(path, start=0, end=len(data)):
        for kind, _, body, stop in _boxes(data, start, end):
            if kind == path[0]:
                return body if len(path) == 1 else find(path[1:], body, stop)
        raise ValueError(f"{src} has no {b'/'.join(path).decode()} box")

    movie_scale = int.from_bytes(data[find([b"moov", b"mvhd"]) + 12 :][:4], "big")  # version 0 boxes
    media_scale = int.from_bytes(data[find([b"moov", b"trak", b"mdia", b"mdhd"]) + 12 :][:4], "big")
    elst = find([b"moov", b"trak", b"edts", b"elst"])
    assert data[elst] == 0 and int.from_bytes(data[elst + 4 : elst + 8], "big") == 1, "one version-0 edit"
    media_time = int.from_bytes(data[elst + 12 : elst + 16], "big")  # where the edit starts (B-frame delay)
    data[elst + 8 : elst + 12] = round(seconds * movie_scale).to_bytes(4, "big")
    data[elst + 12 : elst + 16] = (media_time + round(start_s * media_scale)).to_bytes(4, "big")
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def make_two_tracks(path, frames: int = 50, rate: int = 10) -> Path:
    """An MP4 with two H.264 video tracks of ``frames`` frames: the first 64x48, its frame i showing
    ``index_picture(i)``; the second larger (320x240), showing ``index_picture(1000 + i)``."""
    import av

    with av.open(str(path), "w") as container:
        tracks = []
        for size in ((64, 48), (320, 240)):
            stream = container.add_stream(encoder_for("h264"), rate=rate)
            stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
            tracks.append((stream, size))
        for i in range(frames):
            for k, (stream, size) in enumerate(tracks):
                frame = av.VideoFrame.from_ndarray(index_picture(1000 * k + i, size), format="rgb24")
                frame = frame.reformat(format="yuv420p")
                frame.pts = i
                container.mux(stream.encode(frame))
        for stream, _ in tracks:
            container.mux(stream.encode())
    return Path(path)


def cut(src, dst, fraction: float) -> Path:
    """A copy of ``src`` holding only its first ``fraction`` of bytes (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


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
    if mode in ("I;16", "I"):  # 16-bit data: what 16-bit PNG / TIFF / PGM files open as
        im = Image.fromarray(np.asarray(im.convert("L")).astype("<u2") * 257)  # mode I;16
        im = im.convert("I") if mode == "I" else im
    elif mode == "F":  # float data in 0..1
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.float32) / 255)
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
