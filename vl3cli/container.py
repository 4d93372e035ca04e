"""What a video file holds, read without decoding it: signature, metadata, display matrix, cuts.

Contract:

- ``signature(path)`` reads the first bytes: "heif" / "avif" (ISO-BMFF stills, by their 'ftyp'
  major brand), "mp4" (any other ISO-BMFF or QuickTime file), "matroska" (also WebM) or None.
- ``probe(path)`` demuxes every packet of the main video stream (``main_video_stream``: not a
  cover picture) with PyAV (reading the file, decoding nothing but the
  first frame) and returns a ``VideoMeta`` whose ``frame_times`` are the frames' own
  presentation times, so variable frame rates are exact, and whose ``duration`` ends with the
  last frame that can be read. ``width`` / ``height`` are the displayed size: ``orientation``
  is the PIL transpose that turns a decoded frame upright according to the container's
  display matrix (phone videos: 90, 180, 270 degrees, mirrored or not). ``truncated`` says
  the file holds less than its headers announce (read errors, cut packets, fewer frames or
  an earlier end than the headers state; Matroska's Duration counts from timestamp 0; the
  samples an MP4's edit list trims away, which FFmpeg leaves out of its index, are not missing)
  or that an MP4 / MOV file ends inside a box (a fragmented MP4 cut short announces nothing).
  Frames without presentation times are timed by their order (``timed_by_order``): an AVI's
  frame is at its slot (its dts; with B-frames FFmpeg makes up pts in decode order), a raw
  stream's (.h264, .hevc) follows the packets' durations, else the rate its headers state
  (``guessed_rate``: FFmpeg's ``average_rate`` for raw streams is its default of 25).
  ``video_streams`` counts the video streams that are not cover pictures.
  ``format`` is FFmpeg's name for the container, ``start_pts`` the timestamp taken as time 0:
  the file's start (the earliest of its streams, as players count time), so a video track that
  begins after the audio has its first frame after 0.
  A frame side data type PyAV cannot name (EXIF, FFmpeg 8) leaves the rotation FFmpeg reads.
  A text file FFmpeg would render as a picture (its ``tty`` demuxer) is "not an image or video file".
- ``av_open(path)`` opens a file with PyAV; a file it cannot open is a one-line MediaError
  saying why (an MP4 cut before its index names the box the file ends in).
- Failures are ``MediaError("<path>: <reason>")`` chained to PyAV's own exception.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vl3cli.errors import MediaError

PROBE_DECODE_PACKETS = 32  # packets fed to the decoder while waiting for the first frame
# FFmpeg's demuxers that render a text file as a picture (tty: .nfo, .ans, .asc, .diz, by the name alone)
TEXT_DEMUXERS = {"tty"}
AVFMT_NOTIMESTAMPS = 0x0080  # FFmpeg's flag of demuxers whose packets carry no times (raw .h264, .hevc...)
# Containers whose headers state the duration: ending much earlier means the file was cut.
HEADER_DURATION_FORMATS = {"mov", "mp4", "matroska", "webm", "avi", "flv", "asf"}
TRUNCATION_SLACK_S = 0.1  # a readable end this close to the announced one is not a cut...
TRUNCATION_SLACK_FRAMES = 2  # ... nor one within this many frames (B-frame delays, rounding)
# File signatures. ISO-BMFF major brands of still pictures ('ftyp' box); any other is a movie.
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"mif1", b"mif2"}
AVIF_BRANDS = {b"avif", b"avis"}  # avis: an animated AVIF, which Pillow reads too
QUICKTIME_BOXES = (b"moov", b"mdat", b"free", b"wide", b"skip")  # old MOV files without 'ftyp'
MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"  # EBML header: Matroska and WebM

Plan = Callable[["VideoMeta"], tuple[list[float], tuple[int, int]]]

# Display matrix (signs of a, b, c, d) -> the PIL operation that shows the decoded frame as
# the matrix says. The matrix maps a decoded pixel (p, q) to (a*p + c*q, b*p + d*q) plus a
# translation, with y pointing down (QuickTime 'tkhd' / FFmpeg AV_FRAME_DATA_DISPLAYMATRIX).
ORIENTATIONS = {
    (1, 0, 0, 1): None,
    (0, 1, -1, 0): Image.Transpose.ROTATE_270,  # (p, q) -> (-q, p): 90 degrees clockwise
    (0, -1, 1, 0): Image.Transpose.ROTATE_90,  # (p, q) -> (q, -p): 90 degrees counter-clockwise
    (-1, 0, 0, -1): Image.Transpose.ROTATE_180,
    (-1, 0, 0, 1): Image.Transpose.FLIP_LEFT_RIGHT,
    (1, 0, 0, -1): Image.Transpose.FLIP_TOP_BOTTOM,
    (0, 1, 1, 0): Image.Transpose.TRANSPOSE,
    (0, -1, -1, 0): Image.Transpose.TRANSVERSE,
}
SWAPS_AXES = {Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
              Image.Transpose.TRANSVERSE}  # fmt: skip


def fail(path, reason: str) -> MediaError:
    return MediaError(f"{os.fspath(path)}: {reason}")


@dataclass(frozen=True)
class VideoMeta:
    """What the decoder knows before decoding. Times are seconds from the video's start."""

    width: int  # displayed size (after the display matrix)
    height: int
    duration: float  # up to the end of the last readable frame
    fps: float | None
    frame_count: int
    frame_times: tuple[float, ...]  # presentation time of each source frame, sorted
    codec: str
    orientation: Image.Transpose | None = None  # decoded frame -> upright; None: as decoded
    truncated: bool = False  # less can be read than the headers announce
    header_duration: float | None = None  # what the headers announce, when they do
    format: str = ""  # FFmpeg's demuxer names, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "mpegts"
    start_pts: int = 0  # the presentation timestamp (stream time base) that is time 0
    # The frames carry no usable times (raw streams; AVI, whose B-frames get made-up ones): the
    # k-th frame decoded from the start of the file is shown at frame_times[k].
    timed_by_order: bool = False
    video_streams: int = 1  # video streams that are not cover pictures (a second camera angle...)


