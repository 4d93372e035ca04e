"""Decoding: any image or video file -> uint8 RGB pixels plus metadata.

Contract:

- ``detect_kind(path)`` says "image" or "video" from the content, not the extension:
  Pillow first (animated GIF / WebP / PNG are videos), then PyAV.
- ``load_image(path)`` returns an RGB ``PIL.Image`` with EXIF orientation applied.
  Transparency is composited onto white (as transformers' ``convert_to_rgb`` does);
  16-bit and float modes are scaled to 8 bits (Pillow would clip them); every other mode
  goes through ``Image.convert("RGB")``. Pillow's decompression-bomb limit
  (``Image.MAX_IMAGE_PIXELS``) is enforced, its warning turned into an error.
- ``read_video(path, plan)`` probes the file (PyAV, headers only), asks ``plan(meta)`` for
  the timestamps to use and the output size, then decodes only those frames and resizes
  each one (PIL bicubic) as soon as it is decoded: memory holds the sampled frames at their
  resized size plus the frame being decoded. decord is the fast path (``get_batch`` on
  small chunks of indices) for codecs it reads; PyAV is the fallback (AV1, odd containers,
  missing frame counts or fps, any decord failure), seeking to the keyframe before a
  wanted frame when that skips decoding, reading on otherwise. Animated images are read
  with Pillow, frame durations giving the timestamps.
- The frame used for timestamp t is the frame shown at t (the last one starting at or
  before it; the first frame when t precedes every frame).
- Every failure is a ``MediaError("<path>: <reason>")``; nothing here prints.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vl3cli.errors import MediaError, UsageError, Vl3Error
from vl3cli.sampling import EPS, frame_index

ANIMATED_FORMATS = {"GIF", "WEBP", "PNG"}
# Codecs decord 0.6 decodes reliably; anything else (AV1 above all) goes to PyAV.
DECORD_CODECS = {"h264", "hevc", "vp8", "vp9", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg"}
DECORD_CHUNK = 4  # full-size frames fetched per get_batch call (4 x 1080p RGB = 25 MB)
SEEK_MIN_GAP = 2.0  # seconds: closer targets are reached by decoding on, not seeking
GIF_MIN_DURATION_MS = 10  # GIF frames this short play at 100 ms in browsers; so do we

Plan = Callable[["VideoMeta"], tuple[list[float], tuple[int, int]]]


@dataclass(frozen=True)
class VideoMeta:
    """What the decoder knows before decoding. Times are seconds from the video's start."""

    width: int
    height: int
    duration: float
    fps: float | None
    frame_count: int
    frame_times: tuple[float, ...]  # start time of each source frame, sorted
    codec: str
    complete_headers: bool = True  # frame count and fps came from the headers


@dataclass
class DecodedVideo:
    meta: VideoMeta
    timestamps: list[float]
    frames: np.ndarray  # (t, h, w, 3) uint8, already resized
    backend: str  # "decord" | "pyav" | "pillow"


def _fail(path, reason: str) -> MediaError:
    return MediaError(f"{os.fspath(path)}: {reason}")


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


# --------------------------------------------------------------------------- images


def _open_pil(path) -> Image.Image:
    """Image.open with the decompression-bomb limit as a hard error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _fail(
            path,
            f"image too large ({e}); refusing to decode it (Pillow's MAX_IMAGE_PIXELS "
            f"= {Image.MAX_IMAGE_PIXELS})",
        ) from None


def _is_animated(im: Image.Image) -> bool:
    return im.format in ANIMATED_FORMATS and bool(getattr(im, "is_animated", False))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range -> 8-bit
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
    except UnidentifiedImageError:
        raise _fail(path, "not an image Pillow can read") from None
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _fail(path, f"corrupt or truncated image ({e})") from None


def detect_kind(path) -> str:
    """'image' or 'video', judged from the content."""
    check_file(path)
    try:
        with _open_pil(path) as im:
            return "video" if _is_animated(im) else "image"
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - Pillow raises many types for non-images
        pass
    _probe_av(path)  # raises MediaError "not an image or video" when PyAV cannot open it
    return "video"


# --------------------------------------------------------------------------- videos


def _looks_like_video(path) -> bool:
    """True when the file starts like an MP4/MOV (ftyp box) or Matroska/WebM (EBML)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or head[:4] == b"\x1a\x45\xdf\xa3"


