"""Long videos cut into segments, end to end on the tiny checkpoint: shot detection on synthetic cuts,
each segment's answer equal to `describe --start S --end E`, subtitles parsed by independent
parsers, one decoding pass per file, and resume per segment."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tiny
from media_factory import cut, make_video
from typer.testing import CliRunner

from vl3cli import container, preprocess, video
from vl3cli.cli import app
from vl3cli.errors import UsageError

runner = CliRunner()
N = 4
COLOURS = [(40, 120, 200), (220, 60, 30), (20, 200, 90), (200, 200, 40)]


def make_cuts(path: Path, cuts: list[float], seconds: float, fps: int = 25, size=(96, 64)) -> Path:
    """A clip whose shot changes at `cuts`: a flat colour per shot with a moving box. The first cut
    is between two colours of the same brightness, which a luma-only detector would miss."""
    import av

    w, h = size
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(round(seconds * fps)):
            shot = sum(i / fps >= t for t in cuts)
            img = np.empty((h, w, 3), np.uint8)
            img[:] = COLOURS[shot % len(COLOURS)]
            x = (i * 2) % (w - 16)
            img[h // 3 : h // 3 + 12, x : x + 16] = 255 - np.array(COLOURS[shot % len(COLOURS)])
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.make_checkpoint(tmp_path_factory.mktemp("seg-ckpt") / "hf", "hf", tied=True, seed=11)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_cuts(tmp_path_factory.mktemp("seg-media") / "talk.mp4", [3.0, 6.6], 10.0)


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout


@pytest.mark.parametrize("fps", [25, 30])
def test_shot_boundaries_are_found_within_0_2_s(tmp_path, fps):
    cuts = [1.5, 4.2, 7.9]
    path = make_cuts(tmp_path / "c.mp4", cuts, 10.0, fps=fps)
    found = video.detect_cuts(path, container.probe(path))
    assert len(found) == len(cuts) and all(abs(a - b) <= 0.2 for a, b in zip(found, cuts)), found


def test_fixed_windows_and_segment_answers_equal_describe_of_the_window(ckpt, clip):
    args = ["-m", ckpt, "--max-new-tokens", N, "-f", "jsonl"]
    recs = [json.loads(x) for x in cli("describe", clip, "--segments", 4, *args).splitlines()]
    assert [(r["segment_start"], r["segment_end"]) for r in recs] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    for r in recs:
        (alone,) = [json.loads(x) for x in cli("describe", clip, "--start", r["segment_start"], "--end", r["segment_end"], *args).splitlines()]
        assert (r["text"], r["timestamps"], r["visual_tokens_kept"]) == (alone["text"], alone["timestamps"], alone["visual_tokens_kept"])
        assert all(r["segment_start"] <= t < r["segment_end"] for t in r["timestamps"])  # source-video times
    scenes = [json.loads(x) for x in cli("describe", clip, "--segments", "scenes", "--min-segment", 1, *args).splitlines()]
    bounds = [(r["segment_start"], r["segment_end"]) for r in scenes]
    assert len(bounds) == 3 and bounds[0][0] == 0.0 and bounds[-1][1] == 10.0
    assert abs(bounds[1][0] - 3.0) <= 0.2 and abs(bounds[2][0] - 6.6) <= 0.2


def test_text_lines_in_order(ckpt, clip):
    out = cli("describe", clip, "--segments", 4, "-m", ckpt, "--max-new-tokens", N)
    lines = out.splitlines()
    assert [line[:30] for line in lines if line.startswith("[")] == [
        "[00:00:00.000 - 00:00:04.000] ", "[00:00:04.000 - 00:00:08.000] ", "[00:00:08.000 - 00:00:10.000] ",
    ]  # fmt: skip


def test_srt_and_webvtt_parse(ckpt, clip, tmp_path):
    import srt
    import webvtt

    args = ["--segments", 4, "-m", ckpt, "--max-new-tokens", 12]
    subs = list(srt.parse(cli("describe", clip, *args, "-f", "srt")))
    assert [(s.index, s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [(1, 0, 4), (2, 4, 8), (3, 8, 10)]
    vtt = tmp_path / "talk.vtt"
    cli("ask", clip, "What?", "Who?", *args, "-f", "vtt", "--out", vtt)
    cues = webvtt.read(str(vtt)).captions
    assert len(cues) == 6 and [c.start for c in cues[::2]] == ["00:00:00.000", "00:00:04.000", "00:00:08.000"]
    assert [c.text.splitlines()[0] for c in cues[:2]] == ["Q: What?", "Q: Who?"]


def test_one_forward_pass_per_file(ckpt, clip, monkeypatch):
    opened = []
    real = video._PyAVReader.__init__

    def counting(self, path, meta):
        opened.append(path)
        real(self, path, meta)

    monkeypatch.setattr(video._PyAVReader, "__init__", counting)
    monkeypatch.setattr(video, "uses_decord", lambda meta, backend: False)
    cli("describe", clip, "--segments", 2, "-m", ckpt, "--max-new-tokens", 2, "-f", "jsonl")
    assert len(opened) == 1  # five windows, one reader moving forward


def test_batch_resumes_per_segment(ckpt, clip, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    args = ["batch", clip, "--segments", 2, "--out", out, "-m", ckpt, "--max-new-tokens", N]
    cli(*args)
    full = out.read_text().splitlines()
    assert len(full) == 5
    kept = [line for line in full if json.loads(line)["segment_start"] not in (2.0, 6.0)]
    out.write_text("\n".join(kept) + "\n")  # as if the run had stopped before those two
    windows = []
    real = video.decode_windows

    def spy(path, meta, plans, backend):
        windows.extend(plans)
        return real(path, meta, plans, backend)

    monkeypatch.setattr(video, "decode_windows", spy)
    monkeypatch.setattr("vl3cli.preprocess.video.decode_windows", spy)
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0 and "3 already done" in r.stderr
    assert len(windows) == 2  # only the missing segments were decoded
    def untimed(lines):
        return sorted(json.dumps({k: v for k, v in json.loads(x).items() if k != "timings"}) for x in lines)

    assert untimed(out.read_text().splitlines()) == untimed(full)  # the same records: each segment exactly once
    finished = out.read_bytes()
    probed = []
    real_probe = preprocess.container.probe
    monkeypatch.setattr(preprocess.container, "probe", lambda path: probed.append(path) or real_probe(path))
    r = runner.invoke(app, [str(a) for a in args])  # every segment has its record: the file is not opened
    assert r.exit_code == 0 and "5 already done" in r.stderr and out.read_bytes() == finished
    assert probed == []


def test_python_api_segments(ckpt, clip):
    import vl3cli

    model = vl3cli.load(str(ckpt), max_new_tokens=N)
    got = [(r.segment_start, r.segment_end, r.prompt) for r in model.segments(str(clip), ["What?", "Who?"], segments=5)]
    assert got == [(0.0, 5.0, "What?"), (0.0, 5.0, "Who?"), (5.0, 10.0, "What?"), (5.0, 10.0, "Who?")]
    with pytest.raises(vl3cli.api.UsageError, match="model.segments"):
        model.describe(str(clip), segments=5)
    # an item of several media cannot be cut: an error record (a batch goes on), not a whole answer
    ((_, record),) = list(model.run([vl3cli.Item((str(clip), str(clip)), ("What?",))], segments=5))
    assert record.error and "cuts one video" in record.error and record.text is None


def test_subtitles_and_segments_need_one_video_before_anything_is_written(ckpt, clip, tmp_path, monkeypatch):
    """Refused as a usage error (one `Error:` line, exit 2, from main()) before the model loads or
    --out is opened: an --overwrite target keeps its bytes."""
    from media_factory import make_image

    from vl3cli.cli import describe as describe_cli
    from vl3cli.errors import UsageError

    monkeypatch.setattr(describe_cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    image = make_image(tmp_path / "still.png", size=(28, 28))
    out = tmp_path / "old.srt"
    out.write_text("1\n00:00:00,000 --> 00:00:01,000\nkept\n")
    cases = [
        (["describe", image, "-f", "srt", "--out", out, "--overwrite"], "subtitles for one video"),
        (["ask", clip, clip, "What?", "-f", "vtt", "--out", out, "--overwrite"], "subtitles for one video"),
        (["ask", clip, image, "What?", "--segments", 2], "cuts one video"),
    ]
    for args, message in cases:
        r = runner.invoke(app, [str(a) for a in [*args, "-m", ckpt]])
        assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2, r.output
        assert message in str(r.exception)
        assert out.read_text() == "1\n00:00:00,000 --> 00:00:01,000\nkept\n"


def test_a_decoder_failure_while_cutting_is_one_error_naming_the_file(ckpt, clip, monkeypatch):
    """Whatever the decoder raises mid-file (or while finding shots) becomes the item's error record
    naming the file, as for a whole-file read: the answers before it stand (a server answers 400)."""
    import vl3cli
    from vl3cli import preprocess

    model = vl3cli.load(str(ckpt), max_new_tokens=N)
    real = video.decode_windows

    def breaks_after_one(*args, **kwargs):
        windows = real(*args, **kwargs)
        yield next(windows)
        raise RuntimeError("bitstream error")

    monkeypatch.setattr(preprocess.video, "decode_windows", breaks_after_one)
    records = [r for _, r in model.run([vl3cli.Item((str(clip),), ("What?",))], segments=5)]
    assert [r.segment_start for r in records if r.error is None] == [0.0]
    (failed,) = [r for r in records if r.error]
    assert failed.error == f"{clip}: cannot decode video (RuntimeError: bitstream error)"
    monkeypatch.setattr(vl3cli.pipeline, "detect_cuts", lambda *a: (_ for _ in ()).throw(OSError("gone")))
    (record,) = [r for _, r in model.run([vl3cli.Item((str(clip),), ("What?",))], segments="scenes")]
    assert record.error == f"{clip}: cannot decode video (OSError: gone)"


def test_a_cut_video_warns_in_every_segment(ckpt, tmp_path):
    """A Matroska file cut at 80 %: its headers announce 4 s, 3.x s decode (probe sees it before any
    window is decoded). Plain describe warns; so does every segment, on stderr and in its record."""
    path = cut(make_video(tmp_path / "full.mkv", seconds=4.0, fps=10, gop=10), tmp_path / "cut.mkv", 0.8)
    r = runner.invoke(app, [str(a) for a in ["describe", path, "--segments", 1, "-m", ckpt, "--max-new-tokens", 2, "-f", "jsonl"]])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) >= 2
    for rec in recs:
        (warning,) = rec["warnings"]
        assert warning.startswith(f"{path}: truncated or damaged video: only the first ") and " of 4.0 s" in warning
        assert f"warning: {warning}" in r.stderr


def test_start_past_the_end_with_segments_names_start(ckpt, clip):
    for how in ("4", "scenes"):
        r = runner.invoke(app, [str(a) for a in ["describe", clip, "--segments", how, "--start", 50, "-m", ckpt]])
        assert isinstance(r.exception, UsageError), r.output
        assert str(r.exception) == f"{clip}: --start (50s) is at or past the end of the video (10.000s)"


def test_records_state_window_bounds_without_float_noise(ckpt, clip):
    """0.7 * 3 is 2.0999999999999996 in floats: the records say 2.1 (hand-computed bounds), and the
    frames of each window are those `describe --start S --end E` samples."""
    args = ["-m", ckpt, "--max-new-tokens", 2, "-f", "jsonl"]
    recs = [json.loads(x) for x in cli("describe", clip, "--segments", 0.7, "--end", 2.8, *args).splitlines()]
    assert [(r["segment_start"], r["segment_end"]) for r in recs] == [(0.0, 0.7), (0.7, 1.4), (1.4, 2.1), (2.1, 2.8)]
    (alone,) = [json.loads(x) for x in cli("describe", clip, "--start", 2.1, "--end", 2.8, *args).splitlines()]
    assert recs[-1]["timestamps"] == alone["timestamps"] and recs[-1]["timestamps"][0] == 2.1


def test_max_segment_alone_below_the_default_min_segment(ckpt, clip):
    """`--max-segment 1.5` alone cuts a 3 s shot in two (the default --min-segment 2 yields to it);
    both given the wrong way round stay a usage error."""
    args = ["-m", ckpt, "--max-new-tokens", 2, "-f", "jsonl", "--segments", "scenes", "--end", 3]
    recs = [json.loads(x) for x in cli("describe", clip, "--max-segment", 1.5, *args).splitlines()]
    assert [(r["segment_start"], r["segment_end"]) for r in recs] == [(0.0, 1.5), (1.5, 3.0)]
    r = runner.invoke(app, [str(a) for a in ["describe", clip, "--max-segment", 1.5, "--min-segment", 2, *args]])
    assert isinstance(r.exception, UsageError) and "--min-segment (2s) is above --max-segment (1.5s)" in str(r.exception)


def test_a_run_with_unrounded_bounds_resumes_without_duplicates(ckpt, clip, tmp_path):
    """Records written when inner bounds were plain float sums (0.7 * 3 = 2.0999999999999996):
    a resumed run matches them to its rounded windows, answers only the missing segment, and
    every window keeps one record."""
    out = tmp_path / "r.jsonl"
    args = ["batch", clip, "--segments", 0.7, "--end", 2.8, "--out", out, "-m", ckpt, "--max-new-tokens", N]
    cli(*args)
    full = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["segment_start"])
    assert [(r["segment_start"], r["segment_end"]) for r in full] == [(0.0, 0.7), (0.7, 1.4), (1.4, 2.1), (2.1, 2.8)]
    older = []
    for r in full[:3]:  # the last segment is missing, as after an interrupted run
        k = round(r["segment_start"] / 0.7)
        older.append({**r, "segment_start": 0.0 + k * 0.7, "segment_end": r["segment_end"] if k == 3 else 0.0 + (k + 1) * 0.7})
    assert older[2]["segment_end"] == 2.0999999999999996  # the noise is there
    out.write_text("".join(json.dumps(r) + "\n" for r in older))
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0 and "3 already done" in r.stderr, r.stderr
    spans = [(round(x["segment_start"], 6), round(x["segment_end"], 6)) for x in map(json.loads, out.read_text().splitlines())]
    assert sorted(spans) == [(0.0, 0.7), (0.7, 1.4), (1.4, 2.1), (2.1, 2.8)]
