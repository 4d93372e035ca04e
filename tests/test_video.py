"""Container videos as phones and the web make them: rotated, variable frame rate, cut short.

References are independent of vl3's reading code: the display matrix is written into the
file's 'tkhd' box by hand (ISO/IEC 14496-12 semantics applied to the picture's corners give
where a viewer sees the marker); the VFR clip's frames carry the second they belong to as
their grey level; a cut file's decodable frames are listed by a plain PyAV decode.
"""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
from media_factory import (
    cut,
    exif_jpeg,
    faststart_copy,
    frame_pixels,
    index_picture,
    make_camera_mjpeg,
    make_clip,
    make_numbered,
    make_two_tracks,
    make_vfr_clip,
    make_video,
    marked_picture,
    read_index,
    require_encoder,
    second_level,
    set_track_matrix,
    trim_with_edit_list,
)
from PIL import Image, ImageOps

from vl3cli import container, media, video
from vl3cli.errors import MediaError
from vl3cli.preprocess import MediaOptions, ProcessorConfig, plan_video, prepare_visual

CONFIG = ProcessorConfig()

# (a, b, c, d) of the display matrix: a coded pixel (p, q) is shown at (a*p + c*q, b*p + d*q).
MATRICES = {
    "identity": (1, 0, 0, 1),
    "90 clockwise (phone held upright)": (0, 1, -1, 0),
    "180": (-1, 0, 0, -1),
    "90 counter-clockwise": (0, -1, 1, 0),
    "mirrored": (-1, 0, 0, 1),
    "transposed": (0, 1, 1, 0),
}


def shown(abcd, size: tuple[int, int], side: int = 16) -> tuple[str, tuple[int, int]]:
    """Which corner of the displayed picture holds the coded top-left block, and the displayed
    (width, height): the matrix applied to the block's centre and to the frame's corners."""
    a, b, c, d = abcd
    w, h = size
    corners = [(a * p + c * q, b * p + d * q) for p in (0, w) for q in (0, h)]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    x = a * side / 2 + c * side / 2 - min(xs)
    y = b * side / 2 + d * side / 2 - min(ys)
    return ("top" if y < height / 2 else "bottom") + "-" + ("left" if x < width / 2 else "right"), (width, height)


def bright_corner(frame: np.ndarray, side: int = 8) -> str:
    corners = {
        "top-left": frame[:side, :side], "top-right": frame[:side, -side:],
        "bottom-left": frame[-side:, :side], "bottom-right": frame[-side:, -side:],
    }  # fmt: skip
    means = {k: float(v.mean()) for k, v in corners.items()}
    best = max(means, key=means.get)
    assert means[best] > 200 and sorted(means.values())[-2] < 50, means  # one marker, clearly
    return best


@pytest.mark.parametrize("a,b,c,d", [(1, 0, 0, 1), (0, 1, -1, 0), (0, -1, 1, 0), (-1, 0, 0, -1),
                                     (-1, 0, 0, 1), (1, 0, 0, -1), (0, 1, 1, 0), (0, -1, -1, 0)])  # fmt: skip
def test_orientation_of_every_axis_aligned_matrix(a, b, c, d):
    """The PIL operation chosen for a matrix moves every pixel where the matrix sends it."""
    w, h = 5, 3
    coded = np.arange(w * h, dtype=np.uint8).reshape(h, w)  # each pixel its own value
    op = container.orientation([a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30])  # FFmpeg's 16.16 layout
    shown_ = np.asarray(Image.fromarray(coded).transpose(op) if op is not None else Image.fromarray(coded))
    xs = [a * p + c * q for p in range(w) for q in range(h)]
    ys = [b * p + d * q for p in range(w) for q in range(h)]
    for p in range(w):
        for q in range(h):
            assert shown_[b * p + d * q - min(ys), a * p + c * q - min(xs)] == coded[q, p]


