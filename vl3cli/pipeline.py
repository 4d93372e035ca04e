"""Where the stages meet: items -> media -> visual features -> prompts -> tokens -> Results.

`Runner.run(items, options)` is the one road every surface takes (describe, ask, batch, the
Python API; see api.py); a long-lived caller (the server) drives a `Loop` itself: `submit`,
`cancel`, and `step()` until it is idle. An `Item` is some media and the prompts asked about them; each prompt
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

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from .errors import ContextError, UsageError, Vl3Error
from .generate import Request, Scheduler
from .options import Options
from .output import Result, StreamDecoder, error_message
from .preprocess import VisualInput, prepare_segments, prepare_visual
from .prompt import Turn, conversation_ids, default_prompt
from .segments import MAX_SEGMENT, MIN_SEGMENT, scene_spans, windows
from .video import cancellable, detect_cuts

Key = tuple  # (the item's key: its number in a run, prompt number)
WAIT_S = 0.2  # how long the loop waits for media before it checks for Ctrl-C again
Check = Callable[[], None]
OnText = Callable[[Key, str], None]


def _no_check() -> None:
    return None


@dataclass(frozen=True)
class Item:
    """Some media (paths or URLs, in prompt order; none: text only) and the prompts asked about
    them (None: describe the media), each answered on its own.

    `history` holds earlier turns of a conversation (`prompt.Turn`); their `visuals` may be
    paths or URLs, read like `media`. The prompts are asked as the next user turn, which
    carries `media`.
    """

    media: tuple[str, ...] = ()
    prompts: tuple[str | None, ...] = (None,)
    id: str | None = None
    options: Options | None = None  # None: the run's options
    history: tuple[Turn, ...] = ()
    skip: frozenset = frozenset()  # segments already answered: (start, end) windows not to read again
    prefix: object = None  # engine.Prefix: the KV of the conversation so far (its ids start every prompt)
    keep_kv: bool = False  # hand back each answer's KV (Result.state.prefix), for the next turn
    # Media read elsewhere (e.g. in a Ray task): a (visuals, media seconds) pair with one
    # VisualInput per path of `to_read`, or the exception reading raised (the item then
    # becomes error records). None: read here.
    prepared: tuple[tuple[VisualInput, ...], float] | BaseException | None = None

    @property
    def all_media(self) -> tuple[str, ...]:
        """Every path or URL of the conversation, in prompt order."""
        earlier = tuple(v if isinstance(v, str) else v.path for turn in self.history for v in turn.visuals)
        return earlier + self.media

    @property
    def to_read(self) -> tuple[str, ...]:
        """The paths or URLs whose media still has to be read (earlier turns may carry visuals already read)."""
        return tuple(v for turn in self.history for v in turn.visuals if isinstance(v, str)) + self.media


@dataclass(frozen=True)
class Label:
    """What every record says about the model that answered."""

    model: str
    dtype: str
    device: str
    quantize: str | None = None


@dataclass
class Answer:
    """An answer in progress; a finished one rides on its Result (`Result.state`)."""

    item: Item
    options: Options
    visuals: tuple[VisualInput, ...]  # every visual of the conversation, in prompt order
    given: str | None  # the prompt as asked (None: the default one)
    prompt: str  # the prompt used
    input_ids: list[int]
    timings: dict
    stream: StreamDecoder | None
    ids: list[int] = field(default_factory=list)
    first: float | None = None  # when its first token came
    cached: int = 0  # prompt tokens served from a prefix
    paid_prefix: bool = False  # the shared start was prefilled for this answer: its prefill_s counts it
    prefix: object = None  # with Item.keep_kv: the KV of the prompt and answer (engine.Prefix)


class Runner:
    """The model's side of every run: records carry its label; the load time goes on the first record."""

    def __init__(self, engine, label: Label, load_s: float = 0.0):
        self.engine = engine
        self.label = label
        self._unpaid_load_s = load_s  # charged to the next record
        self._media: dict[tuple, object] = {}
        # A server's limits on what it reads: the longest video (s), the largest download (bytes),
        # and whether downloads may reach loopback / private addresses (fetch's public_only).
        self.max_duration: float | None = None
        self.max_download_bytes: int | None = None
        self.public_urls_only = False
        self.share_prefix = True  # several prompts about the same media prefill their common start once

    def media_options(self, options: Options):
        """`options.media()` for this checkpoint, with the runner's limits and the context left for visual tokens."""
        limits = {"max_duration": self.max_duration, "max_download_bytes": self.max_download_bytes,
                  "public_urls_only": self.public_urls_only}  # fmt: skip
        key = (options, *limits.values())  # limits set after a first use count at once
        if key not in self._media:
            budget = visual_token_budget(self.engine.config, options)
            self._media[key] = replace(options.media(self.engine.processor), token_budget=budget, **limits)
        return self._media[key]

    def prepare(self, item: Item, options: Options) -> tuple[tuple[VisualInput, ...], float]:
        """Read an item's media now (as a run would in its worker threads): its visuals and the seconds it took."""
        return read_media(item, self.engine.processor, self.media_options(options))

    def take_load_s(self) -> float:
        load_s, self._unpaid_load_s = self._unpaid_load_s, 0.0
        return load_s

    def loop(self, options: Options, slots: int = 8, workers: int = 2) -> Loop:
        return Loop(self, options, slots, workers)

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
        """(key, Result) for every prompt of every item, in the order they finish.

        Items are taken from the iterable only as the batch has room (a few files ahead of it).
        """
        pending = iter(enumerate(items))
        with self.loop(options, slots, workers) as loop:
            while True:
                while loop.waiting < slots + workers and (item := next(pending, None)) is not None:
                    loop.submit(item[0], item[1], stream=on_text is not None)
                if loop.idle:
                    return
                check()
                for key, out in loop.step():
                    if isinstance(out, str):
                        on_text(key, out)
                    else:
                        yield key, out
                        check()


