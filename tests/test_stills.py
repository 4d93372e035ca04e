"""HEIC/HEIF (pillow-heif) and AVIF (Pillow) stills, and image-or-video judged by content.

Each picture has a white block in its top-left corner and EXIF orientation 6 ("rotate 90
degrees clockwise to display", EXIF 2.32 / TIFF tag 274), so a viewer shows the block in the
top-right corner of a portrait picture: that is the reference.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from media_factory import make_animated, make_image, make_video, marked_picture
from PIL import Image

from vl3cli import container, media
from vl3cli.errors import MediaError
from vl3cli.preprocess import MediaOptions, ProcessorConfig, prepare_visual

CONFIG = ProcessorConfig()


def save_marked(path, fmt: str, orientation: int | None = 6):
    """A 64x48 marked picture in ``fmt`` ("HEIF" through pillow-heif's own API, leaving Pillow
    without a HEIF opener as a fresh process has; "AVIF" through Pillow)."""
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im = Image.fromarray(marked_picture((64, 48)))
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.from_pillow(im).save(path, quality=95, exif=exif.tobytes())
    else:
        im.save(path, format=fmt, exif=exif.tobytes(), quality=95)
    return path


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("stills")
    return {
        "heic": save_marked(d / "photo.heic", "HEIF"),
        "avif": save_marked(d / "photo.avif", "AVIF"),
        "heic-named-mp4": save_marked(d / "photo.mp4", "HEIF"),  # the extension lies
        "heic-upright": save_marked(d / "upright.heic", "HEIF", orientation=None),
    }


def corner_of_block(frame: np.ndarray) -> str:
    h, w = frame.shape[:2]
    top, left = frame[: h // 2].mean() > frame[h // 2 :].mean(), frame[:, : w // 2].mean() > frame[:, w // 2 :].mean()
    return ("top" if top else "bottom") + "-" + ("left" if left else "right")


@pytest.mark.parametrize("name", ["heic", "avif", "heic-named-mp4"])
def test_heic_and_avif_are_upright_images(stills, name):
    path = stills[name]
    assert media.detect_kind(path) == "image"
    im = media.load_image(path)
    assert im.size == (48, 64) and corner_of_block(np.asarray(im)) == "top-right"
    v = prepare_visual(path, CONFIG, MediaOptions())
    assert v.kind == "image" and v.decoder == "pillow" and (v.source_width, v.source_height) == (48, 64)


def test_heic_without_orientation_is_as_stored(stills):
    im = media.load_image(stills["heic-upright"])
    assert im.size == (64, 48) and corner_of_block(np.asarray(im)) == "top-left"


def test_animated_avif_is_a_video(tmp_path):
    path = make_animated(tmp_path / "anim.avif", "AVIF", durations_ms=(500, 500, 1000, 500, 500, 1000))
    v = prepare_visual(path, CONFIG, MediaOptions())
    assert v.kind == "video" and v.decoder == "pillow" and v.timestamps == [0.0, 1.0, 2.0, 3.0]


def test_content_decides_not_the_extension(tmp_path):
    clip = make_video(tmp_path / "clip.mp4", frames=3).rename(tmp_path / "clip.heic")  # an MP4 named like a photo
    assert container.signature(clip) == "mp4" and media.detect_kind(clip) == "video"
    png = make_image(tmp_path / "picture.mov")
    assert container.signature(png) is None and media.detect_kind(png) == "image"
    mkv = make_video(tmp_path / "clip.mkv", frames=3).rename(tmp_path / "clip.jpg")
    assert container.signature(mkv) == "matroska" and media.detect_kind(mkv) == "video"


def test_brands(tmp_path):
    """The 'ftyp' major brand decides (ISO/IEC 23008-12 HEIF, AV1 Image File Format)."""

    def ftyp(major: bytes, *compatible: bytes) -> str | None:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        (tmp_path / "f").write_bytes((8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0" * 64)
        return container.signature(tmp_path / "f")

    assert ftyp(b"heic", b"mif1", b"heic") == ftyp(b"mif1", b"heic") == ftyp(b"heix") == "heif"
    assert ftyp(b"avif", b"mif1") == ftyp(b"avis", b"avif") == ftyp(b"mif1", b"avif", b"miaf") == "avif"
    assert ftyp(b"isom", b"iso2", b"avc1", b"mp41") == ftyp(b"qt  ") == ftyp(b"mp42") == "mp4"


def test_corrupt_heic_is_one_line(stills, tmp_path):
    broken = tmp_path / "broken.heic"
    broken.write_bytes(stills["heic"].read_bytes()[:200])
    with pytest.raises(MediaError, match=r"broken\.heic: .*HEIF") as info:
        prepare_visual(broken, CONFIG, MediaOptions())
    assert "\n" not in str(info.value)


def test_heif_support_loads_only_when_needed(stills):
    code = (
        "import sys\nfrom vl3cli import media\n"
        f"media.load_image({str(stills['avif'])!r})\n"
        "print('pillow_heif' in sys.modules)\n"
        f"media.load_image({str(stills['heic'])!r})\n"
        "print('pillow_heif' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["False", "True"], p.stderr
