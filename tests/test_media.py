"""Decoding: every format in, the right frames and metadata out; broken input -> MediaError."""

from __future__ import annotations

import io
import struct
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from av.stream import Disposition
from media_factory import (
    frame_pixels,
    make_animated,
    make_image,
    make_numbered,
    make_video,
    make_with_cover,
    read_index,
    require_encoder,
)
from PIL import Image

from vl3cli import container, media, video
from vl3cli.errors import MediaError, UsageError
from vl3cli.preprocess import MediaOptions, ProcessorConfig, plan_video, prepare_visual

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
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "ok.jpg", quality=90)
    for cut in (200, 300):  # inside the headers (Pillow cannot open it; FFmpeg reads its size and no frame)
        (tmp_path / "headers.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:cut])
        check_error(tmp_path / "headers.jpg", "corrupt or truncated image")
    for name in ("garbage.png", "garbage.jpg"):  # FFmpeg's image2 demuxer opens these by extension alone
        (tmp_path / name).write_bytes(b"garbage")
        check_error(tmp_path / name, "not an image Pillow can read")


def test_decompression_bomb(tmp_path):
    from vl3cli.media import PICTURE_PIXELS

    path = tmp_path / "bomb.png"
    side = int((PICTURE_PIXELS * 1.01) ** 0.5)
    Image.new("1", (side, side)).save(path)  # a few KB on disk, > 250 million pixels decoded
    check_error(path, "too large")
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's default is left as it was


def test_a_108_megapixel_photo_is_not_a_bomb(tmp_path, monkeypatch):
    """Above Pillow's default limit (89.5 MP), as phones take them: opened (decoding is not needed
    to tell); a limit the program set itself still holds."""
    from vl3cli.media import _open_pil

    path = tmp_path / "108mp.png"
    Image.new("1", (12000, 9000)).save(path)
    with _open_pil(path) as im:
        assert im.size == (12000, 9000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
    check_error(path, "too large")
    import subprocess
    import sys

    # a limit set before vl3 is imported holds too
    code = ("from PIL import Image; Image.MAX_IMAGE_PIXELS = 50_000_000\n"
            "from vl3cli.errors import MediaError\nfrom vl3cli.media import _open_pil\n"
            f"try:\n    _open_pil({str(path)!r})\nexcept MediaError as e:\n    print(e)")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "too large" in p.stdout, p.stderr


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


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict:
    """Raw video streams that start like a picture Pillow knows: an MPEG-2 elementary stream (whose
    sequence header Pillow names "MPEG") and an IP camera's Motion-JPEG (JPEGs one after another)."""
    d = tmp_path_factory.mktemp("streams")
    return {
        "m2v": make_numbered(d / "clip.m2v", 30, 10, "mpeg2video"),
        "mjpeg": make_numbered(d / "ipcam.mjpeg", 30, 10, "mjpeg"),
    }


@pytest.mark.parametrize("name", ["m2v", "mjpeg"])
def test_video_streams_that_look_like_pictures_are_videos(streams, name):
    path = streams[name]
    assert media.detect_kind(path) == "video"
    v = media.read_video(path, plan_video(path, CONFIG, MediaOptions(prune=False)))
    assert v.meta.frame_count == 30 and len(v.timestamps) == 4  # raw streams carry no times: frames at their nominal rate
    assert [read_index(f) for f in v.frames] == [round(t * v.meta.fps) for t in v.timestamps]


def test_jpeg_end_is_found_past_thumbnails_and_scans(tmp_path):
    """A photo (EXIF with a thumbnail JPEG inside, progressive scans, an MPO's second picture) is
    one picture; the same JPEG three times in a row is a Motion-JPEG stream."""
    photo = tmp_path / "photo.jpg"
    thumb = io.BytesIO()
    Image.fromarray(frame_pixels(1, (16, 12))).save(thumb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 1
    im = Image.fromarray(frame_pixels(0, (64, 48)))
    im.save(photo, "JPEG", exif=exif.tobytes() + thumb.getvalue(), progressive=True)
    (tmp_path / "stream.jpg").write_bytes(photo.read_bytes() * 3)
    im.save(tmp_path / "stereo.mpo", "MPO", save_all=True, append_images=[im])
    assert [media.detect_kind(tmp_path / n) for n in ("photo.jpg", "stereo.mpo", "stream.jpg")] == ["image", "image", "video"]


def test_a_photo_with_an_appended_depth_map_is_a_photo(tmp_path):
    """Phone portrait photos append their depth map as a second JPEG, named in the XMP of the
    first (Google's container format, no MPF marker): a photo, not a Motion-JPEG stream."""
    main, depth = io.BytesIO(), io.BytesIO()
    Image.fromarray(frame_pixels(0, (64, 48))).save(main, "JPEG")
    Image.fromarray(frame_pixels(1, (32, 24))).save(depth, "JPEG")
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description GCamera:SpecialTypeID="p" Container:Directory="d"/></x:xmpmeta>'
    app1 = b"http://ns.adobe.com/xap/1.0/\x00" + xmp
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    first = main.getvalue()
    (tmp_path / "portrait.jpg").write_bytes(first[:2] + segment + first[2:] + depth.getvalue())
    (tmp_path / "plain.jpg").write_bytes(first + depth.getvalue())  # the same without the XMP: a stream
    assert media.detect_kind(tmp_path / "portrait.jpg") == "image"
    assert media.detect_kind(tmp_path / "plain.jpg") == "video"


def test_demuxed_but_not_decodable_is_one_error(tmp_path):
    """FFmpeg demuxes SVG but has no decoder for it (codec_context None)."""
    path = tmp_path / "logo.svg"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="9" height="9"/></svg>\n')
    check_error(path, "not an image or video vl3 can read")


def test_high_bit_depth_scaled_by_mode_not_content(tmp_path):
    """16-bit levels v -> round(v / 257) and floats 0..1 -> x 255 whatever the brightest pixel
    (a dark 16-bit picture whose maximum is 255 stayed at 255 before); out of range clips."""
    levels16 = np.array([[0, 255, 256, 32896, 65535]], np.uint16)
    Image.fromarray(levels16).save(tmp_path / "dark.png")  # I;16
    Image.fromarray(np.minimum(levels16, 255)).save(tmp_path / "darker.png")
    floats = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tiff")  # F
    grey = {name: np.asarray(media.load_image(tmp_path / name))[0, :, 0].tolist() for name in ("dark.png", "darker.png", "float.tiff")}
    assert grey == {"dark.png": [0, 1, 1, 128, 255], "darker.png": [0, 1, 1, 1, 1], "float.tiff": [0, 0, 128, 255, 255]}


def test_corrupt_exif_is_quiet(tmp_path):
    """Pillow warns of EXIF whose entries run past its end; that is not the user's problem."""
    ifd = struct.pack(">H", 0x4000) + struct.pack(">HHII", 0x0112, 3, 1, 1 << 16)  # 16384 entries announced, 1 there
    path = tmp_path / "badexif.jpg"
    Image.new("RGB", (8, 8), "red").save(path, "JPEG", exif=b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Image.open(path):
            assert any("Corrupt EXIF" in str(w.message) for w in seen)  # the file does make Pillow warn
        seen.clear()
        assert media.detect_kind(path) == "image" and not media.is_animated_image(path)
        assert media.load_image(path).size == (8, 8)
    assert seen == []


@pytest.mark.parametrize("name,fmt", [("song.flac", "flac"), ("song.m4a", "mp4")])
def test_audio_with_cover_art_is_not_a_video(tmp_path, name, fmt):
    check_error(make_with_cover(tmp_path / name, fmt), "no video stream")


def test_cover_art_never_stands_in_for_the_video(tmp_path):
    path = make_with_cover(tmp_path / "clip.mp4", "mp4", numbered=20)
    for backend in ("auto", "pyav"):
        v = media.read_video(path, lambda meta: ([0.0, 1.5], (meta.width, meta.height)), backend=backend)
        assert [read_index(f) for f in v.frames] == [0, 15]

    # a file whose cover comes before its video in FFmpeg's list of streams (what MP3 / FLAC give)
    cover, clip = SimpleNamespace(disposition=Disposition.attached_pic), SimpleNamespace(disposition=Disposition.default)
    assert container.main_video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover, clip]))) == 1
    assert container.main_video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover]))) is None