def orientation(matrix) -> Image.Transpose | None:
    """The PIL operation for a 3x3 display matrix (9 numbers, row-major), to the nearest
    multiple of 90 degrees; None for the identity or a degenerate matrix."""
    a, b, _, c, d = (float(x) for x in matrix[:5])
    if abs(a) + abs(d) >= abs(b) + abs(c):
        key = (int(np.sign(a)), 0, 0, int(np.sign(d)))
    else:
        key = (0, int(np.sign(b)), int(np.sign(c)), 0)
    return ORIENTATIONS.get(key)


def mp4_layout_problem(path) -> str | None:
    """For an MP4 / MOV file: what is wrong with its top-level boxes, or None.

    Reads box headers only. A file cut short ends inside a box; without its 'moov' box (the
    index, written last unless the file was made for streaming) nothing can be decoded.
    """
    names, problem, _ = _mp4_boxes(path)
    return problem or (None if "moov" in names else "it has no index ('moov' box)")


def mp4_cut(path) -> bool:
    """Whether an MP4 / MOV file ends inside one of its top-level boxes: it was cut short. The only
    sign of a cut a fragmented MP4 gives (its index, written first, announces nothing)."""
    return _mp4_boxes(path)[2]


def _mp4_boxes(path) -> tuple[list[str], str | None, bool]:
    """(names of the top-level boxes read, what is wrong with them or None, whether the file ends
    inside the last one); box headers only."""
    size = os.path.getsize(path)
    pos, names = 0, []
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            length, name = int.from_bytes(head[:4], "big"), head[4:8].decode("latin-1")
            if length == 1 and len(head) == 16:
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:
                length = size - pos
            if length < 8 or not name.isprintable():
                return names, f"its box structure is corrupt at byte {pos:,}", False
            names.append(name)
            if pos + length > size:
                missing = "" if "moov" in names else " and its index ('moov' box) is missing"
                where = f"the file ends inside its '{name}' box ({size - pos:,} of {length:,} bytes){missing}"
                return names, where, True
            pos += length
    return names, None, False


