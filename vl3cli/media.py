"""Decoding: any image or video file -> uint8 RGB pixels plus metadata.

Contract:

- ``check_input(source)`` is the cheap check before any model work: a URL's syntax
  (``fetch.check_url``), or that a local file exists, is a readable regular file, not empty.
- ``detect_kind(path)`` says "image" or "video" from the content, never the extension: the
  file's signature first (``container.signature``: HEIC/HEIF/AVIF stills by their 'ftyp' brand,
  other MP4/MOV brands and Matroska/WebM are videos), then Pillow (animated GIF / WebP / PNG /
  AVIF are videos; so are an MPEG-1/2 stream and JPEGs one after another, a raw Motion-JPEG
  stream, which Pillow would take for one picture), then PyAV (a cover picture of an audio file
  is not a video; a format FFmpeg demuxes but cannot decode, such as SVG, is an error, and so is
  a text file FFmpeg's ``tty`` demuxer would draw as a picture because it is named .nfo / .ans).
- ``load_image(path)`` returns an RGB ``PIL.Image`` with EXIF orientation applied. HEIC/HEIF
  pictures go through pillow-heif (registered on first use), AVIF through Pillow's own plugin.
  Transparency is composited onto white (as transformers' ``convert_to_rgb`` does); 16-bit
  and float modes are scaled to 8 bits by their mode, never by their values (16-bit / 257,
  float 0..1 x 255; Pillow would clip them); every other mode goes through
  ``Image.convert("RGB")``. A picture of more than ``PICTURE_PIXELS`` (250 million: a 200 MP
  phone photo opens) is refused as a decompression bomb before it is decoded; Pillow's default
  limit (89.5 MP) would refuse a 108 MP photo. A limit a program set itself
  (``Image.MAX_IMAGE_PIXELS``) is the one used. Pillow's other warnings (corrupt EXIF) are silenced.
- ``read_video(path, plan)`` reads the metadata (``container.probe``, or Pillow for animated
  images), asks ``plan(meta)`` for the timestamps to use and the output size, then decodes
  only those frames, upright, resizing each one as soon as it is decoded (``video.decode``).
  A file cut short or damaged gives what decodes: the timestamps and the duration are cut to
  what was really read and ``DecodedVideo.warnings`` holds one line saying so; an animated
  GIF / PNG / WebP cut short is its frames before the first that does not decode.
- ``native_logging(debug)`` silences the native libraries' own log lines (or, with debug,
  lets them through to stderr).
- Every failure is a ``MediaError("<path>: <reason>")``, chained to the exception behind it;
  nothing here prints.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vl3cli import container, fetch, video
from vl3cli.container import Plan, VideoMeta, signature
from vl3cli.container import fail as _fail
from vl3cli.errors import MediaError, UsageError, Vl3Error
from vl3cli.sampling import frame_index

ANIMATED_FORMATS = {"GIF", "WEBP", "PNG", "AVIF"}
VIDEO_STREAM_FORMATS = {"MPEG"}  # Pillow names an MPEG-1/2 video stream (.m1v, .m2v) but cannot decode it
# Greyscale modes above 8 bits -> the factor to 0..255, by the mode's range, never by the values
# (a dark 16-bit picture stays dark). 32-bit integers are taken as 16-bit data (what 16-bit PNG and
# TIFF files open as); floats as 0..1.
SCALE_TO_8_BITS = {"I;16": 1 / 257, "I;16L": 1 / 257, "I;16B": 1 / 257, "I;16N": 1 / 257, "I": 1 / 257, "F": 255.0}
PICTURE_PIXELS = 250_000_000  # the largest picture decoded (a 200 MP photo is 16320 x 12240)
_PILLOW_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Pillow's own default (89.5 MP): any other value is a program's
_LIMIT_LOCK = threading.Lock()
GIF_MIN_DURATION_MS = 10  # GIF frames this short play at 100 ms in browsers; so do we
VIDEO_SIGNATURES = ("mp4", "matroska")


@dataclass
class DecodedVideo:
    meta: VideoMeta
    timestamps: list[float]
    frames: np.ndarray  # (t, h, w, 3) uint8, upright, already resized
    backend: str  # "decord" | "pyav" | "pillow"
    warnings: list[str] = field(default_factory=list)  # one line each, without the path


def check_file(path) -> None:
    """Raise MediaError when ``path`` is missing, not a file, unreadable or empty."""
    if not os.path.exists(path):
        raise _fail(path, "no such file")
    if not os.path.isfile(path):
        raise _fail(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise _fail(path, "permission denied")
    if os.path.getsize(path) == 0:
        raise _fail(path, "empty file (0 bytes): not an image or video")


def check_input(source) -> None:
    """Cheap checks before any model work: a URL's syntax, or a local file's presence."""
    if fetch.is_url(os.fspath(source)):
        fetch.check_url(os.fspath(source))
    else:
        check_file(source)


@functools.cache
def _heif_registered() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def native_logging(debug: bool) -> None:
    """Silence the native video libraries' log lines ("moov atom not found", "Read error",
    "partial file"), or with ``debug`` let their warnings and errors through to stderr.

    PyAV's libav logs through PyAV, silent unless a level is set; decord bundles another libav
    whose ``av_log`` writes to stderr unless its level is lowered. Both settings are
    process-wide: the command line calls this once, before decoding anything.
    """
    import av.logging

    if debug:
        av.logging.restore_default_callback()  # libav prints itself, safe from decoder threads
        av.logging.set_libav_level(av.logging.WARNING)
    else:
        av.logging.set_level(None)
    try:
        import decord
    except (ImportError, OSError):
        return
    decord.logging.set_level(decord.logging.WARNING if debug else decord.logging.QUIET)


# --------------------------------------------------------------------------- images


def _open_pil(path) -> Image.Image:
    """Image.open with the decompression-bomb limit (`PICTURE_PIXELS`, or a program's own) as a hard
    error; HEIF support on demand."""
    if signature(path) == "heif" and not _heif_registered():
        raise _fail(path, "HEIC/HEIF pictures need the pillow-heif package: pip install pillow-heif")
    with _LIMIT_LOCK:  # Pillow reads its limit from a global: set for this call only
        before = Image.MAX_IMAGE_PIXELS
        if before == _PILLOW_LIMIT:
            Image.MAX_IMAGE_PIXELS = PICTURE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # corrupt EXIF and other quirks are not the user's problem
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _fail(path, f"image too large ({e}); refusing to decode it") from e
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _is_animated(im: Image.Image) -> bool:
    return im.format in ANIMATED_FORMATS and bool(getattr(im, "is_animated", False))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited onto white."""
    if im.mode in SCALE_TO_8_BITS:
        a = np.asarray(im, dtype=np.float64) * SCALE_TO_8_BITS[im.mode]
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path) -> Image.Image:
    """Decode a still image to RGB with EXIF orientation applied (first frame if animated)."""
    check_file(path)
    try:
        with _open_pil(path) as im:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # EXIF quirks are not the user's problem
                im.load()
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except UnidentifiedImageError as e:
        raise _fail(path, _unreadable_picture(path)) from e
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _fail(path, f"corrupt or truncated image ({e})") from e