class Loop:
    """One continuous batch: items are submitted (their media is read by worker threads), join
    the batch once their media is ready, and come out as text pieces and Results.

    `step()` admits what is ready (never waiting for media while answers are decoding), decodes
    one token for every answer, and returns `(key, piece)` for streamed items and `(key, Result)`
    for finished answers; key is (the item's key, answer number), the answer number counting the
    item's prompts, then (for a long video cut into segments) its segments: segment k's answer to
    prompt j is k * prompts + j. A segmented item's windows are read one after the other and each
    joins as soon as it is decoded (at most READ_AHEAD waiting per item, so memory stays bounded).
    `cancel(key)` drops an item wherever it is. Single-threaded: one caller drives it (the server
    runs it in one thread); only the readers run beside it.
    """

    def __init__(self, runner: Runner, options: Options, slots: int, workers: int):
        self.runner, self.engine, self.options, self.slots = runner, runner.engine, options, slots
        self.scheduler = Scheduler(self.engine, options.decoding, slots)
        # The prefix is how the `vl3` program (cli.process.READER_THREADS) knows readers it need not wait for at exit.
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vl3-media")
        self.reading: dict = {}  # key -> _Reading, in submission order
        self.arrived = threading.Event()  # a reader put something
        self.answers: dict[Key, Answer] = {}
        self.ready: list[tuple[Key, Result]] = []  # error records waiting for the next step

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # Do not wait for files still being decoded: on Ctrl-C their items are redone next run (and
        # the `vl3` program exits without waiting for these threads either: cli.app.run).
        for reading in self.reading.values():
            reading.cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.scheduler.close()

    @property
    def waiting(self) -> int:
        """Items submitted whose answers have not started (media being read, or queued for a row)."""
        return len(self.reading) + self.scheduler.queued

    @property
    def idle(self) -> bool:
        return not self.reading and self.scheduler.idle and not self.ready

    def submit(self, key, item: Item, stream: bool = False) -> None:
        options = item.options or self.options
        try:
            media = self.runner.media_options(options)
        except Vl3Error as e:
            self.ready += self._failed(key, item, options, e)
            return
        reading = _Reading(item, options, stream)
        if item.to_read or item.prepared is not None:
            reading.future = self.pool.submit(_read, reading, self.engine.processor, media, self.arrived)
        else:  # nothing to read (text only): ready now, never queued behind other items' downloads
            reading.parts = queue.Queue()  # unbounded: this thread puts all its parts without waiting
            _read(reading, self.engine.processor, media, self.arrived)
        self.reading[key] = reading

    def cancel(self, key) -> None:
        reading = self.reading.pop(key, None)
        if reading is not None:
            reading.cancel.set()
            if reading.future is not None:
                reading.future.cancel()
        for k in [k for k in self.answers if k[0] == key]:
            del self.answers[k]
            self.scheduler.cancel(k)
        self.ready = [(k, r) for k, r in self.ready if k[0] != key]

    def step(self) -> list[tuple[Key, str | Result]]:
        out: list[tuple[Key, str | Result]] = self.ready
        self.ready = []
        if self.scheduler.idle and self.reading and not out:  # nothing to decode: wait for some media
            self.arrived.wait(WAIT_S)
        self.arrived.clear()
        admissions = []
        for key, reading in list(self.reading.items()):
            while self.scheduler.queued + len(admissions) < self.slots:  # enough waiting for a row; keep the rest
                try:
                    part = reading.parts.get_nowait()
                except queue.Empty:
                    break
                if part is _END:
                    del self.reading[key]
                    break
                admitted = self._prepare(key, reading, part)
                if isinstance(admitted, list):
                    out += admitted  # error records
                else:
                    admissions.append(admitted)
        if admissions:
            out += self._admit(admissions)
        with torch.inference_mode():
            events = self.scheduler.step()
        for event in events:
            answer = self.answers.get(event.key)
            if answer is None:  # cancelled
                continue
            now = time.perf_counter()
            if answer.first is None:
                answer.first = now
            if event.token is not None:
                answer.ids.append(event.token)
                if answer.stream and (piece := answer.stream.push(event.token)):
                    out.append((event.key, piece))
                continue
            del self.answers[event.key]
            if event.error is not None:  # its prefill failed: an error record, the batch goes on
                out.append((event.key, self._error(answer.item, answer.options, answer.given, answer.prompt,
                                                   answer.visuals, event.error)))  # fmt: skip
                continue
            if answer.stream and (piece := answer.stream.finish()):
                out.append((event.key, piece))
            answer.timings.update(prefill_s=answer.timings.get("prefill_s", 0.0) + (event.prefill_s or 0.0),
                                  decode_s=now - answer.first)  # fmt: skip
            answer.cached = 0 if answer.paid_prefix else event.cached_tokens
            answer.prefix = event.prefix
            out.append((event.key, self._record(answer, event.reason)))
        return out

    # -- stages -----------------------------------------------------------------------------

    def _prepare(self, key, reading: _Reading, part) -> _Admission | list[tuple[Key, Result]]:
        """A part whose media is ready (an item, or one segment of it): its prompts laid out and
        checked against the context, or its error records."""
        item, options = reading.item, reading.options
        first = reading.parts_admitted * len(item.prompts)  # this part's first answer number
        reading.parts_admitted += 1
        visuals = None
        try:
            if isinstance(part, BaseException):
                raise part
            read, media_s = part
            history, final = _placed(item, read)
            visuals = (*(v for turn in history for v in turn.visuals), *final)  # every visual, in prompt order
            prompts = [p if p is not None else default_prompt([v.kind for v in final]) for p in item.prompts]
            turns = [[*history, Turn("user", p, visuals=final)] for p in prompts]
            context = self.engine.config.text.max_position_embeddings
            for t in turns:
                check_text_length(self.engine.tokenizer, [options.system or "", *(u.text for u in t)], context)
            ids = [conversation_ids(self.engine.tokenizer, self.engine.config, t, options.system) for t in turns]
            kept = sum(v.visual_tokens_kept for v in visuals)
            for t, input_ids in zip(turns, ids):
                check_placeholders(_count_placeholders(input_ids, self.engine.config), kept)
                check_context(len(input_ids), kept, options.max_new_tokens, context,
                              partial(self._length_without_media, t, options.system),
                              [max(1, len(v.timestamps)) for v in visuals])  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 -- one bad file must not end the run
            return self._failed(key, item, options, e, visuals, first)
        return _Admission(key, reading, visuals, prompts, ids, first, media_s)

    def _admit(self, admissions: list[_Admission]) -> list[tuple[Key, Result]]:
        """Encode the visuals the admitted parts still need, all in one vision call, then queue one
        request per prompt. Several prompts about the same media share their common start: it is
        prefilled once (`Engine.prefill_prefix`) and each prompt prefills only the rest; a
        conversation's later turn starts from its kept KV (`Item.prefix`)."""
        needed = [a.visuals[_covered(a.visuals, a.cached_placeholders(self.engine.config)):] for a in admissions]
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                flat = self.engine.encode_visuals([v for vs in needed for v in vs]) if any(needed) else []
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 -- find the part at fault: encode each on its own
            return [record for a in admissions for record in self._admit_one(a)]
        encode_s = time.perf_counter() - start
        failed = []
        for a, vs in zip(admissions, needed):
            features, flat = flat[: len(vs)], flat[len(vs) :]
            failed += self._queue(a, features, encode_s * len(vs) / max(1, sum(map(len, needed))))
        return failed

    def _admit_one(self, a: _Admission) -> list[tuple[Key, Result]]:
        visuals = a.visuals[_covered(a.visuals, a.cached_placeholders(self.engine.config)):]
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                features = self.engine.encode_visuals(list(visuals)) if visuals else []
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 -- one bad file must not end the run
            return self._failed(a.key, a.reading.item, a.reading.options, e, a.visuals, a.first)
        return self._queue(a, features, time.perf_counter() - start)

    def _queue(self, a: _Admission, features: list, encode_s: float) -> list[tuple[Key, Result]]:
        item, options = a.reading.item, a.reading.options
        features = torch.cat(features) if len(features) else None
        prefix, prefix_s, shared = item.prefix, 0.0, 0
        try:
            if prefix is None and len(a.ids) > 1 and self.runner.share_prefix:  # several questions: their common start, once
                shared = _common_start(a.ids)
                if shared:
                    placeholders = _count_placeholders(a.ids[0][:shared], self.engine.config)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        prefix = self.engine.prefill_prefix(a.ids[0][:shared], None if features is None else features[:placeholders])
                    prefix_s = time.perf_counter() - start
                    features = None if features is None or placeholders == len(features) else features[placeholders:]
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001
            return self._failed(a.key, item, options, e, a.visuals, a.first)
        failed = []
        for i, (prompt, input_ids) in enumerate(zip(a.prompts, a.ids)):
            timings = {"media_s": a.media_s, "encode_s": encode_s, "prefill_s": prefix_s} if i == 0 else {}
            decoder = StreamDecoder(self.engine.tokenizer) if a.reading.stream else None
            answer = Answer(item, options, a.visuals, item.prompts[i], prompt, input_ids, timings, decoder,
                            paid_prefix=i == 0 and prefix_s > 0)  # fmt: skip
            request = Request(input_ids, features, options.decoding, options.seed, prefix, keep_kv=item.keep_kv)
            try:
                self.scheduler.add((a.key, a.first + i), request)
            except Vl3Error as e:  # e.g. a prompt that does not start with its conversation's kept KV
                failed += self._failed(a.key, item, options, e, a.visuals, a.first)[i : i + 1]
                continue
            self.answers[(a.key, a.first + i)] = answer
        return failed

    def _length_without_media(self, turns: list[Turn], system: str | None) -> int:
        """A prompt's length without its media: its texts and the chat layout (for check_context's advice)."""
        return len(conversation_ids(self.engine.tokenizer, self.engine.config, [replace(u, visuals=()) for u in turns], system))

    def _failed(self, key, item: Item, options: Options, error: BaseException, visuals=None, first: int = 0):
        records = []
        for i, prompt in enumerate(item.prompts):
            used = prompt
            if prompt is None and visuals is not None:
                used = default_prompt([v.kind for v in visuals])
            records.append(((key, first + i), self._error(item, options, prompt, used, visuals, error)))
        return records

    def _error(self, item: Item, options: Options, given: str | None, used: str | None, visuals, error: BaseException):
        record = self._base(item, options, given, used, visuals)
        record.error = error_message(error)
        record.exception = error
        record.timings["load_s"] = record.timings["total_s"] = self.runner.take_load_s()
        return record

    def _base(self, item: Item, options: Options, given: str | None, used: str | None, visuals) -> Result:
        label = self.runner.label
        media = list(item.all_media)
        record = Result(
            id=item.id, path=media[0] if len(media) == 1 else None, media=media, prompt=used, system=options.system,
            model=label.model, dtype=label.dtype, device=label.device, quantize=label.quantize,
            options=options.record(given),
        )  # fmt: skip
        if not media and not isinstance(item.prepared, BaseException):  # not an item that could not be used
            record.kind = "text"
        if visuals is not None:
            info = [visual_info(v) for v in visuals]
            if len(info) == 1:
                for name, value in info[0].items():
                    setattr(record, name, value)
            elif info:
                record.kind = "multiple"
                record.media_info = info
            if visuals and visuals[-1].segment is not None:
                record.segment_start, record.segment_end = visuals[-1].segment
            record.visual_tokens = sum(v.visual_tokens for v in visuals)
            record.visual_tokens_kept = sum(v.visual_tokens_kept for v in visuals)
            record.warnings = [f"{v.path}: {w}" for v in visuals for w in v.warnings]
        return record

    def _record(self, answer: Answer, reason: str) -> Result:
        record = self._base(answer.item, answer.options, answer.given, answer.prompt, answer.visuals)
        record.text = self.engine.tokenizer.decode(answer.ids)
        record.prompt_tokens = len(answer.input_ids)
        record.prompt_tokens_cached = answer.cached
        record.generated_tokens = len(answer.ids)
        record.finish_reason = reason
        record.state = answer
        timings = dict.fromkeys(("media_s", "encode_s"), 0.0) | answer.timings
        timings["load_s"] = self.runner.take_load_s()
        timings["total_s"] = sum(timings.values())
        record.timings = timings
        return record


