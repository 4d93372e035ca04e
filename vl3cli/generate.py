"""Generation: requests in, token events out. Knows nothing of text.

`Scheduler` runs continuous batching over one KV cache of static buffers (re-allocated, rarely,
when more rows or positions are needed):

    scheduler = Scheduler(engine, params, slots=8)
    scheduler.add(key, Request(input_ids, features, seed=1))
    while not scheduler.idle:
        for event in scheduler.step():     # Event(key, token) ... Event(key, None, finished=True, ...)
            ...

Each `step()` does three things, kept apart:
- admission: queued requests take free rows; each is prefilled on its own (only the part after
  its `prefix`, whose KV is copied in), so its prompt sees exactly what it would see alone;
- sampling: one token for every active row, on the device, each row with its own parameters and
  seed (`decoding.sample`), so a request's answer does not depend on its neighbours;
- decoding and compaction: one decode step for all rows in the smallest bucket (1, 2, 4, ...)
  that holds them; rows that finished leave, the last rows move into the holes.
Tokens reach the host one step late: on CUDA the step that consumes this step's tokens is
launched before the host reads them (a copy into pinned memory and an event, no sync in the loop),
so a row that just finished may run one wasted step; on other devices the host reads first.

A request finishes on one of the checkpoint's EOS ids (never emitted) or after
`params.max_new_tokens` tokens ("stop" / "length"); one whose prefill raises finishes at once
with reason "error" and the exception, and the others go on. `add` refuses (Vl3Error) a request
that cannot be served: no prompt, a token id outside the vocabulary, more positions than the model
has. `generate()` (which raises errors) and `stream()` (where a refused request finishes with reason
"error" too) are thin wrappers that close their scheduler however their caller stops. The image
and video placeholder tokens are never drawn (their logits are set to -inf before sampling).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field, fields

import torch

from .decoding import DecodingParams, RowParams, sample
from .engine import Prefix
from .errors import Vl3Error

CACHE_ROUND = 256  # the cache's length is rounded up to a multiple of this (fewer re-allocations)


@dataclass
class Request:
    input_ids: list[int]  # the whole prompt, placeholders included
    visual_features: torch.Tensor | None = None  # for the placeholders in input_ids[len(prefix.ids):]
    params: DecodingParams | None = None  # None = the scheduler's default params
    seed: int | None = None  # sampling seed (None = a random one)
    prefix: Prefix | None = None  # KV already computed for input_ids[:len(prefix.ids)]
    keep_kv: bool = False  # on finish, hand back the row's KV as a Prefix (multi-turn chat)


@dataclass
class Event:
    key: Hashable
    token: int | None  # a new token, or None on the finishing event
    finished: bool = False
    reason: str | None = None  # on the finishing event: "stop" | "length" | "error"
    prefill_s: float | None = None  # on the finishing event: this request's prefill time
    cached_tokens: int = 0  # on the finishing event: prompt tokens served from its prefix
    prefix: Prefix | None = None  # on the finishing event, with keep_kv: the KV of prompt + answer
    error: Exception | None = None  # reason "error": what its admission raised (the others go on)


@dataclass
class _Row:
    key: Hashable
    request: Request
    params: DecodingParams
    prefill_s: float
    cached_tokens: int
    produced: list[int] = field(default_factory=list)


def bucket(n: int) -> int:
    """The smallest power of two >= n: decode steps run over 1, 2, 4, 8... rows."""
    return 1 << max(0, n - 1).bit_length()


class Scheduler:
    def __init__(self, engine, params: DecodingParams, slots: int = 8):
        if slots < 1:  # no row to admit into: every step would return nothing, forever
            raise Vl3Error(f"a scheduler needs at least one row (got slots={slots})")
        self.engine, self.params, self.slots = engine, params, slots
        self._queue: deque[tuple[Hashable, Request]] = deque()
        self._rows: list[_Row] = []  # row i of the cache belongs to _rows[i]
        self._cache = None
        device, vocab, cuda = engine.device, engine.config.text.vocab_size, engine.device.type == "cuda"
        # Per-row buffers, grown with the cache's rows (`_grow_rows`): a large `slots` costs nothing
        # until that many answers run at once.
        self._logits = torch.zeros(1, vocab, device=device)  # next-token logits of each row
        self._tokens = torch.zeros(1, dtype=torch.long, device=device)  # the tokens the next step feeds
        self._seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)  # for the repetition penalty
        self._seeds = torch.zeros(1, dtype=torch.long, device=device)
        self._steps = torch.zeros(1, dtype=torch.long, device=device)  # draws so far, per row
        self._row_params = RowParams.allocate(1, device)
        self._host_tokens = torch.zeros(1, dtype=torch.long, pin_memory=cuda)
        self._overlap = cuda
        # The image / video placeholders mark where visual features go: never part of an answer (one
        # in a conversation's kept answer would claim features no media brings).
        marks = {engine.config.image_token_id, engine.config.video_token_id}
        self._placeholders = torch.tensor(sorted(m for m in marks if 0 <= m < vocab), dtype=torch.long, device=device)

    def close(self) -> None:
        """Done with this scheduler: its cache's decode graphs (CUDA) are freed with it."""
        if self._cache is not None:
            self.engine.forget_graphs(self._cache)
            self._cache = None

    # -- the queue ---------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._rows and not self._queue

    def add(self, key: Hashable, request: Request) -> None:
        """Queue a request (Vl3Error for one that cannot be served); it is prefilled into a free row at
        the next step."""
        params = request.params or self.params
        ids = request.input_ids
        if not ids:
            raise Vl3Error("a request needs at least one prompt token")
        vocab = self.engine.config.text.vocab_size
        if not 0 <= min(ids) <= max(ids) < vocab:  # on CUDA an id outside the table is a device assert for every row
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise Vl3Error(f"token id {bad} is outside the model's vocabulary of {vocab} tokens")
        self.engine.check_length(len(ids) + params.max_new_tokens)
        prefix = request.prefix
        if prefix is not None:
            n = len(prefix.ids)
            if request.input_ids[:n] != prefix.ids:
                raise Vl3Error("the request's input_ids do not start with its prefix's ids")
            if len(request.input_ids) == n:
                raise Vl3Error("a request with a prefix must add at least one token after it")
        self._queue.append((key, request))

    def cancel(self, key: Hashable) -> None:
        """Drop a queued or active request at once; no more events come for it."""
        self._queue = deque(item for item in self._queue if item[0] != key)
        for row, state in enumerate(self._rows):
            if state.key == key:
                self._free([row])
                return

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit what fits, sample one token for every active row, run one decode step; the events."""
        failed = self._admit()
        n = len(self._rows)
        if not n:
            return failed
        rows = [r.params for r in self._rows]
        self._logits[:n, self._placeholders] = float("-inf")
        tokens = sample(self._logits[:n], self._row_params_view(n), self._seen[:n], self._seeds[:n], self._steps[:n],
                        any_sampling=any(not p.greedy for p in rows),
                        any_penalty=any(p.repetition_penalty != 1 for p in rows),
                        any_filter=any(p.top_k > 0 or p.top_p < 1 for p in rows))
        self._tokens[:n] = tokens
        self._seen[torch.arange(n, device=tokens.device), tokens] = True
        self._steps[:n] += 1
        self._host_tokens[:n].copy_(tokens, non_blocking=self._overlap)
        if self._overlap:
            ready = torch.cuda.Event()
            ready.record()
            self._decode(n)  # the device works on the next step while the host reads this one's tokens
            ready.synchronize()
        events, finished = self._events(self._host_tokens[:n].tolist())
        self._free(finished, events)
        if not self._overlap and self._rows:
            self._decode(len(self._rows))
        return failed + events

    def _row_params_view(self, n: int) -> RowParams:
        p = self._row_params
        return RowParams(p.temperature[:n], p.top_k[:n], p.top_p[:n], p.penalty[:n])

    def _decode(self, n: int) -> None:
        rows = min(bucket(n), self._cache.batch)
        self.engine.decode(self._cache.rows(rows), self._tokens[:rows], self._logits[:rows])

    def _events(self, tokens: list[int]) -> tuple[list[Event], list[int]]:
        events, finished = [], []
        for row, (state, token) in enumerate(zip(self._rows, tokens)):
            eos = () if state.params.ignore_eos else self.engine.eos_token_ids
            if token in eos:
                finished.append(row)
                continue
            state.produced.append(token)
            events.append(Event(state.key, token))
            if len(state.produced) >= state.params.max_new_tokens:
                finished.append(row)
        return events, finished

    # -- admission ---------------------------------------------------------------------------

    def _admit(self) -> list[Event]:
        """Prefill queued requests into free rows; a request whose admission raises (a prompt the
        model cannot take, memory running out) finishes with reason "error", and the rest go on."""
        failed = []
        while self._queue and len(self._rows) < self.slots:
            key, request = self._queue.popleft()
            try:
                self._admit_one(key, request)
            except Exception as e:  # noqa: BLE001 -- one request's failure is its own
                failed.append(Event(key, None, True, "error", error=e))
        return failed

    def _admit_one(self, key: Hashable, request: Request) -> None:
        """Prefill one request into the next free row (the row is taken only once it succeeded)."""
        params = request.params or self.params
        row = len(self._rows)
        self._ensure_cache(len(request.input_ids) + params.max_new_tokens, row + 1)
        start = time.perf_counter()
        cached = 0
        ids, features = request.input_ids, request.visual_features
        if request.prefix is not None:
            cached = len(request.prefix.ids)
            self._cache.k[:, row, :, :cached] = request.prefix.k
            self._cache.v[:, row, :, :cached] = request.prefix.v
            ids = ids[cached:]
        self._logits[row] = self.engine.prefill(self._cache, row, ids, features, start=cached)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        self._seeds[row], self._steps[row] = seed, 0
        self._row_params.set_row(row, params)
        self._seen[row] = False
        self._seen[row, torch.tensor(request.input_ids, device=self._seen.device)] = True
        self._rows.append(_Row(key, request, params, time.perf_counter() - start, cached))

    def _ensure_cache(self, need: int, rows: int) -> None:
        """A cache of at least `need` positions and `rows` rows (re-allocated between steps, rarely).

        Rows grow in powers of two up to `slots` as answers join, so a single answer (`vl3 describe`,
        one question) holds one row, not `slots` of them: for the 7B model and a 6,400-token video
        prompt a row is 0.37 GB. The rows in use are copied over."""
        old = self._cache
        if old is not None and need <= old.max_len and rows <= old.batch:
            return
        length = min(self.engine.config.text.max_position_embeddings, -(-need // CACHE_ROUND) * CACHE_ROUND)
        if old is not None:
            length, rows = max(length, old.max_len), max(rows, old.batch)
        cache = self.engine.new_cache(min(self.slots, bucket(rows)), length)
        if old is not None:
            for row in range(len(self._rows)):
                n = int(old.host_lengths[row])
                cache.k[:, row, :, :n] = old.k[:, row, :, :n]
                cache.v[:, row, :, :n] = old.v[:, row, :, :n]
                cache.set_row(row, n)
            self.engine.forget_graphs(old)
        self._cache = cache
        self._grow_rows(cache.batch)

    def _grow_rows(self, batch: int) -> None:
        """The per-row buffers hold `batch` rows, those in use copied over (a new cache came with
        them, so no decode graph keeps the old logits buffer)."""
        n = self._logits.shape[0]
        if batch <= n:
            return

        def grown(t: torch.Tensor) -> torch.Tensor:
            new = torch.zeros((batch, *t.shape[1:]), dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())
            new[:n] = t
            return new

        self._logits, self._tokens, self._seen, self._seeds, self._steps, self._host_tokens = (
            grown(t) for t in (self._logits, self._tokens, self._seen, self._seeds, self._steps, self._host_tokens))
        params = RowParams.allocate(batch, self._logits.device)
        for f in fields(params):
            getattr(params, f.name)[:n] = getattr(self._row_params, f.name)
        self._row_params = params

    # -- compaction --------------------------------------------------------------------------

    @torch.inference_mode()  # the cache's tensors are inference tensors, whoever frees a row
    def _free(self, rows: list[int], events: list[Event] | None = None) -> None:
        """Rows leave (finishing events appended to `events`); the last rows move into the holes."""
        for row in sorted(rows, reverse=True):
            state = self._rows[row]
            if events is not None:
                reason = "length" if len(state.produced) >= state.params.max_new_tokens else "stop"
                prefix = self._kept(row, state) if state.request.keep_kv else None
                events.append(Event(state.key, None, True, reason, state.prefill_s, state.cached_tokens, prefix))
            last = len(self._rows) - 1
            if row != last:
                self._cache.move_row(last, row)
                for t in (self._logits, self._tokens, self._seen, self._seeds, self._steps):
                    t[row] = t[last]
                self._row_params.move_row(last, row)
                self._rows[row] = self._rows[last]
            self._cache.set_row(last, 0, active=False)
            self._rows.pop()

    def _kept(self, row: int, state: _Row) -> Prefix:
        """The row's KV as a Prefix: the prompt and the answer tokens fed so far (never the stop token)."""
        ids = state.request.input_ids + state.produced
        n = min(int(self._cache.host_lengths[row]), len(ids))
        return Prefix(ids[:n], self._cache.k[:, row, :, :n].clone(), self._cache.v[:, row, :, :n].clone())