def _unreadable_picture(path) -> str:
    kind = signature(path)
    if kind == "avif":
        from PIL import features

        if not features.check("avif"):
            return "this Pillow has no AVIF support: install Pillow >= 11.3 (its wheels read AVIF)"
        return "corrupt or unsupported AVIF picture"
    return "corrupt or unsupported HEIF picture" if kind == "heif" else "not an image Pillow can read"


IMAGE_DEMUXERS = ("image2", "image2pipe")  # FFmpeg's still-picture demuxers, besides its *_pipe ones (png_pipe...)


def detect_kind(path) -> str:
    """'image' or 'video', judged from the content (see the module doc)."""
    check_file(path)
    kind = signature(path)
    if kind in VIDEO_SIGNATURES:
        return "video"
    broken = None
    try:
        with _open_pil(path) as im:
            if _is_animated(im):
                return "video"
            if im.format not in VIDEO_STREAM_FORMATS and not (im.format == "JPEG" and _jpegs_follow(path)):
                return "image"
            picture = True  # a video stream that starts like a picture: FFmpeg decides
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for non-images
        if kind is not None:  # a HEIF / AVIF picture Pillow cannot read
            raise _fail(path, _unreadable_picture(path)) from e
        picture = False
        # A format Pillow knows, whose reader then failed (a JPEG cut inside its headers), rather
        # than one it does not know (UnidentifiedImageError): a broken picture if FFmpeg sees one too.
        broken = e if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) else None
    with container.av_open(path) as c:  # raises MediaError "not an image or video" when PyAV cannot open it
        if c.format.name in container.TEXT_DEMUXERS:  # FFmpeg draws a text file named .nfo as a picture
            raise _fail(path, "not an image or video file (a text file)")
        main = container.main_video_stream(c)
        if main is None:
            raise _fail(path, "no video stream (audio-only or not a video)")
        cc = c.streams.video[main].codec_context
        if cc is None:  # FFmpeg demuxes it but has no decoder for it (SVG, ...)
            raise _fail(path, "not an image or video vl3 can read")
        demuxer = c.format.name
        if (demuxer in IMAGE_DEMUXERS or demuxer.endswith("_pipe")) and not picture:
            if broken is not None:
                raise _fail(path, f"corrupt or truncated image ({broken})") from broken
            if not cc.width:  # image2 opens any file named like a picture: garbage in x.png is a broken picture
                raise _fail(path, _unreadable_picture(path))
    return "video"


