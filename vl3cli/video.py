"""Decoding the sampled frames of a container video (MP4, MOV, MKV, WebM, AVI, ...).

Contract: ``decode(path, meta, timestamps, size, backend)`` (``meta`` from ``container.probe``)
returns the frame shown at each timestamp (the last frame starting at or before it), upright
and resized to ``size`` (PIL bicubic), as (t, h, w, 3) uint8, and how far decoding got.
decord (``get_batch`` on small chunks) is used only for files it reads correctly: a container
with an index (MP4 / MOV, Matroska / WebM, AVI, as FFmpeg names the format; not MPEG-TS / PS),
a known codec (not HEVC: after a seek to an open-GOP keyframe decord 0.6 miscounts frames), one
video stream (decord picks its own among several), frames timed by the container (not an AVI
with B-frames), no display matrix (decord 0.6 rotates by itself and gets 90/270 degrees wrong)
and nothing cut; PyAV reads everything else, seeking to the keyframe before a wanted frame when
that skips decoding (a seek that lands after it is retried further back, then replaced by
reading on from the start, as is a seek the demuxer refuses: raw .h264 / .hevc streams), skipping
damaged packets. Frames without usable times (``meta.timed_by_order``: raw streams, AVI with
B-frames) are timed by their order from the start of the file, which is therefore read from its
start, never seeked in. When decoding ends before the last timestamp,
only the frames before that point come back: frames are never repeated past the real end.

Decoding inside ``with cancellable(cancelled):`` (a reader thread of the server, whose client may
leave) asks ``cancelled()`` between packets and frames and stops with ``DecodeCancelled`` once it
answers True: an abandoned video frees its thread at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from PIL import Image

from vl3cli.container import VideoMeta, av_open, main_video_stream
from vl3cli.errors import MediaError
from vl3cli.sampling import EPS, frame_index

# Codecs decord 0.6 decodes reliably; anything else (AV1 above all) goes to PyAV. Not HEVC: after a
# seek to a CRA keyframe (x265's default open GOPs) decord drops the leading pictures and miscounts.
DECORD_CODECS = {"h264", "vp8", "vp9", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg"}
# Containers with an index (FFmpeg's demuxer names), where decord's seeks land on the frame asked
# for; in MPEG-TS / M2TS / MPEG-PS and raw streams they land a keyframe interval off.
DECORD_FORMATS = {"mov", "mp4", "matroska", "webm", "avi"}
DECORD_CHUNK = 4  # full-size frames fetched per get_batch call (4 x 1080p RGB = 25 MB)
SEEK_MIN_GAP = 2.0  # seconds: closer targets are reached by decoding on, not seeking
SEEK_BACKOFF = (0.0, 1.0, 5.0, 20.0)  # seconds before t to seek to, in turn, until one lands before t
# A context variable, not an argument: the reader sets it around its whole item, and the layers in
# between (preprocess, media) need not pass it on.
_CANCELLED: ContextVar[Callable[[], bool] | None] = ContextVar("vl3_decode_cancelled", default=None)


class DecodeCancelled(MediaError):
    """Nobody wants the frames any more (``cancellable``'s ``cancelled()`` answered True)."""


@contextmanager
def cancellable(cancelled: Callable[[], bool]):
    """Decoding in this thread, inside the block, stops (``DecodeCancelled``) once ``cancelled()`` is True."""
    token = _CANCELLED.set(cancelled)
    try:
        yield
    finally:
        _CANCELLED.reset(token)


def check_cancelled() -> None:
    """Called between packets and frames: raises ``DecodeCancelled`` when the frames are no longer wanted."""
    cancelled = _CANCELLED.get()
    if cancelled is not None and cancelled():
        raise DecodeCancelled("decoding cancelled: nobody wants the frames any more")


def upright(im: Image.Image, op: Image.Transpose | None) -> Image.Image:
    return im if op is None else im.transpose(op)


def resize(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _read_decord(path, meta: VideoMeta, timestamps, size, vr=None) -> np.ndarray:
    import decord

    if meta.orientation is not None:
        raise RuntimeError("decord 0.6 mis-decodes videos with a display matrix (rotated videos); use PyAV")
    if not indexed(meta):
        raise RuntimeError(f"decord seeks to the wrong frames in {meta.format} files (no index); use PyAV")
    if meta.timed_by_order:
        raise RuntimeError(f"decord seeks to the wrong frames in {meta.format} files with B-frames; use PyAV")
    if meta.codec == "hevc":
        raise RuntimeError("decord 0.6 seeks to the wrong frames in HEVC with open GOPs; use PyAV")
    if meta.video_streams != 1:
        raise RuntimeError(f"decord may read another of the file's {meta.video_streams} video streams; use PyAV")
    vr = vr if vr is not None else decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
    n = len(vr)
    if n != meta.frame_count:
        raise RuntimeError(f"decord sees {n} frames where the container has {meta.frame_count}")
    wanted: dict[int, list[int]] = {}  # source frame -> positions in the output
    for j, t in enumerate(timestamps):
        wanted.setdefault(frame_index(meta.frame_times, t), []).append(j)
    unique = sorted(wanted)
    out = np.empty((len(timestamps), size[1], size[0], 3), np.uint8)  # (t, h, w, 3)
    for i in range(0, len(unique), DECORD_CHUNK):
        check_cancelled()
        chunk = unique[i : i + DECORD_CHUNK]
        batch = vr.get_batch(chunk).asnumpy()  # (len(chunk), H, W, 3) full size
        for idx, frame in zip(chunk, batch):
            out[wanted[idx]] = resize(Image.fromarray(frame), size)
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

    def __init__(self, path, meta: VideoMeta):
        self.path = path
        self._open()
        self.tb = float(self.s.time_base)
        self.start_pts = meta.start_pts  # as probe counts times (a raw stream has no start time)
        self.fps = meta.fps or 1.0
        self.by_order = meta.frame_times if meta.timed_by_order else None  # frame k decoded from the start
        self.frames = None  # decode iterator
        self.cur = self.cur_t = None  # last frame at or before the target, and its time
        self.nxt = self.nxt_t = None  # a frame decoded past the target, kept for the next one
        self.exhausted = False  # the iterator has no more frames
        self.count = 0

    def _open(self) -> None:
        self.c = av_open(self.path)
        self.s = self.c.streams.video[main_video_stream(self.c)]
        self.s.thread_type = "AUTO"

    def close(self) -> None:
        self.c.close()

    def _decode(self):
        """Frames from here on; a damaged packet loses its own frame, not the rest."""
        import av

        for packet in self.c.demux(self.s):
            check_cancelled()
            if packet.is_corrupt:  # cut by the end of the file: the decoder would choke on it
                continue
            try:
                yield from packet.decode()
            except MemoryError:  # av's ENOMEM is an FFmpegError too: out of memory, not a damaged packet
                raise
            except av.FFmpegError:
                continue

    def position(self) -> float | None:
        return self.nxt_t if self.nxt is not None else self.cur_t

    def restart(self, t: float | None) -> None:
        """Seek to the keyframe at or before ``t``; None: back to the very start of the file
        (reopened: in MPEG-TS / PS a seek to the start time lands on a later keyframe; after a
        seek the demuxer refused, it starts afresh)."""
        if t is None:
            if self.frames is not None:
                self.close()
                self._open()
            self.count = 0
        else:
            target = int(max(t, 0.0) / self.tb) + self.start_pts
            self.frames = self.frames or iter(())  # moved or not, the file is reopened for the start
            self.c.seek(target, stream=self.s, backward=True, any_frame=False)
        self.frames = self._decode()
        self.cur = self.cur_t = self.nxt = self.nxt_t = None
        self.exhausted = False

    def advance(self, t: float) -> None:
        """Decode until the next frame starts after ``t``; ``cur`` is then the frame shown at t."""
        import av

        while True:
            if self.nxt is None:
                try:
                    self.nxt = next(self.frames, None)
                except MemoryError:
                    raise
                except av.FFmpegError:
                    self.nxt = None  # a read error: the end of what can be decoded
                if self.nxt is None:
                    self.exhausted = True
                    return
                pts, k = self.nxt.pts, self.count
                if self.by_order is not None:  # only ever decoded from the start (see _PyAVReader.can_seek)
                    last = len(self.by_order) - 1
                    self.nxt_t = self.by_order[k] if k <= last else self.by_order[last] + (k - last) / self.fps
                else:
                    self.nxt_t = (pts - self.start_pts) * self.tb if pts is not None else k / self.fps
                self.count += 1
            if self.nxt_t > t + EPS:
                return
            self.cur, self.cur_t, self.nxt = self.nxt, self.nxt_t, None


def _next_frame_time(meta: VideoMeta, t: float) -> float:
    """Start of the frame after the one shown at ``t`` (the end of the clip after the last)."""
    i = frame_index(meta.frame_times, t) + 1
    return meta.frame_times[i] if i < len(meta.frame_times) else meta.duration


class _PyAVReader:
    """PyAV decoding that only moves forward: successive `read` calls (the windows of a long
    video, in order) share one open file and one decoding position, seeking ahead past gaps."""

    def __init__(self, path, meta: VideoMeta):
        self.meta = meta
        self.cur = _Cursor(path, meta)
        self.keys = _keyframe_times(self.cur.s, self.cur.start_pts)
        self.gop = 0.0  # largest keyframe gap inferred so far when the file has no index
        self.can_seek = not meta.timed_by_order  # frames timed by their order: counted from the start
        self.back = 0  # index in SEEK_BACKOFF of the first distance to try
        self.last = self.last_t = None  # the last frame converted, and its time

    def close(self) -> None:
        self.cur.close()

    def _seek(self, t: float, pos: float | None) -> None:
        """Decode from a keyframe before ``t`` up to ``t``. A seek that lands after ``t`` (files
        without an index: MPEG-TS / PS) is retried further back; one whose frames carry times the
        file's packets do not (MPEG-PS guesses them after a seek), or that the demuxer refuses (raw
        streams: FFmpeg's EPERM), gives seeking up for reading on from the start of the file."""
        import av

        cur, times = self.cur, self.meta.frame_times
        for k in range(self.back, len(SEEK_BACKOFF)):
            if t - SEEK_BACKOFF[k] <= 0:
                cur.restart(None)
                return
            try:
                cur.restart(t - SEEK_BACKOFF[k])
            except MemoryError:
                raise
            except av.FFmpegError:  # the demuxer cannot seek
                break
            cur.advance(t)
            if cur.cur is None:
                continue
            if abs(times[frame_index(times, cur.cur_t)] - cur.cur_t) > EPS:
                break
            self.back = k  # later seeks start with the distance that worked
            if pos is not None and cur.cur_t <= pos + EPS:
                self.gop = max(self.gop, t - cur.cur_t)  # the seek did not get us past pos
            return
        self.can_seek = False
        cur.restart(None)

    def read(self, timestamps, size) -> tuple[np.ndarray, float | None]:
        """The frames for ``timestamps`` (after any read before), and None; or, when decoding
        ends before the last one, the frames before that point and where decodable content ends."""
        meta, cur = self.meta, self.cur
        out = np.empty((len(timestamps), size[1], size[0], 3), np.uint8)  # (t, h, w, 3)
        previous = None  # this call's last frame, as converted at this call's size
        for j, t in enumerate(timestamps):
            pos = cur.position()
            if cur.frames is None and (not self.can_seek or t <= SEEK_MIN_GAP):
                cur.restart(None)
            elif cur.frames is None or (self.can_seek and t - pos > SEEK_MIN_GAP):
                if self.keys:  # seek only when a keyframe lies between here and t
                    want = cur.frames is None or self.keys[frame_index(self.keys, t)] > pos + EPS
                else:
                    want = cur.frames is None or t - pos > self.gop
                if want:
                    self._seek(t, pos)
            cur.advance(t)
            shown = meta.frame_times[frame_index(meta.frame_times, t)]
            if cur.exhausted and cur.nxt is None and (cur.cur is None or cur.cur_t < shown - EPS):
                # The frame shown at t cannot be decoded: what decodes ends with the last frame seen.
                seen = cur.cur_t if cur.cur is not None else self.last_t
                return out[:j].copy(), (0.0 if seen is None else _next_frame_time(meta, seen))
            if cur.cur is not None:
                frame, frame_t = cur.cur, cur.cur_t
            else:
                # Only when decoding from the start of the file (`_seek` never leaves cur empty): its
                # first frames do not decode (a recording cut mid-GOP), the first that does stands in.
                frame, frame_t = cur.nxt, cur.nxt_t
            if frame is self.last and previous is not None:
                out[j] = previous
            else:
                out[j] = resize(upright(frame.to_image(), meta.orientation), size)
                self.last, self.last_t = frame, frame_t
            previous = out[j]
        return out, None


def _read_pyav(path, meta: VideoMeta, timestamps, size) -> tuple[np.ndarray, float | None]:
    reader = _PyAVReader(path, meta)
    try:
        return reader.read(timestamps, size)
    finally:
        reader.close()


def indexed(meta: VideoMeta) -> bool:
    """Whether the container has an index decord seeks by (see ``DECORD_FORMATS``)."""
    return bool(DECORD_FORMATS & set(meta.format.split(",")))


def uses_decord(meta: VideoMeta, backend: str) -> bool:
    """Whether ``decode`` tries decord first for this video."""
    if backend != "auto":
        return backend == "decord"
    return (
        indexed(meta) and meta.codec in DECORD_CODECS and meta.orientation is None and not meta.truncated
        and meta.video_streams == 1 and not meta.timed_by_order
    )  # fmt: skip


def decode(
    path, meta: VideoMeta, timestamps: list[float], size: tuple[int, int], backend: str
) -> tuple[np.ndarray, str, float | None]:
    """(frames, backend used, end): ``end`` is None when every timestamp was decoded; otherwise
    ``frames`` holds the first ones only and ``end`` is where decodable content stops (s)."""
    if uses_decord(meta, backend):
        try:
            return _read_decord(path, meta, timestamps, size), "decord", None
        except Exception as e:  # noqa: BLE001 - ImportError, DECORDError, crashes in reading
            if backend == "decord" or isinstance(e, DecodeCancelled):
                raise
    frames, end = _read_pyav(path, meta, timestamps, size)
    return frames, "pyav", end


def decode_windows(path, meta: VideoMeta, windows, backend: str) -> Iterator[tuple[np.ndarray, str, float | None]]:
    """``decode`` for the windows of a long video, in order, in one forward pass over the file:
    yields (frames, backend used, end) per window (``windows``: (timestamps, size) pairs,
    consecutive in time); after a window whose ``end`` is set, nothing more can be decoded."""
    pending = list(windows)
    if uses_decord(meta, backend):
        try:
            import decord

            reader = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
            while pending:
                frames = _read_decord(path, meta, *pending[0], reader)
                pending.pop(0)
                yield frames, "decord", None
            return
        except Exception as e:  # noqa: BLE001 - ImportError, DECORDError, crashes in reading: PyAV reads the rest
            if backend == "decord" or isinstance(e, DecodeCancelled):
                raise
    reader = _PyAVReader(path, meta)
    try:
        for timestamps, size in pending:
            frames, end = reader.read(timestamps, size)
            yield frames, "pyav", end
            if end is not None:
                return
    finally:
        reader.close()


def detect_cuts(path, meta: VideoMeta, threshold: float = 10.0, scale: int = 4) -> list[float]:
    """Times (s) where a new shot starts: FFmpeg's `scdet` filter on frames shrunk `scale` times,
    in planar RGB (so a cut between two colours of equal brightness counts too). Frames are decoded
    one at a time: memory stays one small frame whatever the length of the video."""
    import av
    import av.filter

    cuts = []
    with av_open(path) as container:
        stream = container.streams.video[main_video_stream(container)]
        stream.thread_type = "AUTO"
        start_pts = meta.start_pts
        tb = float(stream.time_base)
        pulled = [0]  # frames out of the graph: their times when they carry none (meta.timed_by_order)
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("scale", f"max(2\\,iw/{scale}):max(2\\,ih/{scale})"),
                 graph.add("format", "gbrp"), graph.add("scdet", f"threshold={threshold}:sc_pass=0"), graph.add("buffersink")]  # fmt: skip
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()

        def drain() -> None:
            while True:
                try:
                    frame = graph.pull()
                except (av.BlockingIOError, av.EOFError):
                    return
                k, pulled[0] = pulled[0], pulled[0] + 1
                score = float(frame.metadata.get("lavfi.scd.score", 0.0))
                if score >= threshold and meta.timed_by_order and k < len(meta.frame_times):
                    cuts.append(meta.frame_times[k])
                elif score >= threshold and frame.pts is not None and not meta.timed_by_order:
                    cuts.append((frame.pts - start_pts) * tb)

        for packet in container.demux(stream):
            check_cancelled()
            if packet.is_corrupt:
                continue
            try:
                frames = packet.decode()
            except MemoryError:
                raise
            except av.FFmpegError:
                continue
            for frame in frames:
                graph.push(frame)
                drain()
    return [t for t in cuts if 0 < t < meta.duration]