def visual_info(v: VisualInput) -> dict:
    """What a record says about one visual input."""
    video = v.kind == "video"
    return {
        "path": v.path, "kind": v.kind, "width": v.source_width, "height": v.source_height, "duration": v.duration,
        "frames": len(v.timestamps) if video else 1, "timestamps": [round(t, 3) for t in v.timestamps] if video else None,
        "resized": [v.resized_width, v.resized_height], "visual_tokens": v.visual_tokens,
        "visual_tokens_kept": v.visual_tokens_kept,
    }  # fmt: skip


def _placed(item: Item, read) -> tuple[list[Turn], tuple]:
    """The item's history with its paths replaced by the visuals read from them (`read`, in the
    order of `item.to_read`), and the visuals of the new turn."""
    it = iter(read)
    history = [Turn(t.role, t.text, t.ids, tuple(next(it) if isinstance(v, str) else v for v in t.visuals))
               for t in item.history]  # fmt: skip
    return history, tuple(it)


def visual_token_budget(config, options: Options) -> int:
    """The positions a prompt's visual tokens may take at most: the context less the answer (so a
    video that cannot fit is refused from its plan, before it is decoded)."""
    return config.text.max_position_embeddings - options.max_new_tokens


def read_media(item: Item, processor, media) -> tuple[tuple[VisualInput, ...], float]:
    """Decode and pre-process every medium of an item, in prompt order (a worker thread's stage,
    or a Ray task's): its visuals and the seconds it took."""
    if isinstance(item.prepared, BaseException):
        raise item.prepared
    if item.prepared is not None:
        return item.prepared
    if not item.media and not item.history and None in item.prompts:
        raise UsageError("a prompt without media needs its question (there is nothing to describe)")
    start = time.perf_counter()
    visuals = tuple(prepare_visual(path, processor, media) for path in item.to_read)
    return visuals, time.perf_counter() - start


