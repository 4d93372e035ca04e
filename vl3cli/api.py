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

`describe` and `ask` raise when the media cannot be used; `caption_many` (like `vl3 batch`)
yields an error record (`Result.error` set) for a bad file and goes on. The command line, the
server and the Ray engine are thin callers of this module: `Model.run` is the one road.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from .chat import Chat
from .errors import UsageError
from .hub import DEFAULT_MODEL, model_label, resolve_model
from .options import Options
from .output import Result
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
    """A loaded checkpoint. Not thread-safe: one call at a time (the server runs one loop)."""

    def __init__(self, engine, label: Label, defaults: Options, load_s: float = 0.0):
        self.engine = engine
        self.label = label
        self.defaults = defaults
        self.runner = Runner(engine, label, load_s)

    @property
    def name(self) -> str:
        return self.label.model

    def options(self, **options) -> Options:
        """The model's default options with these changed (checked)."""
        merged = self.defaults.replace(**options) if options else self.defaults
        check_budget(self.engine.config, merged)
        return merged

    def describe(self, media: str, prompt: str | None = None, *, on_text: Callable[[str], None] | None = None, **options) -> Result:
        """Caption an image or video (or answer `prompt` about it). `on_text` receives the answer as it grows."""
        (result,) = self.ask(media, [prompt], on_text=(lambda i, piece: on_text(piece)) if on_text else None, **options)
        return result

    def ask(
        self,
        media: str | Sequence[str],
        questions: str | None | Sequence[str | None],
        *,
        on_text: Callable[[int, str], None] | None = None,
        **options,
    ) -> list[Result]:
        """Answers to one or more questions about some images and/or videos (in prompt order; none:
        a text-only prompt), read and encoded once for all the questions.

        `on_text(question_number, piece)` receives each answer as it grows.
        """
        media = (media,) if isinstance(media, str) else tuple(media)
        prompts = tuple([questions] if questions is None or isinstance(questions, str) else questions)
        if not prompts:
            raise UsageError("ask needs at least one question")
        if self.options(**options).segments is not None:  # given here or as the model's default
            raise UsageError("with segments there is one answer per segment: use model.segments(...)")
        results: list[Result | None] = [None] * len(prompts)
        stream = (lambda key, piece: on_text(key[1], piece)) if on_text else None
        for (_, i), result in self.run([Item(media, prompts)], on_text=stream, **options):
            result.raise_error()
            results[i] = result
        return results

    def segments(
        self, media: str, questions: str | None | Sequence[str | None] = None, *, segments: float | str = 30.0, **options
    ) -> Iterator[Result]:
        """Answers about each segment of a long video, in time order (each question on each segment):
        `segments` seconds per window, or "scenes" (shot boundaries; `min_segment`, `max_segment`,
        `scene_threshold`). The file is decoded once; each answer comes as soon as it and every
        earlier one are done."""
        prompts = tuple([questions] if questions is None or isinstance(questions, str) else questions)
        done: dict[int, Result] = {}
        next_index = 0
        for (_, i), result in self.run([Item((media,), prompts)], segments=segments, **options):
            result.raise_error()
            done[i] = result
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1

    def chat(self, media: str | Sequence[str] = (), **options) -> Chat:
        """A conversation about some images and/or videos (none: text only); see chat.py."""
        media = (media,) if isinstance(media, str) else tuple(media)
        options = self.options(**options)
        if options.segments is not None:
            raise UsageError("a chat is about the whole media; segments are for model.segments(...)")
        return Chat(self, media, options)

    def caption_many(
        self,
        paths: Iterable[str],
        prompt: str | None = None,
        *,
        batch_size: int = 8,
        workers: int = 2,
        check: Check | None = None,
        **options,
    ) -> Iterator[Result]:
        """One Result per file, in the order they finish; a bad file gives an error record."""
        items = (Item((path,), (prompt,)) for path in paths)
        for _, result in self.run(items, batch_size=batch_size, workers=workers, check=check, **options):
            yield result

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
        KeyboardInterrupt there to stop); `on_text(key, piece)` streams the answers.
        """
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
        if workers < 1:
            raise UsageError(f"--workers must be at least 1 (got {workers})")
        run_options = self.options(**options)
        kwargs = {"check": check} if check else {}
        yield from self.runner.run(items, run_options, slots=batch_size, workers=workers, on_text=on_text, **kwargs)