def test_orientation_rounds_to_quarter_turns():
    deg30 = [round(65536 * x) for x in (0.866, 0.5, 0, -0.5, 0.866, 0)] + [0, 0, 1 << 30]
    assert container.orientation(deg30) is None  # nearest quarter turn: none
    deg80 = [round(65536 * x) for x in (0.174, 0.985, 0, -0.985, 0.174, 0)] + [0, 0, 1 << 30]
    assert container.orientation(deg80) == Image.Transpose.ROTATE_270  # nearest: 90 degrees clockwise


@pytest.fixture(scope="module", params=["mp4", "mov"])
def rotated(request, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp(f"rotated-{request.param}")
    out = {}
    for i, (name, abcd) in enumerate(MATRICES.items()):
        path = make_clip(d / f"clip{i}.{request.param}", [marked_picture((64, 48))] * 10, range(10), Fraction(10))
        out[name] = set_track_matrix(path, abcd)
    return out


@pytest.mark.parametrize("name", list(MATRICES))
def test_rotated_videos_are_upright(rotated, name):
    path, abcd = rotated[name], MATRICES[name]
    corner, (width, height) = shown(abcd, (64, 48))
    with av.open(str(path)) as c:  # FFmpeg sees a display matrix in the file
        assert (next(c.decode(video=0)).rotation != 0) == (abcd != (1, 0, 0, 1))
    for backend in ("auto", "pyav"):
        v = prepare_visual(path, CONFIG, MediaOptions(prune=False), decoder=backend)
        assert (v.source_width, v.source_height) == (width, height)
        assert (v.resized_width > v.resized_height) == (width > height)  # the budget is planned upright
        decoded = media.read_video(path, lambda meta: ([0.0, 0.5], (meta.width, meta.height)), backend=backend)
        assert decoded.frames.shape == (2, height, width, 3)
        assert [bright_corner(f) for f in decoded.frames] == [corner, corner], name
    if abcd != (1, 0, 0, 1):
        assert v.decoder == "pyav"  # decord 0.6 rotates 90/270-degree videos wrongly: never used for them
        with pytest.raises(MediaError, match="rotated"):
            media.read_video(path, lambda meta: ([0.0], (meta.width, meta.height)), backend="decord")


@pytest.fixture(scope="module")
def camera_mjpeg(tmp_path_factory) -> dict:
    """Motion-JPEG recordings whose frames are camera JPEGs with EXIF (orientation 1, 3, 6, 8)."""
    d = tmp_path_factory.mktemp("camera")
    jpegs = {o: [exif_jpeg(frame_pixels(i, (64, 48)), o) for i in range(5)] for o in (1, 3, 6, 8)}
    files = {(o, ext): make_camera_mjpeg(d / f"cam{o}.{ext}", jpegs[o]) for o in jpegs for ext in ("avi", "mov")}
    return {"files": files, "jpegs": jpegs}


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("ext", ["avi", "mov"])
@pytest.mark.parametrize("exif_orientation", [1, 3, 6, 8])
def test_camera_mjpeg_with_exif_is_upright(camera_mjpeg, exif_orientation, ext, backend):
    """FFmpeg 8 reports the JPEGs' EXIF as frame side data PyAV cannot name: the video still reads,
    turned as Pillow turns the same JPEG by its EXIF orientation."""
    path = camera_mjpeg["files"][exif_orientation, ext]
    v = media.read_video(path, lambda meta: ([0.0, 0.3], (meta.width, meta.height)), backend=backend)
    for frame, jpeg in zip(v.frames, camera_mjpeg["jpegs"][exif_orientation][::3]):
        with Image.open(io.BytesIO(jpeg)) as im:
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32)
        assert frame.shape == expected.shape
        assert np.abs(frame - expected).mean() < 6