@dataclass
class _Admission:
    """A part of an item on its way into the batch: its visuals, prompts and prompt ids."""

    key: object
    reading: _Reading
    visuals: tuple
    prompts: list[str]
    ids: list[list[int]]
    first: int  # its first answer number
    media_s: float

    def cached_placeholders(self, config) -> int:
        """Visual placeholders inside the item's own prefix (a conversation's kept KV): no features needed."""
        prefix = self.reading.item.prefix
        return 0 if prefix is None else _count_placeholders(prefix.ids, config)


def _count_placeholders(ids: list[int], config) -> int:
    marks = {config.image_token_id, config.video_token_id}
    return sum(i in marks for i in ids)


def _covered(visuals, placeholders: int) -> int:
    """How many leading visuals a prefix holding `placeholders` placeholders covers."""
    n = 0
    for v in visuals:
        if placeholders < v.visual_tokens_kept:
            break
        placeholders -= v.visual_tokens_kept
        n += 1
    return n


def _common_start(ids: list[list[int]]) -> int:
    """The length of the start all of `ids` share, leaving each at least one token of its own."""
    n = min(len(x) for x in ids) - 1
    for i in range(max(0, n)):
        if any(x[i] != ids[0][i] for x in ids[1:]):
            return i
    return max(0, n)