def test_fps_above_the_clips_own_costs_nothing_extra(clips, monkeypatch):
    """--fps far above the clip's own gives each source frame once, as --fps 5 (the clip's own rate)
    does, and looks each frame up a bounded number of times rather than building fps x duration
    candidates (--fps 1e9 filled the memory). The values stay small enough for the old way to end."""
    from vl3cli import sampling

    high = prepare_visual(clips["long"], CONFIG, MediaOptions(fps=1e4, max_frames=1000, prune=False))
    own = prepare_visual(clips["long"], CONFIG, MediaOptions(fps=5, max_frames=1000, prune=False))
    assert high.timestamps == own.timestamps == [k / 5 for k in range(150)]
    lookups = []
    real = sampling.frame_index
    monkeypatch.setattr(sampling, "frame_index", lambda times, t: lookups.append(t) or real(times, t))
    times = [k / 30 for k in range(90)]
    assert sampling.sample_timestamps(3.0, times, fps=1e5, max_frames=1000) == times
    assert len(lookups) <= 3 * len(times)
    # without frame times: max_frames evenly spaced candidates, k = i * n // max_frames, n = 3e6
    assert sampling.sample_timestamps(3.0, None, fps=1e6, max_frames=4) == [0.0, 0.75, 1.5, 2.25]


