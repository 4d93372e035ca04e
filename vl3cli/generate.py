"""Generation: prefill, then decode step by step over a shared KV cache. Yields token ids only.

Two ways in:

- `generate(engine, requests, params, generator)`: a fixed list of requests decoded together;
  one yield per step with one entry per request (the new token id, or None once finished).
- `stream(engine, keyed_requests, params, generator, slots)`: continuous batching for long runs.
  Up to `slots` requests decode together; a request leaves the batch the step it finishes and the
  next one from the (lazy) iterable takes its row, so the batch stays full. Yields
  (key, token id) events and (key, None) when that request is done.

A request finishes on one of the checkpoint's EOS ids (never yielded) or after
`params.max_new_tokens` tokens; its finish reason is "length" in the second case, else "stop".
Each request is prefilled on its own, so its prompt sees exactly what it would see alone; the
decode steps of all active rows share one forward pass.
Text, streaming and JSON are the caller's business (output.py, cli.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .decoding import DecodingParams, next_token


@dataclass
class Request:
    input_ids: list[int]  # full prompt incl. placeholders
    visual_features: torch.Tensor | None = None  # (placeholders in input_ids, D_text)
    # Its own sampler: a request then draws the same tokens in any batch as it would alone.
    generator: torch.Generator | None = None


def generate(
    engine,
    requests: list[Request],
    params: DecodingParams,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """One yield per step, one entry per request: the new token id, or None once finished."""
    done = [False] * len(requests)
    step: list[int | None] = [None] * len(requests)
    for events in _steps(engine, enumerate(requests), params, generator, max(1, len(requests))):
        for key, token in events:
            if token is None:
                done[key] = True
            else:
                step[key] = token
        if all(t is None for t in step):
            return
        yield list(step)
        step = [None] * len(requests)


def stream(
    engine,
    requests: Iterable[tuple[Hashable, Request]],
    params: DecodingParams,
    generator: torch.Generator | None = None,
    slots: int = 8,
) -> Iterator[tuple[Hashable, int | None]]:
    """(key, token) events in generation order; (key, None) once a request has finished."""
    for events in _steps(engine, requests, params, generator, slots):
        yield from events


def _steps(engine, requests, params: DecodingParams, generator, slots: int) -> Iterator[list[tuple]]:
    """The scheduler: per step, the (key, token | None) events of every active row."""
    device = engine.device
    vocab = engine.config.text.vocab_size
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    pending = iter(requests)
    keys: list = []  # row i of the cache belongs to keys[i]
    produced: list[int] = []
    samplers: list = []  # row i draws with samplers[i] (its request's generator, else the shared one)
    cache = None
    logits = None  # (slots, V): next-token logits of each active row
    seen = None  # (slots, V) bool: tokens each row has seen, for the repetition penalty
    exhausted = False
    while True:
        while not exhausted and len(keys) < slots:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            key, request = item
            need = len(request.input_ids) + params.max_new_tokens
            engine.check_length(need)
            if cache is None:
                cache = engine.new_cache(slots, need)
                logits = torch.empty(slots, vocab, device=device)
            elif need > cache.max_len:
                cache = cache.grown(need)
            row = len(keys)
            logits[row] = engine.prefill(cache, [(request.input_ids, request.visual_features)], start=row)[0]
            if params.repetition_penalty != 1.0:
                if seen is None:
                    seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
                seen[row] = False
                seen[row, torch.tensor(request.input_ids, device=device).clamp(max=vocab - 1)] = True
            keys.append(key)
            produced.append(0)
            samplers.append(request.generator or generator)
        if not keys:
            return
        n = len(keys)
        if params.greedy or all(g is generator for g in samplers):
            tokens = next_token(logits[:n], params, generator, None if seen is None else seen[:n])
        else:
            tokens = torch.cat([
                next_token(logits[i : i + 1], params, samplers[i], None if seen is None else seen[i : i + 1])
                for i in range(n)
            ])
        events, finished = [], []
        for row, token in enumerate(tokens.tolist()):
            if token in eos:
                events.append((keys[row], None))
                finished.append(row)
                continue
            events.append((keys[row], token))
            produced[row] += 1
            if produced[row] >= params.max_new_tokens:
                events.append((keys[row], None))
                finished.append(row)
        yield events
        if seen is not None:
            seen[torch.arange(n, device=device), tokens] = True
        # Finished rows leave: the last active row moves into each hole, keeping rows 0..n-1 dense.
        for row in reversed(finished):
            last = len(keys) - 1
            if row != last:
                cache.move_row(last, row)
                tokens[row] = tokens[last]
                if seen is not None:
                    seen[row] = seen[last]
                keys[row], produced[row], samplers[row] = keys[last], produced[last], samplers[last]
            keys.pop()
            produced.pop()
            samplers.pop()
        if keys:
            logits[: len(keys)] = engine.decode(cache, tokens[: len(keys)])