_END = object()  # a reader has put its last part
READ_AHEAD = 2  # parts of one item decoded ahead of the batch


@dataclass
class _Reading:
    """An item whose media a worker thread is reading: its parts come through a bounded queue."""

    item: Item
    options: Options
    stream: bool
    parts: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=READ_AHEAD))
    cancel: threading.Event = field(default_factory=threading.Event)
    future: object = None
    parts_admitted: int = 0


def _read(reading: _Reading, processor, media, arrived: threading.Event) -> None:
    """Worker thread: put each part of the item (its visuals and seconds, or the error reading
    raised), then _END; stops when the item is cancelled (a download between its reads, a video's
    decoding between its packets and frames)."""
    media = replace(media, cancelled=reading.cancel.is_set)

    def put(value) -> bool:
        while not reading.cancel.is_set():
            try:
                reading.parts.put(value, timeout=WAIT_S)
            except queue.Full:
                continue
            arrived.set()
            return True
        return False

    try:
        with cancellable(reading.cancel.is_set):
            for part in read_parts(reading.item, processor, media, reading.options):
                if not put(part):
                    return
    except Exception as e:  # noqa: BLE001 -- becomes the item's error record
        if not put(e):
            return
    put(_END)


def read_parts(item: Item, processor, media, options: Options) -> Iterator[tuple[tuple[VisualInput, ...], float]]:
    """An item's media as parts: the whole item once (`read_media`), or, for one video with
    `options.segments`, each window as soon as it is decoded (preprocess.prepare_segments)."""
    if options.segments is None or item.history or item.prepared is not None:
        yield read_media(item, processor, media)
        return
    if len(item.to_read) != 1:
        raise UsageError(f"--segments cuts one video into segments; this item has {len(item.to_read)} media")
    start = time.perf_counter()
    for visual in prepare_segments(item.media[0], processor, media, spans_of(options), skip=item.skip):
        now = time.perf_counter()
        yield (visual,), now - start
        start = now


