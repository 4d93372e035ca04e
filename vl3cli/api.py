"""The Python API: load a model once, then describe, ask and caption many files.

    import vl3cli

    model = vl3cli.load("DAMO-NLP-SG/VideoLLaMA3-2B", device="auto", dtype="auto")
    r = model.describe("clip.mp4", fps=2, max_frames=64)          # -> Result (a record's fields)
    rs = model.ask("clip.mp4", ["What happens first?", "And last?"])
    for r in model.caption_many(paths, prompt=None, batch_size=8):   # continuous batching, as `vl3 batch`
        print(r.path, r.text or r.error)

Keyword options are the command line's, under the same names and with the same defaults
(`max_new_tokens`, `temperature`, `fps`, `max_frames`, `start`, `system`, ...; see `Options`).
Options given to `load` become the model's defaults; options given to a call override them for
that call. Bad values raise the same `Vl3Error` subclasses the command line reports (`UsageError`
for a bad option, `MediaError` for a file that cannot be read, ...).

Arguments are checked when a call is made (generators included), once for every caller
(`media_paths`, `checked_question`): media is a path or URL as str or os.PathLike, or a list of
them; a question is text, not empty; anything else is a `UsageError` naming the argument.
`describe` and `ask` raise when the media cannot be used; `caption_many` (like `vl3 batch`)
yields an error record (`Result.error` set) for a bad file and goes on. Threads may share one
`Model`: their runs take turns on the engine, one answer at a time (`Model.run`). The command
line, the server and the Ray engine are thin callers of this module: `Model.run` is the one road.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace

from .chat import Chat
from .errors import EMPTY_QUESTION, UsageError
from .hub import DEFAULT_MODEL, model_label, resolve_model
from .options import Options
from .output import Result, charge_shared_work, is_text
from .pipeline import Check, Item, Key, Label, OnText, Runner

__all__ = ["Chat", "Item", "Model", "Options", "Result", "load"]


def load(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    name: str | None = None,
    **options,
) -> Model:
    """Load a checkpoint (a local folder or a Hub repo id, either format) once.

    `device`: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N", "mps". `dtype`:
    "auto" (the checkpoint's dtype where the hardware runs it natively), "bfloat16", "float16",
    "float32". `quantize`: None, "int8" or "int4" (weights of the language model). `name`: how
    records name the model (default: `model`, with `@revision` for a Hub revision), for a caller
    that loads the checkpoint by another path than the user gave (a Ray actor loads a folder by its
    absolute path). Other keyword options become the model's defaults; they are checked against
    the checkpoint's config before any weight is downloaded or read.
    """
    from .config import ModelConfig
    from .engine import Engine
    from .media import native_logging

    model = _text(model, "model", "a checkpoint folder or a Hub repo id", path=True)
    device = _text(device, "device", '"auto", "cpu", "cuda", "cuda:N" or "mps"')
    dtype = _text(dtype, "dtype", '"auto", "bfloat16", "float16" or "float32"')
    for key, value in (("revision", revision), ("quantize", quantize), ("name", name)):
        if value is not None:
            _text(value, key, "text (or None)")
    defaults = Options.from_kwargs(**options)
    native_logging(os.environ.get("VL3_DEBUG", "") not in ("", "0"))  # decoders' own log lines: only when debugging
    start = time.perf_counter()
    path = resolve_model(model, revision, on_config=lambda folder: check_budget(ModelConfig.from_dir(folder), defaults))
    engine = Engine.load(path, device=device, dtype=dtype, **({"quantize": quantize} if quantize else {}))
    label = Label(
        model=name or model_label(model, revision),
        dtype=str(engine.dtype).removeprefix("torch."),
        device=str(engine.device),
        quantize=quantize,
    )
    return Model(engine, label, defaults, time.perf_counter() - start)


def check_budget(config, options: Options) -> None:
    """Refuse options no input could satisfy (checked once, not per file): the answer alone
    must leave room in the context for a prompt with at least one visual token."""
    context = config.text.max_position_embeddings
    if options.max_new_tokens >= context:
        raise UsageError(
            f"--max-new-tokens {options.max_new_tokens} leaves no room for the prompt in the model's "
            f"{context}-token context; lower it (e.g. --max-new-tokens {min(512, context // 4)})"
        )


class Model:
    """A loaded checkpoint. Threads may share it: their calls take turns on the engine, each run
    going on until its next answer is done (`run`); a run left unfinished holds nothing."""

    def __init__(self, engine, label: Label, defaults: Options, load_s: float = 0.0):
        self.engine = engine
        self.label = label
        self.defaults = defaults
        self.runner = Runner(engine, label, load_s)
        # Re-entrant: a caller's on_text or check may itself call the model from the same thread.
        self._turn = threading.RLock()

    @property
    def name(self) -> str:
        return self.label.model

    def options(self, **options) -> Options:
        """The model's default options with these changed (checked)."""
        merged = self.defaults.replace(**options) if options else self.defaults
        check_budget(self.engine.config, merged)
        return merged

    def describe(self, media: str | os.PathLike, prompt: str | None = None, *, on_text: Callable[[str], None] | None = None,
                 **options) -> Result:  # fmt: skip
        """Caption an image or video (or answer `prompt` about it). `on_text` receives the answer as it grows."""
        if media is None:
            raise UsageError("describe needs an image or video (a path or URL)")
        checked_question(prompt, "prompt")
        check_callable(on_text, "on_text")
        (result,) = self.ask(media, [prompt], on_text=(lambda i, piece: on_text(piece)) if on_text else None, **options)
        return result

    def ask(
        self,
        media: str | os.PathLike | Sequence[str | os.PathLike],
        questions: str | None | Sequence[str | None],
        *,
        on_text: Callable[[int, str], None] | None = None,
        **options,
    ) -> list[Result]:
        """Answers to one or more questions about some images and/or videos (in prompt order; none:
        a text-only prompt), read and encoded once for all the questions.

        `on_text(question_number, piece)` receives each answer as it grows.
        """
        media, prompts = media_paths(media), question_list(questions)
        check_callable(on_text, "on_text")
        if not prompts:
            raise UsageError("ask needs at least one question")
        if self.options(**options).segments is not None:  # given here or as the model's default
            raise UsageError("with segments there is one answer per segment: use model.segments(...)")
        results: list[Result | None] = [None] * len(prompts)
        stream = (lambda key, piece: on_text(key[1], piece)) if on_text else None
        for (_, i), result in self.run([Item(media, prompts)], on_text=stream, **options):
            result.raise_error()
            results[i] = result
        charge_shared_work(results[0], results[1:])
        return results

    def segments(
        self, media: str | os.PathLike, questions: str | None | Sequence[str | None] = None, *, segments: float | str = 30.0,
        **options,
    ) -> Iterator[Result]:  # fmt: skip
        """Answers about each segment of a long video, in time order (each question on each segment):
        `segments` seconds per window, or "scenes" (shot boundaries; `min_segment`, `max_segment`,
        `scene_threshold`). The file is decoded once; each answer comes as soon as it and every
        earlier one are done. An image is refused: it has no segments."""
        if media is None or not isinstance(media, (str, os.PathLike)):
            raise UsageError(f"segments cuts one video: media must be a path or URL (str or os.PathLike), not {type(media).__name__}")
        (path,), prompts = media_paths(media), question_list(questions)
        if segments is None:
            raise UsageError('segments must be seconds per window or "scenes"')
        if not prompts:
            raise UsageError("segments needs at least one question (or None to describe each segment)")
        check_segmentable(path)
        items = self.run([Item((path,), prompts)], segments=segments, **options)  # checks the options now
        return self._in_order(items)

    @staticmethod
    def _in_order(items: Iterator[tuple[Key, Result]]) -> Iterator[Result]:
        done: dict[int, Result] = {}
        next_index = 0
        for (_, i), result in items:
            result.raise_error()
            refuse_unsegmented(result)
            done[i] = result
            while next_index in done:
                charge_shared_work(done[next_index], list(done.values()))
                yield done.pop(next_index)
                next_index += 1

    def chat(self, media: str | os.PathLike | Sequence[str | os.PathLike] = (), **options) -> Chat:
        """A conversation about some images and/or videos (none: text only); see chat.py."""
        media = media_paths(media)
        options = self.options(**options)
        if options.segments is not None:
            raise UsageError("a chat is about the whole media; segments are for model.segments(...)")
        return Chat(self, media, options)

    def caption_many(
        self,
        paths: Iterable[str | os.PathLike],
        prompt: str | None = None,
        *,
        batch_size: int = 8,
        workers: int = 2,
        check: Check | None = None,
        **options,
    ) -> Iterator[Result]:
        """One Result per file, in the order they finish; a bad file gives an error record.
        `paths` may be one path (str or os.PathLike) or an iterable of them (read lazily)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = (paths,)
        elif paths is None or isinstance(paths, (bytes, bytearray)) or not isinstance(paths, Iterable):
            raise UsageError(f"paths must be a path (str or os.PathLike) or an iterable of them, not {type(paths).__name__}")
        checked_question(prompt, "prompt")
        items = (Item((path,), (prompt,)) for path in paths)
        results = self.run(items, batch_size=batch_size, workers=workers, check=check, **options)  # checks the options now
        return (result for _, result in results)

    def run(
        self,
        items: Iterable[Item],
        *,
        batch_size: int = 8,
        workers: int = 2,
        check: Check | None = None,
        on_text: OnText | None = None,
        **options,
    ) -> Iterator[tuple[Key, Result]]:
        """The one road: (key, Result) for every prompt of every item, in the order they finish.

        `key` is (item number, prompt number). Up to `batch_size` answers decode together and
        `workers` threads read the next items' media. `check` is called between steps (raise
        KeyboardInterrupt there to stop); `on_text(key, piece)` streams the answers. The arguments
        are checked when `run` is called; each item as it is taken (an item with an empty prompt
        becomes error records, as a bad file does).
        """
        _count(batch_size, "--batch-size")
        _count(workers, "--workers")
        check_callable(check, "check")
        check_callable(on_text, "on_text")
        if items is None or isinstance(items, (str, bytes, Item)) or not isinstance(items, Iterable):
            raise UsageError(f"run takes an iterable of vl3cli.Item, not {type(items).__name__}")
        run_options = self.options(**options)
        kwargs = {"check": check} if check else {}
        checked = (checked_item(item) for item in items)
        results = self.runner.run(checked, run_options, slots=batch_size, workers=workers, on_text=on_text, **kwargs)
        return self._in_turn(results)

    def _in_turn(self, results: Iterator[tuple[Key, Result]]) -> Iterator[tuple[Key, Result]]:
        """`results` advanced under the model's lock, one answer at a time: runs in several threads
        never drive the engine at once (on a GPU, a decode graph being captured cannot share the
        device with other work), and a run suspended between answers leaves the engine to the others."""
        try:
            while True:
                with self._turn:
                    try:
                        out = next(results)
                    except StopIteration:
                        return
                yield out
        finally:
            with self._turn:
                results.close()


# -- arguments: checked here, once for every caller, with the command line's wording --------------



def checked_question(value, name: str = "question", *, none: bool = True) -> str | None:
    """A question or prompt: text that is not empty or whitespace only (`none`: None, describe the media)."""
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{name}: a question must be text (str), not {type(value).__name__}")
    if not value.strip():
        raise UsageError(EMPTY_QUESTION)
    if not is_text(value):  # bytes that are not UTF-8, as a command line or stdin hands them over
        raise UsageError(f"{name}: the text is not valid UTF-8 (set the terminal to UTF-8, or retype it)")
    return value


def question_list(value, name: str = "questions") -> tuple[str | None, ...]:
    """One question (a str; None: describe the media) or a sequence of them, each checked."""
    if value is None or isinstance(value, str):
        value = (value,)
    elif isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise UsageError(f"{name}: a question must be text (str), not {type(value).__name__}")
    return tuple(checked_question(q, name) for q in value)


def media_path(value, name: str = "media") -> str:
    """One image or video: a path or URL, as str or os.PathLike, not empty."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a path or URL (str or os.PathLike), not {type(value).__name__}")
    if not value:
        raise UsageError(f"{name}: an empty path; give an image or video file or URL")
    return value


