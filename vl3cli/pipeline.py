"""Where the stages meet: items -> media -> visual features -> prompts -> tokens -> Results.

`Runner.run(items, options)` is the one road every surface takes (describe, ask, batch, the
Python API; see api.py). An `Item` is some media and the prompts asked about them; each prompt
gets one `Result`. Worker threads decode and pre-process the next items' media while the model
works (preprocess.py); an item joins the batch only once its media is ready, so decoding never
waits for a file. Its visuals are encoded once (Engine.encode_visual), each prompt is laid out
(prompt.py) and checked against the model's context before any encoding, and up to `slots`
answers decode together (generate.Scheduler). Results come out in the order they finish, keyed
by (item number, prompt number); a failing item becomes error records and the run goes on.

Callers pass `check`, called between steps: it raises KeyboardInterrupt to abandon the run
(batch.StopSignal), and `on_text(key, piece)` to stream answers as they grow. This module
imports torch: the CLI imports it inside command bodies only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from .errors import UsageError, Vl3Error
from .generate import Request, Scheduler
from .options import Options
from .output import Result, StreamDecoder, error_message
from .preprocess import VisualInput, prepare_visual
from .prompt import build_input_ids, default_prompt

Key = tuple[int, int]  # (item number, prompt number)
WAIT_S = 0.2  # how long the loop waits for media before it checks for Ctrl-C again
Check = Callable[[], None]
OnText = Callable[[Key, str], None]


def _no_check() -> None:
    return None


@dataclass(frozen=True)
class Item:
    """Media (paths or URLs, in prompt order) and the prompts asked about them (None: describe)."""

    media: tuple[str, ...]
    prompts: tuple[str | None, ...] = (None,)
    id: str | None = None
    options: Options | None = None  # None: the run's options


@dataclass(frozen=True)
class Label:
    """What every record says about the model that answered."""

    model: str
    dtype: str
    device: str
    quantize: str | None = None


@dataclass
class _Answer:
    """An answer in progress."""

    item: Item
    options: Options
    visual: VisualInput
    given: str | None  # the prompt as asked (None: the default one)
    prompt: str  # the prompt used
    input_ids: list[int]
    timings: dict
    stream: StreamDecoder | None
    ids: list[int] = field(default_factory=list)
    first: float | None = None  # when its first token came


class Runner:
    def __init__(self, engine, label: Label, load_s: float = 0.0):
        self.engine = engine
        self.label = label
        self._unpaid_load_s = load_s  # charged to the next record
        self._media: dict[Options, object] = {}

    def media_options(self, options: Options):
        if options not in self._media:
            self._media[options] = options.media(self.engine.processor)
        return self._media[options]

    def run(
        self,
        items: Iterable[Item],
        options: Options,
        *,
        slots: int = 8,
        workers: int = 2,
        check: Check = _no_check,
        on_text: OnText | None = None,
    ) -> Iterator[tuple[Key, Result]]:
        engine = self.engine
        scheduler = Scheduler(engine, options.decoding, slots)
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vl3-media")
        pending = iter(enumerate(items))
        preparing: deque = deque()  # (number, item, options, future) in submission order
        answers: dict[Key, _Answer] = {}
        ahead = slots + workers
        try:
            while True:
                while len(preparing) < ahead and (next_item := next(pending, None)) is not None:
                    n, item = next_item
                    opts = item.options or options
                    try:
                        media = self.media_options(opts)
                    except Vl3Error as e:
                        yield from self._failed(n, item, opts, e)
                        continue
                    preparing.append((n, item, opts, pool.submit(_prepare, item, engine.processor, media)))
                if not preparing and scheduler.idle:
                    return
                if scheduler.idle:  # nothing to decode: wait for some media
                    wait([f for *_, f in preparing], timeout=WAIT_S, return_when=FIRST_COMPLETED)
                for entry in [e for e in preparing if e[3].done()]:
                    if len(scheduler.queue) >= slots:  # enough waiting for a row; keep the rest undecoded
                        break
                    preparing.remove(entry)
                    n, item, opts, future = entry
                    check()
                    yield from self._admit(n, item, opts, future, scheduler, answers, on_text)
                check()
                for event in scheduler.step():
                    answer = answers[event.key]
                    now = time.perf_counter()
                    if answer.first is None:
                        answer.first = now
                    if event.token is not None:
                        answer.ids.append(event.token)
                        if answer.stream and (piece := answer.stream.push(event.token)):
                            on_text(event.key, piece)
                        continue
                    del answers[event.key]
                    if answer.stream and (piece := answer.stream.finish()):
                        on_text(event.key, piece)
                    answer.timings.update(prefill_s=event.prefill_s, decode_s=now - answer.first)
                    yield event.key, self._record(answer, event.reason)
        finally:
            # On Ctrl-C do not wait for files still being decoded: their items are redone next run.
            pool.shutdown(wait=False, cancel_futures=True)

    # -- stages -----------------------------------------------------------------------------

    def _admit(self, n: int, item: Item, options: Options, future, scheduler: Scheduler, answers, on_text):
        """An item whose media is ready: check, encode once, queue one request per prompt."""
        visual = None
        try:
            visual, media_s = future.result()
            prompts = [p if p is not None else default_prompt(visual.kind) for p in item.prompts]
            ids = [self.input_ids(visual, p, options.system) for p in prompts]
            for input_ids in ids:
                check_context(len(input_ids), visual.visual_tokens_kept, options.max_new_tokens,
                              self.engine.config.text.max_position_embeddings)  # fmt: skip
            start = time.perf_counter()
            with torch.inference_mode():
                features = self.engine.encode_visual(visual)
            encode_s = time.perf_counter() - start
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 -- one bad file must not end the run
            yield from self._failed(n, item, options, e, visual)
            return
        for i, (prompt, input_ids) in enumerate(zip(prompts, ids)):
            timings = {"media_s": media_s, "encode_s": encode_s} if i == 0 else {}
            stream = StreamDecoder(self.engine.tokenizer) if on_text else None
            answers[(n, i)] = _Answer(item, options, visual, item.prompts[i], prompt, input_ids, timings, stream)
            scheduler.add((n, i), Request(input_ids, features, options.decoding, options.seed))

    def input_ids(self, visual: VisualInput, prompt: str, system: str | None) -> list[int]:
        engine = self.engine
        return build_input_ids(
            engine.tokenizer, engine.config, prompt, visual.kind, visual.tokens_per_frame, visual.timestamps, system
        )

    def _failed(self, n: int, item: Item, options: Options, error: BaseException, visual: VisualInput | None = None):
        for i, prompt in enumerate(item.prompts):
            used = prompt if prompt is not None or visual is None else default_prompt(visual.kind)
            record = self._base(item, options, prompt, used, visual)
            record.error = error_message(error)
            record.exception = error
            record.timings["load_s"] = self._take_load_s()
            record.timings["total_s"] = record.timings["load_s"]
            yield (n, i), record

    def _take_load_s(self) -> float:
        load_s, self._unpaid_load_s = self._unpaid_load_s, 0.0
        return load_s

    def _base(self, item: Item, options: Options, given: str | None, used: str | None, visual: VisualInput | None) -> Result:
        label = self.label
        record = Result(
            path=item.media[0] if item.media else "", prompt=used, system=options.system, model=label.model,
            dtype=label.dtype, device=label.device, quantize=label.quantize, options=options.record(given),
        )  # fmt: skip
        if visual is not None:
            video = visual.kind == "video"
            record.kind = visual.kind
            record.width, record.height, record.duration = visual.source_width, visual.source_height, visual.duration
            record.frames = len(visual.timestamps) if video else 1
            record.timestamps = [round(t, 3) for t in visual.timestamps] if video else None
            record.resized = [visual.resized_width, visual.resized_height]
            record.visual_tokens, record.visual_tokens_kept = visual.visual_tokens, visual.visual_tokens_kept
            record.warnings = list(getattr(visual, "warnings", []))
        return record

    def _record(self, answer: _Answer, reason: str) -> Result:
        record = self._base(answer.item, answer.options, answer.given, answer.prompt, answer.visual)
        record.text = self.engine.tokenizer.decode(answer.ids)
        record.prompt_tokens = len(answer.input_ids)
        record.generated_tokens = len(answer.ids)
        record.finish_reason = reason
        timings = dict.fromkeys(("media_s", "encode_s"), 0.0) | answer.timings
        timings["load_s"] = self._take_load_s()
        timings["total_s"] = sum(timings.values())
        record.timings = timings
        return record


def _prepare(item: Item, processor, media) -> tuple[VisualInput, float]:
    """Worker-thread stage: decode and pre-process an item's media (one file for now)."""
    if len(item.media) != 1:
        raise UsageError(f"an item needs exactly one image or video (got {len(item.media)})")
    start = time.perf_counter()
    visual = prepare_visual(item.media[0], processor, media)
    return visual, time.perf_counter() - start


def check_context(prompt_tokens: int, visual_tokens: int, max_new_tokens: int, context: int) -> None:
    """Raise when a prompt plus its answer needs more positions than the model has, saying what helps."""
    need = prompt_tokens + max_new_tokens
    if need <= context:
        return
    text = prompt_tokens - visual_tokens
    room = context - text - max_new_tokens
    advice = "lower --max-new-tokens"
    if visual_tokens and room > 0:
        advice = (f"pass --max-visual-tokens {room} (frames are made smaller; fewer frames would make each "
                  "one larger), or a shorter --start/--end clip, or lower --max-new-tokens")  # fmt: skip
    raise Vl3Error(
        f"the prompt ({prompt_tokens} tokens, {visual_tokens} of them visual) and --max-new-tokens {max_new_tokens} "
        f"need {need} positions, more than the model's {context}: {advice}"
    )