def spans_of(options: Options):
    """`spans(path, meta)` for `prepare_segments`: fixed windows, or shots between detected cuts,
    within --start / --end."""

    def spans(path, meta) -> list[tuple[float, float]]:
        start, end = options.start or 0.0, options.end
        if options.segments == "scenes":
            cuts = detect_cuts(path, meta, options.scene_threshold)
            low = options.min_segment if options.min_segment is not None else MIN_SEGMENT
            high = options.max_segment if options.max_segment is not None else MAX_SEGMENT
            return scene_spans(cuts, meta.duration, low, high, start, end)
        return windows(meta.duration, options.segment_seconds, start, end)

    return spans


def check_text_length(tokenizer, texts: list[str], context: int) -> None:
    """Refuse, before tokenising them, texts that cannot fit the context whatever their tokens
    (a 30 MB question would otherwise hold the batch while it is tokenised)."""
    if sum(map(len, texts)) <= context:  # short enough to tokenise; check_context has the last word
        return
    fewest = sum(tokenizer.fewest_tokens(t) for t in texts)
    if fewest > context:
        raise ContextError(f"the prompt's text ({sum(map(len, texts))} characters, at least {fewest} tokens) "
                           f"is longer than the model's context of {context} positions: shorten it")  # fmt: skip


def check_placeholders(found: int, expected: int) -> None:
    """The prompt's visual placeholders are exactly those its media bring (a checkpoint whose
    placeholder is not a special token could otherwise take one from the text)."""
    if found != expected:
        raise Vl3Error(f"the prompt holds {found} visual placeholder tokens where its media bring {expected}: "
                       "a text (or an earlier answer) contains the model's image or video placeholder token")  # fmt: skip


