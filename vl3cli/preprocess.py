"""Pre-processing: a file path or URL -> model-ready ``VisualInput`` (pixel values, grid, keep-mask).

Contract:

- ``ProcessorConfig`` holds the checkpoint's processor settings (``from_dir`` reads both the
  HF and the original file layouts); ``MediaOptions`` the user's choices.
- Resize rule (``smart_resize``, as transformers): round each side to a multiple of
  ``factor = patch_size * merge_size``; above the max pixel budget scale down by
  ``sqrt(H*W / max)`` and floor, below the min scale up and ceil; an aspect ratio above 200
  is refused. Images use their own budget (merge 1); a video's budget is shared by its
  frames (per-frame max = ``video_max_pixels // frames``, merge 2). ``max_visual_tokens``
  lowers the max budget so the merged tokens stay within it. A min budget above the max is
  lowered to it, and a picture that rounding up scales past the max takes the largest size
  within it instead.
- Pixels: PIL bicubic resize of the uint8 RGB frame, then ``x * (1/255)`` in float64 cast to
  float32 and ``(x - mean) / std`` in float32 -- the exact arithmetic of transformers'
  ``VideoLlama3ImageProcessorPil``, done through a 256-entry table per channel so a video
  never holds a float64 copy.
- ``VisualInput.patches`` is ``(t*h*w, 3*p*p)`` uint8, rows in merge-window order (frame, window
  row, window column, row in window, column in window), each row channel-first 3 x p x p; with
  its ``table`` it normalises to ``pixel_values`` (float32) wherever it is needed (``normalise``:
  on the engine's device, so pixels travel as bytes), always to the same values.
- Videos are pruned with ``pruning.prune_mask`` unless the config or the options turn it off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vl3cli import container, fetch, media, video
from vl3cli.config import read_json
from vl3cli.errors import ConfigError, ContextError, MediaError, UsageError, Vl3Error
from vl3cli.pruning import prune_mask
from vl3cli.sampling import check_bounds, resolve_window, sample_timestamps
from vl3cli.segments import span_key

MAX_ASPECT_RATIO = 200
PROMPT_ROOM = 64  # positions a suggested --max-visual-tokens leaves for the prompt's text (chat layout, question)


@dataclass(frozen=True)
class MediaOptions:
    fps: float = 1.0
    min_frames: int = 4
    max_frames: int = 180
    start: float | None = None  # seconds
    end: float | None = None
    max_visual_tokens: int | None = None  # merged visual tokens, per image / per whole video
    prune: bool = True
    prune_threshold: float = 0.1
    # Limits the caller sets (not the user's choices): a server's longest video and largest
    # download, and the positions left for visual tokens (context - the answer), which lets a
    # video that cannot fit be refused before it is decoded.
    max_duration: float | None = None
    max_download_bytes: int | None = None
    public_urls_only: bool = False  # a server's downloads connect to public addresses only
    token_budget: int | None = None
    # Asked between a download's reads: True once nobody wants the item (it was cancelled).
    cancelled: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def download_limits(self) -> dict:
        limits = {} if self.max_download_bytes is None else {"max_bytes": self.max_download_bytes}
        limits |= {} if self.cancelled is None else {"cancelled": self.cancelled}
        return limits | ({"public_only": True} if self.public_urls_only else {})

    def validate(self) -> None:
        """Raise UsageError for impossible values."""
        check_bounds(self.fps, self.min_frames, self.max_frames)
        if self.start is not None and not (math.isfinite(self.start) and self.start >= 0):
            raise UsageError(f"--start must be >= 0 seconds, got {self.start!r}")
        if self.end is not None and not (math.isfinite(self.end) and self.end > 0):
            raise UsageError(f"--end must be > 0 seconds, got {self.end!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise UsageError(f"--end ({self.end:g}s) must be after --start ({self.start:g}s)")
        if self.max_visual_tokens is not None and self.max_visual_tokens < 1:
            raise UsageError(f"--max-visual-tokens must be at least 1, got {self.max_visual_tokens}")
        if not (math.isfinite(self.prune_threshold) and self.prune_threshold >= 0):
            raise UsageError(f"--prune-threshold must be >= 0, got {self.prune_threshold!r}")


# Upper bound on a pixel budget: 2**28 pixels (a 16384 x 16384 frame, or 1.4 M visual tokens at
# patch 14), 20x the largest published budget (12,845,056 for a whole video); beyond it a config
# asks for more memory than any machine gives one input.
MAX_PIXELS = 1 << 28


@dataclass(frozen=True)
class ProcessorConfig:
    patch_size: int = 14
    image_merge_size: int = 1
    video_merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_min_pixels: int = 3136  # 16 merged tokens * 14*14 * merge^2 (merge 1)
    image_max_pixels: int = 3211264  # 16384 merged tokens at merge 1
    video_min_pixels: int = 12544  # per frame
    video_max_pixels: int = 12845056  # for the whole video, shared by its frames
    fps: float = 1.0
    min_frames: int = 4
    max_frames: int = 180  # vl3 default (see VIDEOLLAMA3.md)
    use_token_compression: bool = True

    @classmethod
    def from_dir(cls, path, patch_size: int | None = None) -> ProcessorConfig:
        """Read whichever processor files a checkpoint folder has; defaults for the rest. Values that
        would divide by zero, allocate without bound or normalise to garbage raise ConfigError here,
        as does a patch size other than `patch_size` (the vision tower's, when given)."""
        d = Path(path)
        pre = _read_json(d / "preprocessor_config.json")
        video = _read_json(d / "video_preprocessor_config.json")
        proc = _read_json(d / "processor_config.json")
        model = _read_json(d / "config.json")  # the original format keeps use_token_compression here
        v: dict = {"use_token_compression": model.get("use_token_compression")}
        names = {f.name for f in fields(cls)}
        try:
            # Original format: processor_config.json + budgets in merged tokens.
            v["fps"] = proc.get("fps")
            v["image_merge_size"] = proc.get("image_merge_size")
            v["video_merge_size"] = proc.get("video_merge_size")
            # processor_config.json's max_frames (128) is ignored: vl3 uses 180.
            v["patch_size"] = pre.get("patch_size")
            v["image_mean"] = pre.get("image_mean", pre.get("mean"))
            v["image_std"] = pre.get("image_std", pre.get("std"))
            if "merge_size" in pre and "min_tokens" not in pre:
                v["image_merge_size"] = pre["merge_size"]
            min_px, max_px = _pixel_budget(pre)
            v["image_min_pixels"], v["image_max_pixels"] = min_px, max_px
            # HF video file.
            v["video_merge_size"] = video.get("merge_size", v["video_merge_size"])
            for key in ("fps", "min_frames", "max_frames", "use_token_compression"):
                if key in video:
                    v[key] = video[key]
            v["video_min_pixels"], v["video_max_pixels"] = _pixel_budget(video)
            if v["patch_size"] is None:
                v["patch_size"] = video.get("patch_size")
            v = {k: x for k, x in v.items() if x is not None and k in names}
            if "min_tokens" in pre or "max_tokens" in pre:  # original: budgets in merged tokens
                p = v.get("patch_size", cls.patch_size)
                im = (p * v.get("image_merge_size", cls.image_merge_size)) ** 2
                vm = (p * v.get("video_merge_size", cls.video_merge_size)) ** 2
                if "min_tokens" in pre:
                    v["image_min_pixels"] = int(pre["min_tokens"]) * im
                    v.setdefault("video_min_pixels", int(pre["min_tokens"]) * vm)
                if "max_tokens" in pre:
                    v["image_max_pixels"] = int(pre["max_tokens"]) * im
                    v.setdefault("video_max_pixels", int(pre["max_tokens"]) * vm)
            for key in ("image_mean", "image_std"):
                if key in v:
                    x = v[key]
                    v[key] = tuple(float(a) for a in (x if isinstance(x, list) else [x] * 3))
                    if len(v[key]) != 3:
                        raise ValueError(f"{key} needs 3 values, got {x!r}")
            for key in ("patch_size", "image_merge_size", "video_merge_size", "image_min_pixels",
                        "image_max_pixels", "video_min_pixels", "video_max_pixels", "min_frames",
                        "max_frames"):  # fmt: skip
                if key in v:
                    v[key] = int(v[key])
            if "fps" in v:
                v["fps"] = float(v["fps"])
            if "use_token_compression" in v:
                v["use_token_compression"] = bool(v["use_token_compression"])
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ConfigError(f"{d}: bad value in the processor config files ({e})") from None
        config = cls(**v)
        problem = config._problem(patch_size)
        if problem:
            raise ConfigError(f"{d}: bad value in the processor config files ({problem})")
        return config

    def _problem(self, patch_size: int | None = None) -> str | None:
        """What makes these settings unusable (None when nothing does)."""
        for key in ("patch_size", "image_merge_size", "video_merge_size", "image_min_pixels", "image_max_pixels",
                    "video_min_pixels", "video_max_pixels", "min_frames", "max_frames"):  # fmt: skip
            if getattr(self, key) <= 0:
                return f"{key} must be positive, not {getattr(self, key)}"
        if patch_size is not None and self.patch_size != patch_size:
            return f"patch_size {self.patch_size} differs from the vision tower's {patch_size} (config.json)"
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if lo > hi:
                return f"{kind} min_pixels {lo} is above max_pixels {hi}"
            if hi > MAX_PIXELS:
                return f"{kind} max_pixels {hi} is above {MAX_PIXELS}"
        if not (math.isfinite(self.fps) and self.fps > 0):
            return f"fps must be a positive number, not {self.fps}"
        if not all(math.isfinite(x) for x in (*self.image_mean, *self.image_std)) or 0 in self.image_std:
            return f"image_mean {list(self.image_mean)} / image_std {list(self.image_std)} must be finite, std non-zero"
        return None


def _read_json(path: Path) -> dict:
    """The file's JSON object, or {} when the checkpoint does not have that file."""
    return read_json(path) if path.is_file() else {}


def _pixel_budget(d: dict) -> tuple[int | None, int | None]:
    """(min, max) pixels from an HF processor file: min_pixels/max_pixels or size{...}."""
    size = d.get("size") if isinstance(d.get("size"), dict) else {}
    lo = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    hi = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    return lo, hi


@dataclass
class VisualInput:
    path: str
    kind: str  # "image" | "video"
    patches: torch.Tensor  # (t*h*w, 3*p*p) uint8, merge-window order
    table: torch.Tensor  # (3, 256) float32: the normalised value of each level per channel
    grid_thw: tuple[int, int, int]  # in patches
    merge_size: int
    keep: torch.Tensor | None  # (t*(h/m)*(w/m),) bool over merged tokens; None = keep all
    timestamps: list[float]  # video: presentation time of each used frame (s); image: []
    source_width: int  # as displayed (EXIF orientation, a video's display matrix)
    source_height: int
    duration: float | None  # video: what could be read, in seconds
    fps: float | None
    resized_width: int
    resized_height: int
    decoder: str = ""  # "pillow" | "decord" | "pyav": accounting only
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. a video cut short; without the path
    segment: tuple[float, float] | None = None  # the window of a long video this input covers (s)

    @property
    def pixel_values(self) -> torch.Tensor:
        """(t*h*w, 3*p*p) float32, normalised."""
        return normalise(self.patches, self.table)

    @property
    def visual_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * (h // self.merge_size) * (w // self.merge_size)

    @property
    def visual_tokens_kept(self) -> int:
        return self.visual_tokens if self.keep is None else int(self.keep.sum())

    @property
    def tokens_per_frame(self) -> list[int]:
        t = self.grid_thw[0]
        if self.keep is None:
            return [self.visual_tokens // t] * t
        return [int(n) for n in self.keep.view(t, -1).sum(dim=1)]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) multiples of ``factor`` within the pixel budget, aspect ratio kept."""
    if min(height, width) < 1:
        raise MediaError(f"empty picture ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(
            f"aspect ratio {ratio:.1f} ({width}x{height}) is above {MAX_ASPECT_RATIO}; crop or pad it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        return _fit_within(height, width, factor, max_pixels)
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _fit_within(height: int, width: int, factor: int, max_pixels: int) -> tuple[int, int]:
    """The largest multiples of ``factor`` of the picture scaled to ``max_pixels`` (one ``factor``
    at least per side, so an extreme aspect ratio can stay above the budget)."""
    beta = math.sqrt((height * width) / max_pixels)
    return max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)


def resized_size(
    height: int, width: int, *, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int,
    frames: int = 1, max_tokens: int | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Target (height, width) of one picture or of each of a video's ``frames`` frames.

    ``max_pixels`` is the whole input's budget (divided among frames); ``max_tokens`` the
    user's cap in merged tokens for the whole input.
    """
    factor = patch_size * merge_size
    hi = max(1, max_pixels // frames)
    if max_tokens is not None:
        per_frame = max_tokens // frames
        if per_frame < 1:
            raise UsageError(
                f"--max-visual-tokens {max_tokens} is below one token per frame for {frames} frames; "
                "raise it or sample fewer frames (--max-frames)"
            )
        hi = min(hi, per_frame * factor * factor)
    h, w = smart_resize(height, width, factor, min(min_pixels, hi), hi)
    if h * w > hi:  # scaled up past the budget (its min was lowered to it): the largest size within it
        h, w = _fit_within(height, width, factor, hi)
    if max_tokens is not None and frames * (h // factor) * (w // factor) > max_tokens:
        raise UsageError(
            f"--max-visual-tokens {max_tokens} is too small for a {width}x{height} input "
            f"(needs {frames * (h // factor) * (w // factor)} at the smallest size)"
        )
    return h, w


def patchify(frames: np.ndarray, patch_size: int, merge_size: int) -> np.ndarray:
    """(t, H, W, 3) -> (t*gh*gw, 3*p*p) in merge-window order, channel-first rows; any dtype."""
    t, height, width, c = frames.shape
    p, m = patch_size, merge_size
    gh, gw = height // p, width // p
    x = frames.reshape(t, gh // m, m, p, gw // m, m, p, c)  # (t, bh, mh, ph, bw, mw, pw, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # (t, bh, bw, mh, mw, c, ph, pw)
    return x.reshape(t * gh * gw, c * p * p)


def normalise_table(mean, std) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level per channel, computed as
    transformers does (float64 rescale cast to float32, then float32 (x - mean) / std)."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (256,)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean32) / std32  # (3, 256)


def normalise(patches: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3*p*p) channel-first patch rows -> float32 through the (3, 256) table, on their device."""
    rows = patches.reshape(-1, 3, patches.shape[-1] // 3).long()  # (N, 3, p*p)
    channel = torch.arange(3, device=patches.device)[:, None]
    return table[channel, rows].view(patches.shape)


def to_pixel_values(frames: np.ndarray, config: ProcessorConfig, merge_size: int) -> torch.Tensor:
    """uint8 (t, H, W, 3) resized frames -> normalised float32 (t*gh*gw, 3*p*p)."""
    return normalise(torch.from_numpy(patchify(frames, config.patch_size, merge_size)), _table(config))


def _table(config: ProcessorConfig) -> torch.Tensor:
    return torch.from_numpy(normalise_table(config.image_mean, config.image_std))


def _with_path(path, e: MediaError) -> MediaError:
    msg = str(e)
    return e if msg.startswith(f"{path}:") else MediaError(f"{path}: {msg}")


def plan_video(path, config: ProcessorConfig, options: MediaOptions) -> media.Plan:
    """The ``plan`` callback of ``media.read_video``: metadata -> (timestamps, (w, h))."""
    m = config.video_merge_size

    def plan(meta: media.VideoMeta) -> tuple[list[float], tuple[int, int]]:
        if options.max_duration is not None and meta.duration > options.max_duration:
            raise MediaError(f"{path}: the video is {meta.duration:.0f} s long; videos up to {options.max_duration:g} s are taken here")
        try:
            timestamps = sample_timestamps(
                meta.duration, meta.frame_times, fps=options.fps, min_frames=options.min_frames,
                max_frames=options.max_frames, start=options.start, end=options.end,
            )  # fmt: skip
        except UsageError as e:  # e.g. --start past the end: name the file
            raise UsageError(f"{path}: {e}") from None
        size = partial(
            resized_size, meta.height, meta.width, patch_size=config.patch_size, merge_size=m,
            min_pixels=config.video_min_pixels, max_pixels=config.video_max_pixels, frames=len(timestamps),
        )  # fmt: skip
        try:
            h, w = size(max_tokens=options.max_visual_tokens)
        except MediaError as e:
            raise _with_path(path, e) from None
        if options.token_budget is not None:
            tokens = (h // (config.patch_size * m)) * (w // (config.patch_size * m))
            # pruning keeps the first frame whole and at least one token of every other frame
            pruned = options.prune and config.use_token_compression
            fewest = tokens + (len(timestamps) - 1) * (1 if pruned else tokens)
            if fewest > options.token_budget:
                raise ContextError(
                    f"{path}: {len(timestamps)} frames of {w}x{h} need at least {fewest} visual tokens; the model's "
                    f"context leaves {options.token_budget} after the answer: {_to_fit(size, options.token_budget)}"
                )
        return timestamps, (w, h)

    return plan


def _to_fit(size: Callable[..., tuple[int, int]], budget: int) -> str:
    """Advice for frames over the context's `budget`: a --max-visual-tokens cap that leaves the
    prompt's text `PROMPT_ROOM` positions, when `size` (the frames' `resized_size`) takes it (at
    least one token per frame); else fewer frames or a shorter answer."""
    cap = budget - PROMPT_ROOM
    try:
        size(max_tokens=cap)
    except UsageError:  # no cap fits that many frames
        return "lower --max-new-tokens or --max-frames"
    return f"pass --max-visual-tokens {cap} (frames are made smaller), or a shorter --start/--end clip, or lower --max-new-tokens"


def prepare_visual(
    path, config: ProcessorConfig, options: MediaOptions, *, decoder: str = "auto", name: str | None = None
) -> VisualInput:
    """Decode, sample, resize, normalise, patchify and prune one image or video.

    ``path`` is a file or an http(s) URL; a URL is downloaded to a temporary file
    (``fetch.local_copy``: size and time limits) deleted afterwards. ``VisualInput.path`` and
    errors name ``name`` (default: ``path``, the URL for a URL). ``decoder``
    forces a video backend ("decord" or "pyav"); "auto" picks decord when it can read the
    file and falls back to PyAV.
    """
    options.validate()
    path = os.fspath(path)
    if fetch.is_url(path):
        return _prepare_url(path, config, options, decoder)
    name = path if name is None else name
    if media.detect_kind(path) == "image":
        image = media.load_image(path)
        m = config.image_merge_size
        try:
            h, w = resized_size(
                image.height, image.width, patch_size=config.patch_size, merge_size=m,
                min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels,
                max_tokens=options.max_visual_tokens,
            )  # fmt: skip
        except MediaError as e:
            raise _with_path(name, e) from None
        resized = image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BICUBIC)
        frame = np.asarray(resized, dtype=np.uint8)[None]  # (1, h, w, 3)
        p = config.patch_size
        return VisualInput(
            path=name, kind="image", patches=torch.from_numpy(patchify(frame, p, m)), table=_table(config),
            grid_thw=(1, h // p, w // p), merge_size=m, keep=None, timestamps=[],
            source_width=image.width, source_height=image.height, duration=None, fps=None,
            resized_width=w, resized_height=h, decoder="pillow",
        )  # fmt: skip

    video = media.read_video(path, plan_video(name, config, options), backend=decoder)
    return _video_input(name, video.frames, video.timestamps, video.meta, config, options, video.backend, video.warnings)


def _video_input(name: str, frames: np.ndarray, timestamps, meta, config: ProcessorConfig, options: MediaOptions,
                 backend: str, warnings, segment=None) -> VisualInput:  # fmt: skip
    """Decoded uint8 frames (t, h, w, 3) of a video -> its VisualInput (normalised, pruned)."""
    m = config.video_merge_size
    t, h, w, _ = frames.shape
    p = config.patch_size
    patches = torch.from_numpy(patchify(frames, p, m))
    grid = (t, h // p, w // p)
    keep = None
    if options.prune and config.use_token_compression:
        keep = prune_mask(patches, grid, m, threshold=options.prune_threshold, table=_table(config))
    return VisualInput(
        path=name, kind="video", patches=patches, table=_table(config), grid_thw=grid, merge_size=m,
        keep=keep, timestamps=[float(x) for x in timestamps], source_width=meta.width, source_height=meta.height,
        duration=meta.duration, fps=meta.fps, resized_width=w, resized_height=h, decoder=backend,
        warnings=list(warnings), segment=segment,
    )  # fmt: skip


def prepare_segments(
    path, config: ProcessorConfig, options: MediaOptions, spans, *, skip=frozenset(), decoder: str = "auto",
    name: str | None = None,
) -> Iterator[VisualInput]:  # fmt: skip
    """The windows of a long video, one VisualInput each, as soon as each is decoded.

    ``spans(path, meta)`` gives the windows ((start, end) seconds; segments.py). Each window is
    sampled with the usual fps / frame-bound rules inside it and pruned as a video of its own;
    the file is decoded once, forward (video.decode_windows), and memory holds one window's frames.
    Windows in ``skip`` (already answered) are not decoded. An image, or an animated one, is one
    input without a window. A file cut short or damaged ends with the last window that decoded, and
    every window carries the warning that says so (as ``read_video`` gives it).
    """
    options.validate()
    path = os.fspath(path)
    name = path if name is None else name
    if fetch.is_url(path):
        with fetch.local_copy(path, **options.download_limits()) as local:
            try:
                yield from prepare_segments(local, config, options, spans, skip=skip, decoder=decoder, name=path)
            except Vl3Error as e:
                raise type(e)(str(e).replace(str(local), path)) from e
        return
    if media.detect_kind(path) == "image" or media.is_animated_image(path):
        yield prepare_visual(path, config, options, decoder=decoder, name=name)
        return
    try:
        meta = container.probe(path)
    except Vl3Error as e:
        raise _with_path(name, e) if isinstance(e, MediaError) else e from None
    try:  # --start past the end, too many segments: before shot detection decodes the file
        resolve_window(meta.duration, options.start, options.end)
        with media.decoder_errors(name):  # shot detection decodes the file too
            answered = {span_key(span) for span in skip}
            windows = [span for span in spans(path, meta) if span_key(span) not in answered]
    except UsageError as e:
        raise UsageError(f"{name}: {e}") from None
    plans = [plan_video(name, config, replace(options, start=s, end=e))(meta) for s, e in windows]
    decoded = _named_errors(name, video.decode_windows(path, meta, plans, decoder))
    for (s, e), (timestamps, _), (frames, backend, end) in zip(windows, plans, decoded):
        if end is not None:  # the file breaks inside this window: what decodes of it, and nothing after
            meta = replace(meta, duration=end, truncated=True)
            timestamps = timestamps[: len(frames)]
            if not len(frames):
                raise MediaError(f"{name}: truncated or damaged video: nothing decodes after {end:.1f} s") from None
        warnings = [media.truncation_note(meta, len(frames))] if meta.truncated else []  # cut, as probe or decoding found
        yield _video_input(name, frames, timestamps, meta, config, options, backend, warnings, (s, min(e, meta.duration)))
        if end is not None:
            return


def _named_errors(name: str, items: Iterator):
    """`items`, with a decoder's exception while producing one turned into a MediaError naming `name`."""
    while True:
        with media.decoder_errors(name):
            item = next(items, None)
        if item is None:
            return
        yield item


def _prepare_url(url: str, config: ProcessorConfig, options: MediaOptions, decoder: str) -> VisualInput:
    with fetch.local_copy(url, **options.download_limits()) as local:
        try:
            return prepare_visual(local, config, options, decoder=decoder, name=url)
        except Vl3Error as e:  # name the URL, not the temporary file
            raise type(e)(str(e).replace(str(local), url)) from e