# XMP of photos that carry more images after the main one (a depth map, a motion photo's video):
# Google's container and depth formats. Such a file is a photo, not a Motion-JPEG stream.
_PHOTO_CONTAINERS = (b"GContainer", b"Container:Directory", b"GDepth:", b"GCamera:MotionPhoto", b"MicroVideo")


def _jpegs_follow(path) -> bool:
    """Whether another JPEG starts right after the first one ends: a raw Motion-JPEG stream (IP
    cameras, .mjpeg), not a photo (one whose XMP says it carries more images is a photo). Walks
    the first JPEG's segments to its end (EOI marker), through a mapping: nothing is read whole."""
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 8:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _another_jpeg(data)


def _another_jpeg(data) -> bool:
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False  # not a well-formed JPEG: leave it to Pillow
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            after = pos + 2
            while after < len(data) and data[after] == 0:
                after += 1
            return data[after : after + 3] == b"\xff\xd8\xff"
        if marker == 0xE1 and any(data.find(tag, pos, pos + 4 + int.from_bytes(data[pos + 2 : pos + 4], "big")) != -1
                                  for tag in _PHOTO_CONTAINERS):  # fmt: skip
            return False
        if marker == 0xFF or 0xD0 <= marker <= 0xD7:  # fill byte, or a restart marker without length
            pos += 1 if marker == 0xFF else 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker that is not 00 / RSTn
            while (pos := data.find(b"\xff", pos)) != -1 and pos + 1 < len(data):
                if data[pos + 1] != 0 and not 0xD0 <= data[pos + 1] <= 0xD7:
                    break
                pos += 2
            else:
                return False
    return False


# --------------------------------------------------------------------------- videos