def check_context(prompt_tokens: int, visual_tokens: int, max_new_tokens: int, context: int,
                  text_tokens: Callable[[], int], frames: list[int]) -> None:  # fmt: skip
    """Raise when a prompt plus its answer needs more positions than the model has, saying what helps.
    `text_tokens()` (asked only then) is the length of the prompt without its media: the texts and
    the chat layout. The other tokens besides the visual ones are the media's own: a video's frame
    times, which fewer frames shorten, and no shorter text could. `frames`: each media input's
    frames (1 for a picture); a --max-visual-tokens cap (per input) is suggested only where it
    leaves every input one token per frame, as the cap requires."""
    need = prompt_tokens + max_new_tokens
    if need <= context:
        return
    not_visual = prompt_tokens - visual_tokens
    room = context - not_visual - max_new_tokens  # for visual tokens
    cap = room // len(frames) if frames else 0  # each input's share of the room
    if visual_tokens and cap >= max(frames, default=1):
        advice = (f"pass --max-visual-tokens {cap} (frames are made smaller; fewer frames would make each "
                  "one larger), or a shorter --start/--end clip, or lower --max-new-tokens")  # fmt: skip
    elif text_tokens() >= context:
        advice = "shorten the text"
    elif visual_tokens and room > 0:  # but no cap leaves a token per frame
        advice = "lower --max-new-tokens or --max-frames"
    elif not_visual >= context:  # the frames' times fill the context: fewer frames have fewer
        advice = "use fewer frames (lower --max-frames or --fps) or a shorter --start/--end clip"
    else:
        advice = "lower --max-new-tokens"
    raise ContextError(
        f"the prompt ({prompt_tokens} tokens, {visual_tokens} of them visual) and --max-new-tokens {max_new_tokens} "
        f"need {need} positions, more than the model's {context}: {advice}"
    )

