"""pipeline.py where its caller gives up or a prompt cannot fit: a cancelled item's video stops
decoding between packets and frames (a server's reader thread is free at once), and a prompt too
long for the context is told what would make it fit.
"""

from __future__ import annotations

import threading

import pytest
import tiny
from media_factory import make_animated, make_video

import vl3cli
from vl3cli import media, video
from vl3cli.errors import ContextError
from vl3cli.options import Options
from vl3cli.pipeline import Item, _read, _Reading, check_context
from vl3cli.preprocess import MediaOptions, ProcessorConfig


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cancel")
    return {"mp4": make_video(d / "a.mp4", seconds=2.0, fps=10), "gif": make_animated(d / "a.gif")}


@pytest.fixture
def converted(monkeypatch) -> list:
    """The frames decoded, counted: every decoder converts each frame it keeps with `video.resize`."""
    count, real = [], video.resize
    monkeypatch.setattr(video, "resize", lambda im, size: count.append(1) or real(im, size))
    return count


def every_frame(meta):
    return list(meta.frame_times), (meta.width, meta.height)


@pytest.mark.parametrize("name,backend", [("mp4", "pyav"), ("mp4", "decord"), ("mp4", "auto"), ("gif", "auto")])
def test_decoding_stops_at_the_first_check_after_it_is_cancelled(clips, converted, name, backend):
    frames = len(media.read_video(clips[name], every_frame, backend).frames)
    assert frames == len(converted) >= 10  # not cancelled: every frame
    converted.clear()
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) == 3

    with video.cancellable(cancelled), pytest.raises(video.DecodeCancelled):
        media.read_video(clips[name], every_frame, backend)
    assert len(asked) == 3 and len(converted) < frames
    assert len(media.read_video(clips[name], every_frame, backend).frames) == frames  # outside the block: not asked


def test_a_cancelled_item_frees_its_reader_before_decoding_its_video(clips, converted):
    """The server's client left while the item waited for a reader: nothing is decoded, nothing put."""
    reading = _Reading(Item((str(clips["mp4"]),)), Options(), stream=False)
    reading.cancel.set()
    _read(reading, ProcessorConfig(), MediaOptions(), threading.Event())
    assert converted == [] and reading.parts.empty()


def never() -> int:
    raise AssertionError("asked though the prompt fits")


def test_a_prompt_that_fits_is_not_measured_again():
    check_context(4000, 3000, 96, 4096, never, [16])


CAP = ("pass --max-visual-tokens {} (frames are made smaller; fewer frames would make each one larger), "
       "or a shorter --start/--end clip, or lower --max-new-tokens")


@pytest.mark.parametrize(
    "prompt,visual,answer,text,frames,advice",
    [
        # a video alone (18 tokens of chat layout, no question): 9040 tokens of frame times, which no text can shorten
        (21058, 12000, 3, 18, [1000], "use fewer frames (lower --max-frames or --fps) or a shorter --start/--end clip"),
        (6000, 1000, 3, 4200, [1], "shorten the text"),  # the question itself is longer than the context
        (100, 0, 4090, 100, [], "lower --max-new-tokens"),
        (3500, 3300, 1000, 150, [1], CAP.format(2896)),  # 4096 - 200 - 1000 for one picture
        (3500, 3300, 1000, 150, [4, 8], CAP.format(1448)),  # a cap per input: two share the 2896
        # 2896 positions left, but a cap below 3000 frames is refused (one token per frame at least)
        (3500, 3300, 1000, 150, [3000], "lower --max-new-tokens or --max-frames"),
        (3500, 3300, 1000, 150, [2000, 1], "lower --max-new-tokens or --max-frames"),  # 1448 each < 2000
    ],
)  # fmt: skip
def test_a_prompt_too_long_is_told_what_helps(prompt, visual, answer, text, frames, advice):
    with pytest.raises(ContextError) as info:
        check_context(prompt, visual, answer, 4096, lambda: text, frames)
    assert str(info.value) == (f"the prompt ({prompt} tokens, {visual} of them visual) and --max-new-tokens {answer} "
                               f"need {prompt + answer} positions, more than the model's 4096: {advice}")  # fmt: skip


def test_a_video_alone_too_long_for_the_context_is_told_to_use_fewer_frames(tmp_path):
    """600 frames with no question: the frames' times alone outgrow the tiny model's 4096 positions."""
    clip = make_video(tmp_path / "long.mp4", seconds=60.0, fps=10, size=(28, 28))
    model = vl3cli.load(str(tiny.make_checkpoint(tmp_path / "ckpt", seed=9)), max_new_tokens=3)
    with pytest.raises(ContextError) as info:
        model.describe(str(clip), fps=10, max_frames=600)
    assert str(info.value).endswith("use fewer frames (lower --max-frames or --fps) or a shorter --start/--end clip")