def media_paths(value, name: str = "media") -> tuple[str, ...]:
    """One image or video (str or os.PathLike) or a sequence of them (empty: a text-only prompt)."""
    if isinstance(value, (str, os.PathLike)):
        return (media_path(value, name),)
    if value is None or isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise UsageError(f"{name} must be a path or URL (str or os.PathLike) or a list of them, not {type(value).__name__}")
    return tuple(media_path(m, name) for m in value)


def checked_item(item) -> Item:
    """An item of `Model.run` with its media and prompts as tuples of str. A wrong type raises;
    an empty prompt (a manifest line can hold one) makes the item's error records instead."""
    if not isinstance(item, Item):
        raise UsageError(f"run takes vl3cli.Item(media, prompts) items, not {type(item).__name__}")
    media = media_paths(item.media, "Item.media")
    prompts = item.prompts
    if prompts is None or isinstance(prompts, str):
        prompts = (prompts,)
    elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
        raise UsageError(f"Item.prompts: a question must be text (str), not {type(prompts).__name__}")
    prompts = tuple(prompts)
    for p in prompts:
        if p is not None and not isinstance(p, str):
            raise UsageError(f"Item.prompts: a question must be text (str), not {type(p).__name__}")
    if not prompts:
        raise UsageError("an Item needs at least one prompt (None: describe its media)")
    if (media, prompts) != (item.media, item.prompts):
        item = replace(item, media=media, prompts=prompts)
    if not isinstance(item.prepared, BaseException) and any(p is not None and not p.strip() for p in prompts):
        item = replace(item, prepared=UsageError(EMPTY_QUESTION))
    return item