def test_a_text_file_ffmpeg_would_draw_is_not_a_video(tmp_path):
    """FFmpeg's tty demuxer takes a text file named .nfo (.ans, .diz...) for a picture of its text:
    it is no more a video than the same bytes named .txt."""
    import av

    text = "Release notes\nline two\n"
    (tmp_path / "readme.txt").write_text(text)
    (tmp_path / "readme.nfo").write_text(text)
    with av.open(str(tmp_path / "readme.nfo")) as c:  # FFmpeg does open it, as a picture
        assert c.format.name == "tty" and len(c.streams.video) == 1
    for name in ("readme.txt", "readme.nfo"):
        check_error(tmp_path / name, "not an image or video file")
        with pytest.raises(MediaError, match="not an image or video file"):
            container.probe(tmp_path / name)


@pytest.mark.parametrize("fmt,suffix", [("GIF", "gif"), ("PNG", "png")])
def test_animated_picture_cut_short_gives_what_decodes(tmp_path, fmt, suffix):
    """An animated GIF / APNG cut at half: the frames Pillow decodes before the one that breaks,
    each as Pillow decodes it, at 0.1 s each, with the truncation warning."""
    whole = make_animated(tmp_path / f"anim.{suffix}", fmt, size=(200, 150))
    path = tmp_path / f"half.{suffix}"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    expected = []  # the reference: Pillow's own frames, up to the first that does not decode
    with Image.open(path) as im:
        try:
            for i in range(im.n_frames):
                im.seek(i)
                im.load()
                expected.append(np.asarray(im.convert("RGB")))
        except OSError:
            pass
    assert 0 < len(expected) < 10
    v = media.read_video(path, lambda meta: (list(meta.frame_times), (meta.width, meta.height)))
    assert v.backend == "pillow" and v.meta.truncated and v.meta.frame_count == len(expected)
    assert v.timestamps == pytest.approx([i / 10 for i in range(len(expected))])
    assert all(np.array_equal(a, b) for a, b in zip(v.frames, expected, strict=True))
    (warning,) = v.warnings
    assert f"only the first {len(expected) / 10:.1f} s could be read" in warning
    assert media.read_video(whole, lambda meta: ([0.0], (meta.width, meta.height))).warnings == []