def _av_open(path):
    import av

    try:
        return av.open(os.fspath(path), metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001 - av.FFmpegError and friends
        reason = getattr(e, "strerror", None) or str(e)
        what = "truncated or corrupt video" if _looks_like_video(path) else "not an image or video file"
        raise _fail(path, f"{what} ({reason})") from None


def _probe_av(path) -> VideoMeta:
    """Read a video's metadata from its headers (demuxing packets only when they lack it)."""
    import av

    with _av_open(path) as c:
        if not c.streams.video:
            raise _fail(path, "no video stream (audio-only or not a video)")
        s = c.streams.video[0]
        cc = s.codec_context
        if not cc.width or not cc.height:
            raise _fail(path, "video stream has no frame size (corrupt header)")
        rate = s.average_rate or s.guessed_rate
        fps = float(rate) if rate else None
        tb = float(s.time_base) if s.time_base else None
        duration = None
        if s.duration and tb:
            duration = s.duration * tb
        elif c.duration:
            duration = c.duration / av.time_base
        count = s.frames or (round(duration * fps) if duration and fps else 0)
        complete = bool(fps and count)
        if complete:
            times = tuple(i / fps for i in range(count))
            duration = count / fps
        else:  # no usable header: list the packets' timestamps (no decoding)
            start = s.start_time or 0
            try:
                pts = sorted(p.pts for p in c.demux(s) if p.pts is not None)
            except av.FFmpegError as e:
                raise _fail(path, f"corrupt video ({e.strerror or e})") from None
            if not pts or not tb:
                raise _fail(path, "video has no timestamped frames")
            times = tuple((p - start) * tb for p in pts)
            count = len(times)
            step = (times[-1] - times[0]) / (count - 1) if count > 1 else 0.1
            duration = times[-1] + step
            fps = fps or (1 / step if step > 0 else None)
        return VideoMeta(cc.width, cc.height, float(duration), fps, int(count), times, cc.name, complete)


def _resize(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _read_decord(path, meta: VideoMeta, timestamps, size) -> np.ndarray:
    import decord

    vr = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
    n = len(vr)
    if n <= 0:
        raise RuntimeError("decord reports no frames")
    wanted: dict[int, list[int]] = {}  # source frame -> positions in the output
    for j, t in enumerate(timestamps):
        wanted.setdefault(min(frame_index(meta.frame_times, t), n - 1), []).append(j)
    unique = sorted(wanted)
    out = np.empty((len(timestamps), size[1], size[0], 3), np.uint8)  # (t, h, w, 3)
    for i in range(0, len(unique), DECORD_CHUNK):
        chunk = unique[i : i + DECORD_CHUNK]
        batch = vr.get_batch(chunk).asnumpy()  # (len(chunk), H, W, 3) full size
        for idx, frame in zip(chunk, batch):
            out[wanted[idx]] = _resize(Image.fromarray(frame), size)
        del batch
    return out


def _keyframe_times(stream, start_pts: int) -> list[float]:
    """Keyframe times (s) from the container's index, [] when it has none (e.g. WebM)."""
    tb = float(stream.time_base)
    try:
        return [(e.timestamp - start_pts) * tb for e in stream.index_entries if e.is_keyframe]
    except Exception:  # noqa: BLE001 - an optional optimisation
        return []


class _Cursor:
    """Sequential PyAV decoding with one frame of lookahead, restartable by a seek."""

    def __init__(self, container, stream, fps: float | None):
        self.c, self.s = container, stream
        self.tb = float(stream.time_base)
        self.start_pts = stream.start_time or 0
        self.fps = fps or 1.0
        self.frames = None  # decode iterator
        self.cur = self.cur_t = None  # last frame at or before the target, and its time
        self.nxt = self.nxt_t = None  # a frame decoded past the target, kept for the next one
        self.count = 0

    def position(self) -> float | None:
        return self.nxt_t if self.nxt is not None else self.cur_t

    def restart(self, t: float | None) -> None:
        """Seek to the keyframe at or before ``t`` (None: the start of the file)."""
        if t is None:
            if self.frames is not None:
                self.c.seek(self.start_pts, stream=self.s, backward=True)
        else:
            target = int(max(t, 0.0) / self.tb) + self.start_pts
            self.c.seek(target, stream=self.s, backward=True, any_frame=False)
        self.frames = self.c.decode(self.s)
        self.cur = self.cur_t = self.nxt = self.nxt_t = None

    def advance(self, t: float) -> None:
        """Decode until the next frame starts after ``t``; ``cur`` is then the frame shown at t."""
        import av

        while True:
            if self.nxt is None:
                try:
                    self.nxt = next(self.frames, None)
                except av.FFmpegError:
                    self.nxt = None  # corrupt tail: keep what was decoded
                if self.nxt is None:
                    return
                self.count += 1
                pts = self.nxt.pts
                self.nxt_t = (pts - self.start_pts) * self.tb if pts is not None else self.count / self.fps
            if self.nxt_t > t + EPS:
                return
            self.cur, self.cur_t, self.nxt = self.nxt, self.nxt_t, None


def _read_pyav(path, meta: VideoMeta, timestamps, size) -> np.ndarray:
    out = np.empty((len(timestamps), size[1], size[0], 3), np.uint8)  # (t, h, w, 3)
    with _av_open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        cur = _Cursor(c, s, meta.fps)
        keys = _keyframe_times(s, cur.start_pts)
        gop = 0.0  # largest keyframe gap inferred so far when the file has no index
        can_seek = True
        last = None
        for j, t in enumerate(timestamps):
            pos = cur.position()
            if cur.frames is None and (not can_seek or t <= SEEK_MIN_GAP):
                cur.restart(None)
            elif cur.frames is None or (can_seek and t - pos > SEEK_MIN_GAP):
                if keys:  # seek only when a keyframe lies between here and t
                    want = cur.frames is None or keys[frame_index(keys, t)] > pos + EPS
                else:
                    want = cur.frames is None or t - pos > gop
                if want:
                    cur.restart(t)
                    cur.advance(t)
                    landed = cur.cur_t if cur.cur is not None else cur.nxt_t
                    if landed is not None and pos is not None and landed <= pos + EPS:
                        gop = max(gop, t - landed)  # the seek did not get us past pos
                    if cur.cur is None and cur.nxt is not None and cur.nxt_t > t + 0.5:
                        can_seek = False  # imprecise seeking in this container: read on
                        cur.restart(None)
            cur.advance(t)
            frame = cur.cur if cur.cur is not None else cur.nxt
            if frame is None:
                if last is None:
                    raise _fail(path, "truncated or corrupt video: no frame could be decoded")
                out[j] = out[j - 1]  # stream ended early: the last frame stays on screen
            elif frame is last:
                out[j] = out[j - 1]
            else:
                out[j] = _resize(frame.to_image(), size)
                last = frame
    return out


def _animated_meta(path) -> VideoMeta:
    with _open_pil(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()  # WebP fills in the frame's duration on load
            ms = im.info.get("duration") or 0
            durations.append(100 if ms <= GIF_MIN_DURATION_MS else int(ms))
        times, acc = [], 0
        for ms in durations:
            times.append(acc / 1000.0)
            acc += ms
        duration = acc / 1000.0
        return VideoMeta(im.width, im.height, duration, len(times) / duration, len(times), tuple(times), im.format.lower())


def _read_animated(path, meta: VideoMeta, timestamps, size) -> np.ndarray:
    out = np.empty((len(timestamps), size[1], size[0], 3), np.uint8)  # (t, h, w, 3)
    with _open_pil(path) as im:
        last_idx = None
        for j, t in enumerate(timestamps):
            idx = frame_index(meta.frame_times, t)
            if idx == last_idx:
                out[j] = out[j - 1]
                continue
            im.seek(idx)
            out[j] = _resize(to_rgb(im), size)
            last_idx = idx
    return out


def read_video(path, plan: Plan, backend: str = "auto") -> DecodedVideo:
    """Decode the frames ``plan(meta)`` asks for, at the size it asks for.

    ``plan`` returns ``(timestamps, (width, height))``; errors it raises propagate as they
    are. ``backend`` is "auto", "decord" or "pyav" (the last two for benchmarks and tests).
    """
    if backend not in ("auto", "decord", "pyav"):
        raise UsageError(f"unknown video decoder {backend!r}: use auto, decord or pyav")
    check_file(path)
    animated = False
    try:
        with _open_pil(path) as im:
            animated = _is_animated(im)
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - not an image: a video container
        pass
    try:
        if animated:
            meta = _animated_meta(path)
            timestamps, size = plan(meta)
            return DecodedVideo(meta, timestamps, _read_animated(path, meta, timestamps, size), "pillow")
        meta = _probe_av(path)
        timestamps, size = plan(meta)
        use_decord = backend == "decord" or (
            backend == "auto" and meta.codec in DECORD_CODECS and meta.complete_headers
        )
        if use_decord:
            try:
                frames = _read_decord(path, meta, timestamps, size)
                return DecodedVideo(meta, timestamps, frames, "decord")
            except Exception:  # noqa: BLE001 - ImportError, DECORDError, crashes in reading
                if backend == "decord":
                    raise
        return DecodedVideo(meta, timestamps, _read_pyav(path, meta, timestamps, size), "pyav")
    except Vl3Error:
        raise
    except MemoryError:
        raise _fail(path, "out of memory while decoding") from None
    except Exception as e:  # noqa: BLE001 - decoder errors of every kind
        raise _fail(path, f"cannot decode video ({type(e).__name__}: {e})") from None