def _animated_meta(path) -> VideoMeta:
    """An animated picture's frames and their times, each frame decoded once. A file cut short
    (a GIF / APNG whose download stopped) is what decodes before the first frame that does not:
    ``truncated`` says so; only a file whose first frame does not decode is an error."""
    with _open_pil(path) as im:
        durations, truncated = [], False
        for i in range(im.n_frames):
            video.check_cancelled()
            try:
                im.seek(i)
                im.load()  # WebP fills in the frame's duration on load
            except (OSError, EOFError, ValueError, SyntaxError):
                if not durations:
                    raise
                truncated = True  # Pillow: "image file is truncated", "Truncated File Read"
                break
            ms = im.info.get("duration") or 0
            durations.append(100 if ms <= GIF_MIN_DURATION_MS else int(ms))
        times, acc = [], 0
        for ms in durations:
            times.append(acc / 1000.0)
            acc += ms
        duration = acc / 1000.0
        return VideoMeta(im.width, im.height, duration, len(times) / duration, len(times), tuple(times),
                         im.format.lower(), truncated=truncated)  # fmt: skip


def _read_animated(path, meta: VideoMeta, timestamps, size) -> np.ndarray:
    out = np.empty((len(timestamps), size[1], size[0], 3), np.uint8)  # (t, h, w, 3)
    with _open_pil(path) as im:
        last_idx = None
        for j, t in enumerate(timestamps):
            idx = frame_index(meta.frame_times, t)
            if idx == last_idx:
                out[j] = out[j - 1]
                continue
            video.check_cancelled()
            im.seek(idx)
            out[j] = video.resize(to_rgb(im), size)
            last_idx = idx
    return out


def is_animated_image(path) -> bool:
    """An animated GIF / WebP / PNG / AVIF (read with Pillow), rather than a video container."""
    if signature(path) in VIDEO_SIGNATURES:
        return False
    try:
        with _open_pil(path) as im:
            return _is_animated(im)
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - not an image: a video container
        return False


@contextmanager
def decoder_errors(path):
    """Any decoder exception inside -> one MediaError naming `path` (vl3's own errors pass as they are)."""
    try:
        yield
    except Vl3Error:
        raise
    except MemoryError as e:
        raise _fail(path, "out of memory while decoding") from e
    except Exception as e:  # noqa: BLE001 - decoder errors of every kind
        raise _fail(path, f"cannot decode video ({type(e).__name__}: {e})") from e


def read_video(path, plan: Plan, backend: str = "auto") -> DecodedVideo:
    """Decode the frames ``plan(meta)`` asks for, at the size it asks for.

    ``plan`` returns ``(timestamps, (width, height))``; errors it raises propagate as they
    are. ``backend`` is "auto", "decord" or "pyav" (the last two for benchmarks and tests).
    """
    if backend not in ("auto", "decord", "pyav"):
        raise UsageError(f"unknown video decoder {backend!r}: use auto, decord or pyav")
    check_file(path)
    with decoder_errors(path):
        if is_animated_image(path):
            meta = _animated_meta(path)
            timestamps, size = plan(meta)
            frames = _read_animated(path, meta, timestamps, size)
            notes = [truncation_note(meta, len(frames))] if meta.truncated else []
            return DecodedVideo(meta, timestamps, frames, "pillow", notes)
        meta = container.probe(path)
        timestamps, size = plan(meta)
        frames, backend, end = video.decode(path, meta, timestamps, size, backend)
    if not len(frames):
        raise _fail(path, "truncated or corrupt video: no frame could be decoded")
    if end is not None:  # decoding stopped early: keep what was read
        meta = replace(meta, duration=end, truncated=True)
        timestamps = timestamps[: len(frames)]
    notes = [truncation_note(meta, len(frames))] if meta.truncated else []
    return DecodedVideo(meta, timestamps, frames, backend, notes)


def truncation_note(meta: VideoMeta, frames: int) -> str:
    announced = meta.header_duration
    of = f" of {announced:.1f} s" if announced and announced > meta.duration + 0.05 else ""
    return (
        f"truncated or damaged video: only the first {meta.duration:.1f} s{of} could be read; "
        f"using {frames} frame(s) from that part"
    )
