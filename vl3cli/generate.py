"""Generation: prefill a batch of requests, then decode step by step. Yields token ids only.

    for step in generate(engine, [Request(ids, features)], params, generator):
        step[0]  # the new token of request 0, or None once it has finished

A request finishes on one of the checkpoint's EOS ids (never yielded) or after
`params.max_new_tokens` tokens; its finish reason is "length" in the second case, else "stop".
Text, streaming and JSON are the caller's business (output.py, cli.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .decoding import DecodingParams, next_token


@dataclass
class Request:
    input_ids: list[int]  # full prompt incl. placeholders
    visual_features: torch.Tensor | None = None  # (placeholders in input_ids, D_text)


def generate(
    engine,
    requests: list[Request],
    params: DecodingParams,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """One yield per step, one entry per request: the new token id, or None once finished."""
    if not requests:
        return
    device = engine.device
    batch = len(requests)
    longest = max(len(r.input_ids) for r in requests)
    cache = engine.new_cache(batch, longest + params.max_new_tokens)
    eos = torch.tensor([] if params.ignore_eos else engine.eos_token_ids, dtype=torch.long, device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        vocab = engine.config.text.vocab_size
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        for row, r in enumerate(requests):
            seen[row, torch.tensor(r.input_ids, device=device).clamp(max=vocab - 1)] = True

    logits = engine.prefill(cache, [(r.input_ids, r.visual_features) for r in requests])
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(params.max_new_tokens):
        tokens = next_token(logits, params, generator, seen)  # (B,)
        stopped = torch.isin(tokens, eos) | done
        out = [None if s else t for t, s in zip(tokens.tolist(), stopped.tolist())]
        done = stopped
        if all(t is None for t in out):
            return
        yield out
        if step + 1 == params.max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(batch, device=device), tokens] = True
        logits = engine.decode(cache, tokens)