def check_segmentable(path: str) -> None:
    """Refuse --segments on a local image now (a URL is judged once fetched: `refuse_unsegmented`).
    Only for describe / ask / `Model.segments`: a batch treats an image as one segment."""
    from .fetch import is_url
    from .media import detect_kind, is_animated_image

    if not is_url(path) and (detect_kind(path) == "image" or is_animated_image(path)):
        raise UsageError(f"--segments cuts videos; {path} is an image")


def refuse_unsegmented(result: Result) -> None:
    """A --segments answer about media that was not cut (an image, once a URL is fetched)."""
    if result.segment_start is None:
        raise UsageError(f"--segments cuts videos; {result.path or 'this prompt'} is {'an image' if result.kind == 'image' else 'not one'}")


def _text(value, name: str, what: str, path: bool = False) -> str:
    if path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise UsageError(f"{name} must be {what}, not {type(value).__name__}")
    if not value.strip():
        raise UsageError(f"{name} is empty: give {what}")
    return value


def _count(value, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be a whole number, at least 1 (got {value!r})")
    if value < 1:
        raise UsageError(f"{option} must be at least 1 (got {value})")


def check_callable(value, name: str) -> None:
    if value is not None and not callable(value):
        raise UsageError(f"{name} must be a function (or None), not {type(value).__name__}")
