"""The one place where the stages meet: model -> media -> visual features -> prompt -> tokens -> Result.

`Pipeline.load()` resolves the model (hub.py) and loads the engine once per process. For each
media file, `Pipeline.encode(path)` decodes and pre-processes it (preprocess.py) and encodes it
(Engine.encode_visual) once; `Pipeline.answer(encoded, question)` then builds the prompt
(prompt.py), generates (generate.py) and returns one `Result` with timings. `run` does both.

Callers pass `check`, called between stages and between tokens: it raises KeyboardInterrupt to
abandon the item (batch.py's Ctrl-C handling), and `on_text(piece)` to stream an answer.
This module imports torch: the CLI imports it inside command bodies only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .decoding import DecodingParams
from .engine import Engine
from .generate import Request, generate, stream
from .hub import resolve_model
from .output import Result, StreamDecoder, error_result
from .preprocess import MediaOptions, ProcessorConfig, VisualInput, prepare_visual
from .prompt import build_input_ids, default_prompt

Check = Callable[[], None]
OnText = Callable[[str], None]

# Media options the checkpoint's processor config supplies when the command line leaves them out.
PROCESSOR_DEFAULTS = ("fps", "min_frames", "max_frames")


def _no_check() -> None:
    return None


@dataclass(frozen=True)
class Settings:
    """Everything the command line decides, apart from the inputs."""

    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None  # "int8" | "int4": the language model's weights (quantize.py)
    system: str | None = None
    seed: int | None = None
    decoding: DecodingParams = field(default_factory=DecodingParams)
    media: dict | None = None  # MediaOptions fields; None values fall back to the checkpoint's


@dataclass
class Encoded:
    """A media file ready for questions: its VisualInput and visual features (with their cost)."""

    visual: VisualInput
    features: torch.Tensor
    media_s: float
    encode_s: float


class Pipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine: Engine | None = None
        self.options: MediaOptions | None = None
        self._unpaid_load_s = 0.0  # charged to the next record

    def load(self) -> Pipeline:
        start = time.perf_counter()
        path = resolve_model(self.settings.model, self.settings.revision)
        # Bad media options fail before the (possibly long) weight loading.
        self.options = media_options(ProcessorConfig.from_dir(path), self.settings.media or {})
        self.options.validate()
        self.engine = Engine.load(path, device=self.settings.device, dtype=self.settings.dtype,
                                  quantize=self.settings.quantize)
        self._unpaid_load_s = time.perf_counter() - start
        return self

    def encode(self, path: str, check: Check = _no_check) -> Encoded:
        """Decode, pre-process and encode one media file (once, for any number of questions)."""
        start = time.perf_counter()
        visual = prepare_visual(path, self.engine.processor, self.options)
        media_s = time.perf_counter() - start
        check()
        start = time.perf_counter()
        with torch.inference_mode():
            features = self.engine.encode_visual(visual)
        encode_s = time.perf_counter() - start
        check()
        return Encoded(visual, features, media_s, encode_s)

    def answer(self, encoded: Encoded, question: str | None, check: Check = _no_check, on_text: OnText | None = None) -> Result:
        """One Result for `question` (None = the default prompt for the media's kind)."""
        visual = encoded.visual
        question = question if question is not None else default_prompt(visual.kind)
        result = self._generate(visual, encoded.features, question, check, on_text)
        result.timings.update(load_s=self._unpaid_load_s, media_s=encoded.media_s, encode_s=encoded.encode_s)
        result.timings["total_s"] = sum(v for k, v in result.timings.items() if k != "total_s")
        self._unpaid_load_s = encoded.media_s = encoded.encode_s = 0.0
        return result

    def run(self, path: str, questions: list[str | None], check: Check = _no_check) -> list[Result]:
        encoded = self.encode(path, check)
        return [self.answer(encoded, q, check) for q in questions]

    def run_many(
        self,
        paths: list[str],
        question: str | None,
        check: Check = _no_check,
        slots: int = 8,
        workers: int = 2,
    ) -> Iterator[Result]:
        """Results for many files, in the order they finish (errors as error records).

        Worker threads decode and pre-process the next files while the model works; up to
        `slots` answers decode together (continuous batching). Each item is prefilled alone and
        gets its own seed, so its answer is the one it would get on its own: token for token on CPU
        in float32; in bf16 or on a GPU a product over more rows may run another kernel and round
        differently.
        """
        engine = self.engine
        failed: deque[Result] = deque()
        state: dict[int, dict] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vl3-media")
        try:
            ahead = slots + workers
            futures: deque = deque()
            queue = iter(enumerate(paths))

            def fill() -> None:
                while len(futures) < ahead and (item := next(queue, None)) is not None:
                    key, path = item
                    futures.append((key, path, pool.submit(_timed, prepare_visual, path, engine.processor, self.options)))

            def requests():
                fill()
                while futures:
                    key, path, future = futures.popleft()
                    fill()
                    check()
                    try:
                        visual, media_s = future.result()
                        start = time.perf_counter()
                        features = engine.encode_visual(visual)
                        encode_s = time.perf_counter() - start
                        prompt = question if question is not None else default_prompt(visual.kind)
                        input_ids = self._input_ids(visual, prompt)
                        engine.check_length(len(input_ids) + self.settings.decoding.max_new_tokens)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # noqa: BLE001 -- one bad file must not end the run
                        failed.append(error_result(path, e, self.settings.model, question))
                        continue
                    state[key] = dict(visual=visual, prompt=prompt, input_ids=input_ids, ids=[], media_s=media_s,
                                      encode_s=encode_s, admitted=time.perf_counter(), first=None)
                    yield key, Request(input_ids, features, seed=self.settings.seed)

            with torch.inference_mode():
                for event in stream(engine, requests(), self.settings.decoding, slots):
                    while failed:
                        yield failed.popleft()
                    key = event.key
                    item = state[key]
                    now = time.perf_counter()
                    if item["first"] is None:
                        item["first"] = now
                    if event.token is not None:
                        item["ids"].append(event.token)
                        check()
                    if not event.finished:
                        continue
                    del state[key]
                    result = self._record(item["visual"], item["prompt"], item["input_ids"], item["ids"],
                                          item["first"] - item["admitted"], now - item["first"])
                    result.timings.update(load_s=self._unpaid_load_s, media_s=item["media_s"], encode_s=item["encode_s"])
                    result.timings["total_s"] = sum(v for k, v in result.timings.items() if k != "total_s")
                    self._unpaid_load_s = 0.0
                    yield result
                    check()
            while failed:
                yield failed.popleft()
        finally:
            # On Ctrl-C do not wait for files still being decoded: their items are redone next run.
            pool.shutdown(wait=False, cancel_futures=True)

    def _input_ids(self, visual: VisualInput, question: str) -> list[int]:
        engine = self.engine
        return build_input_ids(
            engine.tokenizer, engine.config, question, visual.kind, visual.tokens_per_frame, visual.timestamps,
            self.settings.system,
        )

    def _generate(self, visual: VisualInput, features, question: str, check: Check, on_text: OnText | None) -> Result:
        engine = self.engine
        input_ids = self._input_ids(visual, question)
        stream_text = StreamDecoder(engine.tokenizer) if on_text else None
        ids: list[int] = []
        start = time.perf_counter()
        first = None
        with torch.inference_mode():
            request = Request(input_ids, features, seed=self.settings.seed)
            for step in generate(engine, [request], self.settings.decoding):
                if first is None:
                    first = time.perf_counter()
                token = step[0]
                if token is None:
                    break
                ids.append(token)
                if stream_text and (piece := stream_text.push(token)):
                    on_text(piece)
                check()
        end = time.perf_counter()
        if stream_text and (piece := stream_text.finish()):
            on_text(piece)
        first = first or end
        return self._record(visual, question, input_ids, ids, first - start, end - first)

    def _record(self, visual: VisualInput, question: str, input_ids: list[int], ids: list[int],
                prefill_s: float, decode_s: float) -> Result:
        settings = self.settings
        return Result(
            path=visual.path,
            kind=visual.kind,
            prompt=question,
            text=self.engine.tokenizer.decode(ids),
            model=settings.model,
            width=visual.source_width,
            height=visual.source_height,
            duration=visual.duration,
            frames=len(visual.timestamps) if visual.kind == "video" else 1,
            timestamps=[round(t, 3) for t in visual.timestamps] if visual.kind == "video" else None,
            resized=[visual.resized_width, visual.resized_height],
            visual_tokens=visual.visual_tokens,
            visual_tokens_kept=visual.visual_tokens_kept,
            prompt_tokens=len(input_ids),
            generated_tokens=len(ids),
            finish_reason="length" if len(ids) >= settings.decoding.max_new_tokens else "stop",
            timings={"prefill_s": prefill_s, "decode_s": decode_s},
        )


def _timed(fn, *args):
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def media_options(processor, overrides: dict) -> MediaOptions:
    """MediaOptions from the command line, with fps / min / max frames from the checkpoint when not given."""
    values = {k: v for k, v in overrides.items() if v is not None}
    for name in PROCESSOR_DEFAULTS:
        if name not in values and getattr(processor, name, None) is not None:
            values[name] = getattr(processor, name)
    return MediaOptions(**values)