def signature(path) -> str | None:
    """What the first bytes say: "heif" or "avif" (ISO-BMFF stills, by their 'ftyp' major
    brand), "mp4" (any other ISO-BMFF or QuickTime file), "matroska" (also WebM), or None."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head[4:8] == b"ftyp":
        body = head[8 : max(8, int.from_bytes(head[:4], "big"))]
        major, compatible = body[:4], {body[i : i + 4] for i in range(8, len(body) - 3, 4)}
        if major in AVIF_BRANDS or (major in HEIF_BRANDS and b"avif" in compatible):
            return "avif"
        return "heif" if major in HEIF_BRANDS else "mp4"
    if head[4:8] in QUICKTIME_BOXES:
        return "mp4"
    return "matroska" if head[:4] == MATROSKA_MAGIC else None


def av_open(path):
    import av

    try:
        return av.open(os.fspath(path), metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001 - av.FFmpegError and friends
        reason = getattr(e, "strerror", None) or str(e)
        kind = signature(path)
        if kind is None:
            raise fail(path, f"not an image or video file ({reason})") from e
        raise fail(path, _unreadable_video(path, kind, f"truncated or corrupt video ({reason})")) from e


def _unreadable_video(path, kind: str | None, otherwise: str) -> str:
    """Why nothing can be decoded: an MP4 / MOV file's broken layout when it has one (a file cut
    before its index, whether FFmpeg refuses to open it or opens it and finds no frame), else
    `otherwise`."""
    problem = mp4_layout_problem(path) if kind == "mp4" else None
    if problem:
        return f"truncated video: {problem}, so nothing can be decoded; copy or download it again"
    return otherwise


def _first_frame_matrix(stream, packet) -> tuple | None:
    """The display matrix of the frame(s) this packet completes: a tuple (possibly empty when
    the frame has none), or None when no frame came out yet."""
    import av

    try:
        frames = stream.codec_context.decode(packet)
    except av.FFmpegError:
        return None
    for frame in frames:
        try:
            sides = list(frame.side_data)
        except ValueError:  # a side-data type this PyAV cannot name (EXIF of camera MJPEG, FFmpeg 8)
            return _rotation_matrix(frame.rotation)
        for side in sides:
            if getattr(side.type, "name", "") == "DISPLAYMATRIX":
                return tuple(np.frombuffer(bytes(side), dtype=np.int32)[:9].tolist())
        return ()
    return None


def _rotation_matrix(degrees: float) -> tuple:
    """A display matrix (FFmpeg's 16.16 layout) rotating by ``degrees`` counter-clockwise, the
    angle FFmpeg reads from a frame's matrix (a mirror in it is lost); () for no rotation."""
    quarter = round(degrees / 90) % 4
    if quarter == 0:
        return ()
    cos, sin = ((1, 0), (0, 1), (-1, 0), (0, -1))[quarter]
    return (cos << 16, -sin << 16, 0, sin << 16, cos << 16, 0, 0, 0, 1 << 30)


def main_video_stream(c) -> int | None:
    """Position in ``c.streams.video`` of the video to read: the first that is not a cover picture
    (an MP3's or M4A's artwork is a one-frame 'attached_pic' stream); None when there is none."""
    import av.stream

    for i, s in enumerate(c.streams.video):
        if not s.disposition & av.stream.Disposition.attached_pic:
            return i
    return None


def probe(path) -> VideoMeta:
    """A container video's metadata from its packets (demuxed, not decoded); see the module doc."""
    import av
    import av.stream

    with av_open(path) as c:
        if c.format.name in TEXT_DEMUXERS:
            raise fail(path, "not an image or video file (a text file)")
        main = main_video_stream(c)
        if main is None:
            raise fail(path, "no video stream (audio-only or not a video)")
        s = c.streams.video[main]
        cc = s.codec_context
        if cc is None:  # demuxed but no decoder (SVG, ...)
            raise fail(path, "not an image or video vl3 can read")
        if not cc.width or not cc.height:
            raise fail(path, "video stream has no frame size (corrupt header)")
        tb = s.time_base
        rates = {st.index: (st.time_base.numerator, st.time_base.denominator) for st in c.streams if st.time_base}
        formats = set(c.format.name.split(","))
        # AVI stores no presentation times, only each frame's slot (its dts); with B-frames FFmpeg makes up
        # pts in decode order (x264: dts + 1), so the slots are the times, shown in the order frames decode.
        avi = "avi" in formats
        reordered = bool(cc.has_b_frames)
        pts: list[int] = []
        untimed: list[int] = []  # durations of the packets without any time (raw streams)
        packets = 0  # video packets read whole
        last_pts = last_duration = None
        stream_end = 0.0  # latest end of any packet of any stream, in seconds
        damaged = False
        matrix, fed = None, 0
        try:
            for p in c.demux():
                t = p.pts if p.pts is not None else p.dts
                if avi and p.dts is not None:
                    reordered |= p.pts is not None and p.pts != p.dts
                    t = p.dts
                if p.size == 0:
                    continue
                if p.is_corrupt:  # a packet cut by the end of the file
                    damaged = True
                    continue
                rate = rates.get(p.stream_index)
                if t is not None and rate:
                    stream_end = max(stream_end, (t + (p.duration or 0)) * rate[0] / rate[1])
                if p.stream_index != s.index:
                    continue
                packets += 1
                if matrix is None and fed < PROBE_DECODE_PACKETS:
                    fed += 1
                    matrix = _first_frame_matrix(s, p)
                if t is None and not p.is_discard:
                    untimed.append(p.duration or 0)
                if t is None or p.is_discard:
                    continue
                pts.append(t)
                if last_pts is None or t >= last_pts:
                    last_pts, last_duration = t, p.duration
        except av.FFmpegError:
            damaged = True  # a read error: keep what was read
        if c.format.flags & AVFMT_NOTIMESTAMPS:
            # A raw stream's average_rate is FFmpeg's default (25); the rate its headers state is guessed_rate's
            header_fps = float(s.guessed_rate or cc.framerate or s.average_rate or 0) or None
        else:
            header_fps = float(s.average_rate or s.guessed_rate or 0) or None
        start = s.start_time if s.start_time is not None else (min(pts) if pts else 0)
        num, den = (tb.numerator, tb.denominator) if tb else (1, 1)
        if c.start_time is not None and tb:
            # Time 0 is the file's start, as players count it (and subtitles are timed), not the video
            # track's own: a video that begins after its audio (an edit list's empty edit, a cut made
            # with stream copy) has its first frame at that later time.
            start = min(start, round(c.start_time * den / (num * av.time_base)))
        times = sorted({(p - start) * num / den for p in pts if p >= start})  # exact ints, one rounding
        timed_by_order = avi and reordered
        if not times and untimed and tb and all(untimed):  # no timestamps at all (raw streams): the durations
            ends = np.cumsum([0, *untimed])
            times, timed_by_order = [int(e) * num / den for e in ends[:-1]], True
            last_pts, last_duration, start = int(ends[-2]), untimed[-1], 0
        elif not times and packets and header_fps:  # nor durations
            times, timed_by_order = [i / header_fps for i in range(packets)], True
        if not times:
            raise fail(path, _unreadable_video(path, signature(path), "truncated or corrupt video: no frame could be read"))
        if last_duration and tb and last_pts is not None and last_pts >= start:
            tail = last_duration * num / den
        elif len(times) > 1:
            tail = times[-1] - times[-2]
        else:
            tail = 1 / header_fps if header_fps else 0.1
        duration = times[-1] + tail
        first = (c.start_time or 0) / av.time_base
        header_duration = c.duration / av.time_base if c.duration else None
        if header_duration and "matroska" in formats and header_duration > first:
            # Matroska's Duration is where the last frame ends, counted from timestamp 0 (FFmpeg writes
            # 3603 s for 3 s of a recording whose times start at 3600 s); the others' is the length.
            header_duration -= first
        announced = s.frames or 0
        if "mov" in formats:  # an edit list that trims the start (a lossless trim) takes samples out of the index
            try:
                announced = min(announced, len(s.index_entries)) if s.index_entries else announced
            except Exception:  # noqa: BLE001 - a PyAV without index_entries: the sample count
                pass
        truncated = damaged or announced > packets
        if signature(path) == "mp4" and mp4_cut(path):  # a fragmented MP4 announces nothing else
            truncated = True
        if header_duration and HEADER_DURATION_FORMATS & formats:
            span = stream_end - first
            if header_duration - span > max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAMES * duration / len(times)):
                truncated = True
        op = orientation(matrix) if matrix else None
        width, height = (cc.height, cc.width) if op in SWAPS_AXES else (cc.width, cc.height)
        streams = sum(1 for st in c.streams.video if not st.disposition & av.stream.Disposition.attached_pic)
        return VideoMeta(
            width, height, duration, len(times) / duration, len(times), tuple(times), cc.name, op, truncated,
            header_duration, c.format.name, start, timed_by_order, streams,
        )  # fmt: skip