def generate(engine, requests: list[Request], params: DecodingParams) -> Iterator[list[int | None]]:
    """One yield per step, one entry per request: the new token id, or None (finished or none this step)."""
    scheduler = Scheduler(engine, params, slots=max(1, len(requests)))
    try:  # closed however the caller stops: its cache's decode graphs go with it
        for key, request in enumerate(requests):
            scheduler.add(key, request)
        while not scheduler.idle:
            step: list[int | None] = [None] * len(requests)
            for event in scheduler.step():
                if event.error is not None:
                    raise event.error
                if event.token is not None:
                    step[event.key] = event.token
            if any(t is not None for t in step):
                yield step
    finally:
        scheduler.close()


def stream(
    engine, requests: Iterable[tuple[Hashable, Request]], params: DecodingParams, slots: int = 8
) -> Iterator[Event]:
    """Continuous batching over a lazy iterable: events in generation order, a request's last one finished.

    A request the scheduler refuses (too long for the model, say) finishes at once with reason
    "error", as one whose prefill raises; the others go on."""
    scheduler = Scheduler(engine, params, slots)
    pending = iter(requests)
    exhausted = False
    try:  # closed however the caller stops: its cache's decode graphs go with it
        while True:
            refused = []
            while not exhausted and scheduler.active + scheduler.queued < slots:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    continue
                try:
                    scheduler.add(*item)
                except Vl3Error as e:
                    refused.append(Event(item[0], None, True, "error", error=e))
            yield from refused
            if scheduler.idle:  # the loop above ends with every item taken, or a row busy
                return
            yield from scheduler.step()
    finally:
        scheduler.close()