@pytest.fixture(scope="module")
def vfr(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("vfr")
    return {ext: make_vfr_clip(d / f"vfr.{ext}") for ext in ("mp4", "mkv")}


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_variable_frame_rate_uses_presentation_times(vfr, ext, backend):
    """30 fps for 5 s then 5 fps: at 2 fps, frames come from the seconds they are reported at,
    and the reported times are those of the frames used (the 5 fps frames start every 0.2 s)."""
    options = MediaOptions(fps=2, prune=False)
    v = media.read_video(vfr[ext], plan_video(vfr[ext], CONFIG, options), backend=backend)
    assert v.backend == backend
    expected = [k / 2 for k in range(10)] + [s + x for s in range(5, 10) for x in (0.0, 0.4)]
    assert v.timestamps == pytest.approx(expected, abs=1e-6)
    levels = [float(f.mean()) for f in v.frames]
    assert levels == pytest.approx([second_level(int(t + 1e-6)) for t in v.timestamps], abs=4)
    assert v.meta.frame_count == 175 and v.meta.duration == pytest.approx(10.0, abs=0.2)


# Containers without an index, as camcorders (AVCHD .MTS), TV recorders (.ts) and DVDs (.mpg) write
# them: name -> (file, muxer, muxer options, codec, frames, frame rate, keyframe interval, --fps).
UNINDEXED = {
    "m2ts": ("cam.mts", "mpegts", {"mpegts_m2ts_mode": "1"}, "h264", 240, 30, 15, 1.0),
    "mpeg-ps": ("tv.mpg", "mpeg", {}, "mpeg2video", 500, 25, 100, 1.0),
    "ts-long-gop": ("rec.ts", "mpegts", {}, "h264", 300, 10, 50, 0.3),
}


@pytest.fixture(scope="module")
def unindexed(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("unindexed")
    return {
        name: make_numbered(d / file, frames, rate, codec, gop=gop, fmt=fmt, options=options)
        for name, (file, fmt, options, codec, frames, rate, gop, _) in UNINDEXED.items()
    }


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("name", list(UNINDEXED))
def test_unindexed_containers_give_the_frames_asked_for(unindexed, name, backend):
    """Frame i shows i: the frame decoded for time t is round(t * rate), decord (which seeks a
    keyframe interval off in MPEG-TS / PS) or not, seeking PyAV (which lands late there) or not."""
    *_, rate, _, fps = UNINDEXED[name]
    path = unindexed[name]
    v = media.read_video(path, plan_video(path, CONFIG, MediaOptions(fps=fps)), backend=backend)
    assert v.backend == "pyav" and len(v.timestamps) >= 8
    assert [read_index(f) for f in v.frames] == [round(t * rate) for t in v.timestamps]
    for t in (v.timestamps[-1], v.timestamps[len(v.timestamps) // 2]):  # a seek before any decoding
        frames, _ = video._read_pyav(path, v.meta, [t], (64, 48))
        assert read_index(frames[0]) == round(t * rate)


def test_unindexed_windows_in_one_pass(unindexed):
    """Windows of a long recording read forward (--segments): each the right frames."""
    path = unindexed["ts-long-gop"]
    meta = container.probe(path)
    windows = [([t + k * 1.5 for k in range(4)], (64, 48)) for t in (0.0, 6.2, 12.1, 21.7)]
    got = [[read_index(f) for f in frames] for frames, _, _ in video.decode_windows(path, meta, windows, "auto")]
    assert got == [[int(t * 10) for t in ts] for ts, _ in windows]


def test_decord_is_refused_for_unindexed_containers(unindexed):
    path = unindexed["m2ts"]
    with pytest.raises(MediaError, match="mpegts"):
        media.read_video(path, lambda meta: ([0.0, 1.0], (meta.width, meta.height)), backend="decord")


CUTS = (0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def cut_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cut")
    full = {
        "index-at-end.mp4": make_video(d / "full.mp4", seconds=4.0, fps=10, gop=10),
        "mkv": make_video(d / "full.mkv", seconds=4.0, fps=10, gop=10),
        "webm": make_video(d / "full.webm", "vp9", seconds=4.0, fps=10, gop=10),
    }
    full["faststart.mp4"] = faststart_copy(full["index-at-end.mp4"], d / "faststart.mp4")
    return {
        (kind, f): cut(path, d / f"cut{int(f * 100)}-{kind.replace('.', '-')}{path.suffix}", f)
        for kind, path in full.items()
        for f in CUTS
    }


def decodable_frames(path) -> list[int]:
    """Frame numbers (pts * 10 fps) a plain PyAV decode gets out of the file, damaged packets skipped."""
    got = []
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            for packet in c.demux(s):
                try:
                    got += [round(float(f.pts * s.time_base) * 10) for f in packet.decode()]
                except av.FFmpegError:
                    pass
    except av.FFmpegError:
        pass
    return got


def frame_number(frame: np.ndarray) -> int:
    """The frame number a media_factory picture carries in its blue channel (i * 37 mod 256)."""
    blue = float(np.median(frame[..., 2]))
    return min(range(40), key=lambda i: abs(int(frame_pixels(i, (64, 48))[0, 0, 2]) - blue))


@pytest.mark.parametrize("fraction", CUTS)
def test_truncated_mp4_without_index_fails_in_one_line(cut_files, fraction):
    path = cut_files[("index-at-end.mp4", fraction)]
    with pytest.raises(MediaError) as info:
        prepare_visual(path, CONFIG, MediaOptions())
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: truncated video") and "'moov'" in message
    # --debug shows the decoder's own error where FFmpeg refused the file; cut inside its index (0.9),
    # FFmpeg opens some encodes' files anyway and finds no frame: the same diagnosis, nothing chained
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, av.FFmpegError)


def test_mp4_cut_before_its_first_frame_names_the_cut(tmp_path):
    """A streaming (index-first) MP4 cut a few bytes into its data: FFmpeg opens it, no frame comes."""
    data = faststart_copy(make_video(tmp_path / "full.mp4", seconds=1.0, fps=10), tmp_path / "fast.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: data.index(b"mdat") + 20])
    with pytest.raises(MediaError) as info:
        prepare_visual(path, CONFIG, MediaOptions())
    message = str(info.value)
    assert message.startswith(f"{path}: truncated video: the file ends inside its 'mdat' box (24 of "), message
    assert info.value.__cause__ is None  # FFmpeg opened it: the diagnosis is vl3's, from the file's layout


@pytest.mark.parametrize("fraction", CUTS)
@pytest.mark.parametrize("kind", ["faststart.mp4", "mkv", "webm"])
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_truncated_video_captions_what_decodes(cut_files, kind, fraction, backend):
    path = cut_files[(kind, fraction)]
    readable = decodable_frames(path)
    try:
        v = media.read_video(path, plan_video(path, CONFIG, MediaOptions()), backend=backend)
    except MediaError as e:
        assert not readable, f"{len(readable)} frames decode, yet: {e}"  # failing is for files with nothing to show
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        return
    numbers = [frame_number(f) for f in v.frames]
    assert numbers == [round(t * 10) for t in v.timestamps]  # the frame each timestamp names, none repeated
    assert max(numbers) <= max(readable)
    assert v.timestamps[-1] < v.meta.duration <= (max(readable) + 1) / 10 + 1e-6 < 4.0
    (warning,) = v.warnings
    assert "truncated" in warning and f"{v.meta.duration:.1f} s of 4.0 s" in warning


QUIET = """
import sys
from vl3cli import container, media, video
from vl3cli.errors import MediaError
if sys.argv[1] != "untouched":
    media.native_logging(sys.argv[1] == "debug")
for path in sys.argv[2:]:
    for decoder in ("pyav", "decord"):
        try:
            media.read_video(path, lambda meta: ([0.0, meta.duration / 2], (64, 48)), backend=decoder)
        except MediaError:
            pass
print("done")
"""


def test_native_libraries_are_quiet_unless_debugging(cut_files):
    """Cut files through both decoders: nothing on the process's stderr (fd 2) unless debugging."""
    files = [
        str(cut_files[k]) for k in (("webm", 0.3), ("mkv", 0.6), ("faststart.mp4", 0.6), ("index-at-end.mp4", 0.6))
    ]

    def stderr(mode: str) -> str:
        p = subprocess.run([sys.executable, "-c", QUIET, mode, *files], capture_output=True, text=True, timeout=120)
        assert p.stdout == "done\n", p.stderr
        return p.stderr

    assert "Read error" in stderr("untouched")  # decord's own libav talks by default
    assert stderr("quiet") == ""
    loud = stderr("debug")
    assert "Read error" in loud and "moov atom not found" in loud  # decord's libav and PyAV's


@pytest.mark.parametrize("suffix,codec", [("mkv", "h264"), ("webm", "vp9")])
def test_matroska_starting_late_is_whole_and_its_cut_is_not(tmp_path, suffix, codec):
    """A recording whose times start at 3600 s (FFmpeg writes Duration 3603 s for its 3 s): whole,
    no warning; cut at 80 %, the warning, announcing 3 s. Frame i shows i, decoded at (pts - 3600 s) * 10."""
    late = make_clip(tmp_path / f"late.{suffix}", (index_picture(i) for i in range(30)), range(36000, 36030), Fraction(10), codec, gop=10)
    with av.open(str(late)) as c:
        assert c.start_time / av.time_base == pytest.approx(3600) and c.duration / av.time_base == pytest.approx(3603, abs=0.2)
    v = media.read_video(late, plan_video(late, CONFIG, MediaOptions(prune=False)))
    assert v.warnings == [] and not v.meta.truncated and v.meta.header_duration == pytest.approx(3.0, abs=0.15)
    assert [read_index(f) for f in v.frames] == [round(t * 10) for t in v.timestamps]
    half = cut(late, tmp_path / f"half.{suffix}", 0.8)
    v = media.read_video(half, plan_video(half, CONFIG, MediaOptions(prune=False)))
    assert v.meta.truncated and v.meta.duration < 2.5 and v.warnings and " of 3.0 s" in v.warnings[0]


def test_running_out_of_memory_while_decoding_is_said_so(tmp_path, monkeypatch):
    """FFmpeg's ENOMEM (PyAV's av.error.MemoryError, an FFmpegError too) from the third packet on
    is reported as memory, not taken for a damaged packet and then a corrupt video."""
    from media_factory import make_video

    path = make_video(tmp_path / "clip.mp4", seconds=2.0, fps=5, size=(32, 24))

    class Starving:
        is_corrupt = False

        def decode(self):
            raise av.error.MemoryError(12, "Cannot allocate memory")

    class Container:  # the real container, whose packets from the third on cannot be decoded
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def demux(self, *args, **kwargs):
            for i, packet in enumerate(self.real.demux(*args, **kwargs)):
                yield packet if i < 2 else Starving()

    real_open = video.av_open
    monkeypatch.setattr(video, "av_open", lambda p: Container(real_open(p)))
    with pytest.raises(MediaError, match="out of memory while decoding"):
        media.read_video(path, lambda meta: ([0.0, 1.5], (meta.width, meta.height)), backend="pyav")


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_a_video_track_starting_after_the_audio_keeps_the_files_clock(tmp_path, suffix):
    """Audio from 0 s, video from 2 s (frame i shows i at 2 + i / 10 s): times count from the file's
    start, as players (and subtitles) do, so --start 3 --end 4 shows frames 10-19, reported at
    their own times."""
    from media_factory import make_late_video

    late = make_late_video(tmp_path / f"late.{suffix}")
    with av.open(str(late)) as c:  # what FFmpeg itself says of the file (an independent reading)
        video_start = float(c.streams.video[0].start_time * c.streams.video[0].time_base)
        assert c.start_time == 0 and video_start == pytest.approx(2.0)
    meta = container.probe(late)
    assert meta.frame_times[0] == pytest.approx(2.0) and meta.duration == pytest.approx(5.0)
    v = media.read_video(late, plan_video(late, CONFIG, MediaOptions(fps=10, start=3, end=4, prune=False)))
    assert [read_index(f) for f in v.frames] == list(range(10, 20))
    assert v.timestamps == pytest.approx([3 + i / 10 for i in range(10)])
    whole = media.read_video(late, plan_video(late, CONFIG, MediaOptions(fps=1, min_frames=1, prune=False)))
    # samples at 0, 1, ... s: before 2 s the first frame (reported at its own time), then one per second
    assert [read_index(f) for f in whole.frames] == [0, 10, 20]
    assert whole.timestamps == pytest.approx([2.0, 3.0, 4.0])


def test_hevc_with_open_gops_gives_the_frames_asked_for(tmp_path):
    """x265's defaults (open GOPs, B-frames): decord 0.6 drops the leading pictures after a seek to
    a CRA keyframe and hands back frames from seconds earlier, so HEVC is read by PyAV. Frame i
    shows i: the frame for time t is round(t * 10)."""
    require_encoder("hevc")
    path = make_numbered(tmp_path / "hevc.mkv", 100, 10, codec="hevc", gop=40)
    v = media.read_video(path, plan_video(path, CONFIG, MediaOptions(fps=1, prune=False)))
    assert v.backend == "pyav" and v.timestamps == pytest.approx(list(range(10)))
    assert [read_index(f) for f in v.frames] == [round(t * 10) for t in v.timestamps]
    pytest.importorskip("decord")
    with pytest.raises(MediaError, match="HEVC"):
        media.read_video(path, lambda meta: ([0.0, 7.0], (meta.width, meta.height)), backend="decord")


def test_two_video_tracks_are_read_from_the_main_one(tmp_path):
    """An MP4 with a 64x48 track (frame i shows i) and a larger one (frame i shows 1000 + i): every
    decoder reads the first, which the metadata describes; decord, which picks the largest, is not used."""
    path = make_two_tracks(tmp_path / "two.mp4")
    with av.open(str(path)) as c:  # FFmpeg sees both tracks
        assert [(s.width, s.height) for s in c.streams.video] == [(64, 48), (320, 240)]
    meta = container.probe(path)
    assert (meta.width, meta.height, meta.video_streams) == (64, 48, 2)
    for backend in ("auto", "pyav"):
        v = media.read_video(path, lambda meta: ([0.0, 1.0, 2.5, 4.9], (meta.width, meta.height)), backend=backend)
        assert [read_index(f) for f in v.frames] == [0, 10, 25, 49], backend
    pytest.importorskip("decord")
    with pytest.raises(MediaError, match="2 video streams"):
        media.read_video(path, lambda meta: ([0.0], (meta.width, meta.height)), backend="decord")


def test_an_mp4_trimmed_by_its_edit_list_is_whole(tmp_path):
    """A lossless trim (only the edit list changes: 8 s from 2 s in) is an intact file: no warning,
    8 s long as FFmpeg says, frame 20 first. The same file cut short still warns."""
    full = faststart_copy(make_numbered(tmp_path / "clip.mp4", 100, 10, gop=10), tmp_path / "fast.mp4")
    trimmed = trim_with_edit_list(full, tmp_path / "trimmed.mp4", 2.0, 8.0)
    with av.open(str(trimmed)) as c:
        assert c.duration / av.time_base == pytest.approx(8.0) and c.streams.video[0].frames == 100
    v = media.read_video(trimmed, plan_video(trimmed, CONFIG, MediaOptions(fps=1, prune=False)))
    assert v.warnings == [] and not v.meta.truncated and v.meta.duration == pytest.approx(8.0)
    assert [read_index(f) for f in v.frames] == [20 + round(t * 10) for t in v.timestamps]
    assert v.timestamps == pytest.approx(list(range(8)))
    half = cut(trimmed, tmp_path / "part.mp4", 0.8)
    v = media.read_video(half, plan_video(half, CONFIG, MediaOptions(fps=1, prune=False)))
    assert v.meta.truncated and v.meta.duration < 7.0 and " of 8.0 s" in v.warnings[0]


def test_avi_with_b_frames_is_timed_by_display_order(tmp_path):
    """AVI stores no presentation times; with B-frames (x264's default) FFmpeg gives the packets
    made-up ones in decode order. Frame i (shown i) is at i / 10 s: 10 frames at 0, 1, ... 9 s,
    no warning, whichever decoder is asked for and however the window starts."""
    path = make_numbered(tmp_path / "x264.avi", 100, 10)
    with av.open(str(path)) as c:  # FFmpeg: the codec reorders frames, and the clip has 100 of them
        assert c.streams.video[0].codec_context.has_b_frames and c.streams.video[0].frames == 100
    for backend in ("auto", "pyav"):
        v = media.read_video(path, plan_video(path, CONFIG, MediaOptions(fps=1, prune=False)), backend=backend)
        assert v.backend == "pyav" and v.warnings == [] and v.meta.duration == pytest.approx(10.0)
        assert v.timestamps == pytest.approx(list(range(10)))
        assert [read_index(f) for f in v.frames] == list(range(0, 100, 10))
    v = media.read_video(path, plan_video(path, CONFIG, MediaOptions(fps=5, start=2, end=3, prune=False)))
    assert v.timestamps == pytest.approx([2.0, 2.2, 2.4, 2.6, 2.8])
    assert [read_index(f) for f in v.frames] == [20, 22, 24, 26, 28]
    pytest.importorskip("decord")
    with pytest.raises(MediaError, match="B-frames"):
        media.read_video(path, lambda meta: ([0.0, 5.0], (meta.width, meta.height)), backend="decord")


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_raw_streams_keep_their_rate_and_start_anywhere(tmp_path, codec):
    """A raw Annex-B stream (DVR / IP-camera dump) at 10 fps: FFmpeg's demuxer says 25 (its default)
    while the stream states 10 (guessed_rate, the packets' durations): 5 s long, and --start 3
    decodes on from the start of the file (the demuxer cannot seek) to frame 30."""
    require_encoder(codec)
    path = make_numbered(tmp_path / f"cam.{codec}", 50, 10, codec=codec, fmt=codec)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert c.format.name == codec and s.average_rate == 25 and s.guessed_rate == 10
    meta = container.probe(path)
    assert meta.frame_count == 50 and meta.duration == pytest.approx(5.0) and meta.fps == pytest.approx(10.0)
    v = media.read_video(path, plan_video(path, CONFIG, MediaOptions(fps=2, start=3, prune=False)))
    assert v.timestamps == pytest.approx([3.0, 3.5, 4.0, 4.5]) and v.warnings == []
    assert [read_index(f) for f in v.frames] == [30, 35, 40, 45]


def test_fragmented_mp4_cut_short_warns(tmp_path):
    """A fragmented MP4 (an empty index first, then fragments: OBS, screen recorders) announces no
    length: cut at half, only its layout says it was cut. The whole file gets no warning."""
    whole = make_numbered(tmp_path / "rec.mp4", 100, 10, gop=10, options={"movflags": "frag_keyframe+empty_moov"})
    half = cut(whole, tmp_path / "half.mp4", 0.5)
    readable = decodable_frames(half)
    assert 0 < len(readable) < 100  # what a plain PyAV decode gets out of it
    v = media.read_video(whole, plan_video(whole, CONFIG, MediaOptions(fps=1, prune=False)))
    assert v.warnings == [] and v.meta.duration == pytest.approx(10.0)
    v = media.read_video(half, plan_video(half, CONFIG, MediaOptions(fps=1, prune=False)))
    assert v.meta.truncated and v.meta.duration <= (max(readable) + 1) / 10 + 1e-6
    (warning,) = v.warnings
    assert "truncated" in warning and f"first {v.meta.duration:.1f} s" in warning
