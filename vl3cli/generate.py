"""Generation: prefill, then decode step by step over a shared KV cache. Yields token ids only.

`Scheduler` is continuous batching, one step at a time:

    scheduler = Scheduler(engine, params, slots=8)
    scheduler.add(key, Request(input_ids, features))    # queued; prefilled when a row is free
    events = scheduler.step()                           # admit, sample, decode: Event per row
    scheduler.cancel(key)                               # drop a request, free its row at once

Up to `slots` requests decode together; a request leaves the batch the step it finishes and a
queued one takes its row. A request finishes on one of the checkpoint's EOS ids (never yielded)
or after `max_new_tokens` tokens ("length"). Each request is prefilled on its own, so its prompt
sees exactly what it would see alone; the decode steps of all active rows share one forward pass.
Each request samples with its own parameters and its own seeded generator, so on CPU in float32
its answer is the one it gets alone.

`generate()` (a fixed list, one yield per step) and `stream()` (a lazy iterable of keyed requests)
are small loops over a Scheduler. Text, streaming and JSON are the caller's business.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .decoding import DecodingParams, next_token


@dataclass
class Request:
    input_ids: list[int]  # full prompt incl. placeholders
    visual_features: torch.Tensor | None = None  # (placeholders in input_ids, D_text)
    params: DecodingParams | None = None  # None: the scheduler's
    seed: int | None = None  # sampling seed; None: the scheduler's shared generator


@dataclass
class Event:
    key: Hashable
    token: int | None = None  # a new token of this request (None on the finishing event)
    finished: bool = False
    reason: str | None = None  # on finishing: "stop" | "length"
    prefill_s: float = 0.0  # on finishing: this request's prefill time
    cached_tokens: int = 0  # on finishing: prompt tokens served from a reused prefix


@dataclass
class _Row:
    key: Hashable
    request: Request
    params: DecodingParams
    generator: torch.Generator | None
    eos: frozenset[int]
    prefill_s: float
    produced: int = 0


class Scheduler:
    def __init__(self, engine, params: DecodingParams, slots: int = 8, generator: torch.Generator | None = None):
        self.engine, self.params, self.slots, self.generator = engine, params, slots, generator
        self.queue: deque[tuple[Hashable, Request]] = deque()
        self.rows: list[_Row] = []  # row i of the cache belongs to rows[i]
        self.cache = None
        vocab = engine.config.text.vocab_size
        self.logits = torch.empty(slots, vocab, device=engine.device)  # (slots, V): next-token logits per row
        self.seen = None  # (slots, V) bool: tokens each row has seen, for the repetition penalty

    @property
    def idle(self) -> bool:
        return not self.queue and not self.rows

    @property
    def active(self) -> int:
        return len(self.rows)

    def add(self, key: Hashable, request: Request) -> None:
        """Queue a request; it is prefilled at a later step when a row is free."""
        params = request.params or self.params
        self.engine.check_length(len(request.input_ids) + params.max_new_tokens)
        self.queue.append((key, request))

    def cancel(self, key: Hashable) -> None:
        """Drop a queued or running request; no more events come for it."""
        self.queue = deque((k, r) for k, r in self.queue if k != key)
        for row, state in enumerate(self.rows):
            if state.key == key:
                self._remove(row)
                break

    def step(self) -> list[Event]:
        """Admit queued requests into free rows, then one token for every active row."""
        self._admit()
        if not self.rows:
            return []
        n = len(self.rows)
        tokens = self._sample(n)
        events, finished = [], []
        for row, (state, token) in enumerate(zip(self.rows, tokens.tolist())):
            if token in state.eos:
                finished.append(row)
                events.append(self._finish(state, "stop"))
                continue
            events.append(Event(state.key, token))
            state.produced += 1
            if state.produced >= state.params.max_new_tokens:
                finished.append(row)
                events.append(self._finish(state, "length"))
        if self.seen is not None:
            self.seen[torch.arange(n, device=self.engine.device), tokens] = True
        for row in reversed(finished):
            tokens[row] = tokens[len(self.rows) - 1]
            self._remove(row)
        if self.rows:
            self.logits[: len(self.rows)] = self.engine.decode(self.cache, tokens[: len(self.rows)])
        return events

    # -- admission, sampling, compaction -------------------------------------------------

    def _admit(self) -> None:
        engine = self.engine
        while self.queue and len(self.rows) < self.slots:
            key, request = self.queue.popleft()
            params = request.params or self.params
            need = len(request.input_ids) + params.max_new_tokens
            if self.cache is None:
                self.cache = engine.new_cache(self.slots, need)
            elif need > self.cache.max_len:
                self.cache = self.cache.grown(need)
            row = len(self.rows)
            start = time.perf_counter()
            self.logits[row] = engine.prefill(self.cache, [(request.input_ids, request.visual_features)], start=row)[0]
            if params.repetition_penalty != 1.0:
                vocab = self.logits.shape[1]
                if self.seen is None:
                    self.seen = torch.zeros(self.slots, vocab, dtype=torch.bool, device=engine.device)
                self.seen[row] = False
                self.seen[row, torch.tensor(request.input_ids, device=engine.device).clamp(max=vocab - 1)] = True
            generator = self.generator
            if request.seed is not None:
                generator = torch.Generator(device=engine.device).manual_seed(request.seed)
            eos = frozenset() if params.ignore_eos else frozenset(engine.eos_token_ids)
            self.rows.append(_Row(key, request, params, generator, eos, time.perf_counter() - start))

    def _sample(self, n: int) -> torch.Tensor:
        rows, seen = self.rows, self.seen
        if all(r.params == rows[0].params and r.generator is rows[0].generator for r in rows) or all(
            r.params.greedy and r.params.repetition_penalty == rows[0].params.repetition_penalty for r in rows
        ):
            return next_token(self.logits[:n], rows[0].params, rows[0].generator, None if seen is None else seen[:n])
        return torch.cat([
            next_token(self.logits[i : i + 1], r.params, r.generator, None if seen is None else seen[i : i + 1])
            for i, r in enumerate(rows)
        ])  # fmt: skip

    def _finish(self, state: _Row, reason: str) -> Event:
        return Event(state.key, None, True, reason, state.prefill_s)

    def _remove(self, row: int) -> None:
        """Row `row` leaves: the last active row moves into its place, keeping rows 0..n-1 dense."""
        last = len(self.rows) - 1
        if row != last:
            self.cache.move_row(last, row)
            self.logits[row] = self.logits[last]
            if self.seen is not None:
                self.seen[row] = self.seen[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()


def generate(
    engine,
    requests: list[Request],
    params: DecodingParams,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """One yield per step, one entry per request: the new token id, or None once finished."""
    scheduler = Scheduler(engine, params, max(1, len(requests)), generator)
    for i, request in enumerate(requests):
        scheduler.add(i, request)
    while not scheduler.idle:
        step: list[int | None] = [None] * len(requests)
        for event in scheduler.step():
            if event.token is not None:
                step[event.key] = event.token
        if all(t is None for t in step):
            return
        yield step


def stream(
    engine,
    requests: Iterable[tuple[Hashable, Request]],
    params: DecodingParams,
    generator: torch.Generator | None = None,
    slots: int = 8,
) -> Iterator[tuple[Hashable, int | None]]:
    """(key, token) events in generation order; (key, None) once a request has finished.

    Requests are taken from the lazy iterable only as rows free up.
    """
    scheduler = Scheduler(engine, params, slots, generator)
    pending = iter(requests)
    while True:
        while len(scheduler.queue) + scheduler.active < slots and (item := next(pending, None)) is not None:
            scheduler.add(*item)
        if scheduler.idle:
            return
        for event in scheduler.step():
            yield event.key, event.token
