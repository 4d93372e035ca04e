"""The Scheduler: per-row decoding parameters and seeds, cancellation, prefix reuse, multi-turn KV.

Float32 on CPU, greedy answers compared exactly (token for token).
"""

from __future__ import annotations

import pytest
import torch
import tiny
from test_engine import chat, ids_of, image_case

from vl3cli.decoding import DecodingParams, RowParams, filter_top_k_top_p, gumbel_noise, sample, uniform_of
from vl3cli.engine import Engine
from vl3cli.errors import Vl3Error
from vl3cli.generate import Request, Scheduler, generate, stream

GREEDY = DecodingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(hf_checkpoint) -> Engine:
    return Engine.load(hf_checkpoint, device="cpu", dtype="float32")


def run(engine, requests: dict, params=GREEDY, slots=4, cancel_after=None):
    """Every request's tokens and its finishing event, through one scheduler."""
    scheduler = Scheduler(engine, params, slots)
    for key, request in requests.items():
        scheduler.add(key, request)
    tokens = {key: [] for key in requests}
    finished = {}
    steps = 0
    with torch.inference_mode():
        while not scheduler.idle:
            for event in scheduler.step():
                assert event.key not in finished
                if event.token is not None:
                    tokens[event.key].append(event.token)
                if event.finished:
                    finished[event.key] = event
            steps += 1
            if cancel_after and steps == cancel_after[1]:
                scheduler.cancel(cancel_after[0])
    return tokens, finished


def alone(engine, request, params=GREEDY):
    return run(engine, {0: request}, params, slots=1)[0][0]


def image_request(engine, seed, **kw):
    ids, pixels, grid = image_case(seed=seed, grid=(1, 4, 6))
    with torch.inference_mode():
        return Request(ids, engine.encode_pixels(pixels, grid, 1), **kw)


def test_per_row_parameters_and_seeds_in_one_batch_equal_each_request_alone(engine):
    hot = DecodingParams(max_new_tokens=10, temperature=8.0, top_k=100, top_p=0.95, ignore_eos=True)
    requests = {
        "greedy": image_request(engine, 1),
        "sampled": Request(chat([], "Describe this image in detail."), params=hot, seed=7),
        "other seed": Request(chat([], "Describe this image in detail."), params=hot, seed=8),
        "penalised": Request(chat([], "Hi"), params=DecodingParams(max_new_tokens=8, repetition_penalty=1.5), seed=3),
    }
    together, finished = run(engine, requests)
    for key, request in requests.items():
        assert together[key] == alone(engine, request, request.params or GREEDY), key
    assert together["sampled"] != together["other seed"]  # the seed matters...
    assert len(together["sampled"]) == 10 and finished["sampled"].reason == "length"
    assert run(engine, {0: requests["sampled"]})[0][0] == together["sampled"]  # ...and repeats


def test_cancel_frees_the_row_and_leaves_the_others_unchanged(engine):
    requests = {k: image_request(engine, 10 + k) for k in range(3)}
    requests[3] = Request(chat([], "Hi"))
    full, _ = run(engine, requests, DecodingParams(max_new_tokens=12, ignore_eos=True), slots=3)
    cut, finished = run(engine, requests, DecodingParams(max_new_tokens=12, ignore_eos=True), slots=3,
                        cancel_after=(1, 4))
    assert len(cut[1]) == 4 and 1 not in finished  # no more events, no finishing event
    assert {k: cut[k] for k in (0, 2, 3)} == {k: full[k] for k in (0, 2, 3)}
    assert sorted(finished) == [0, 2, 3]  # request 3 got the freed row


def test_prefix_reuse_equals_prefilling_everything(engine):
    """Three questions on one image, batched: the shared image prefix is prefilled once."""
    ids, pixels, grid = image_case(seed=5, grid=(1, 4, 6))
    im_start = tiny.token_id("<|im_start|>")
    visual = [tiny.token_id("<|image_pad|>")] * 24
    shared = [im_start] + ids_of("user\n") + visual
    questions = ["What is it?", "Describe this image in detail.", "Hi"]
    full = [chat(visual, q) for q in questions]
    assert all(f[: len(shared)] == shared for f in full)
    with torch.inference_mode():
        features = engine.encode_pixels(pixels, grid, 1)
        prefix = engine.prefill_prefix(shared, features)
    plain, _ = run(engine, {i: Request(f, features) for i, f in enumerate(full)})
    reused, finished = run(engine, {i: Request(f, None, prefix=prefix) for i, f in enumerate(full)})
    assert reused == plain and all(len(t) > 3 for t in plain.values())
    assert {e.cached_tokens for e in finished.values()} == {len(shared)}


def test_second_turn_from_kept_kv_equals_second_turn_from_scratch(engine):
    first = image_request(engine, 6, keep_kv=True)
    tokens, finished = run(engine, {"turn1": first})
    kept = finished["turn1"].prefix
    assert kept.ids == first.input_ids + tokens["turn1"][: len(kept.ids) - len(first.input_ids)]
    im_start, im_end = tiny.token_id("<|im_start|>"), tiny.token_id("<|im_end|>")
    follow = (first.input_ids + tokens["turn1"] + [im_end] + ids_of("\n") + [im_start]
              + ids_of("user\nWhat happens after the cat jumps?") + [im_end] + ids_of("\n") + [im_start]
              + ids_of("assistant\n"))
    scratch, _ = run(engine, {"turn2": Request(follow, first.visual_features)})
    reused, done = run(engine, {"turn2": Request(follow, None, prefix=kept)})
    assert reused == scratch and len(scratch["turn2"]) > 3
    assert done["turn2"].cached_tokens == len(kept.ids)


def test_requests_that_cannot_be_served_are_refused(engine):
    scheduler = Scheduler(engine, GREEDY)
    with torch.inference_mode():
        prefix = engine.prefill_prefix(chat([], "Hi")[:-1])
    with pytest.raises(Vl3Error, match="do not start with its prefix"):
        scheduler.add(0, Request(chat([], "Ho"), prefix=prefix))
    with pytest.raises(Vl3Error, match="more than the model's 4096"):
        scheduler.add(1, Request([5] * 4090))
    # no prompt, or an id outside the embedding table (on CUDA a device assert that ends every row)
    vocab = engine.config.text.vocab_size
    with pytest.raises(Vl3Error, match="at least one prompt token"):
        scheduler.add(2, Request([]))
    for bad in (vocab, -1):
        with pytest.raises(Vl3Error, match=f"token id {bad} is outside the model's vocabulary of {vocab}"):
            scheduler.add(3, Request(chat([], "Hi") + [bad]))
    assert scheduler.idle
    with pytest.raises(Vl3Error, match="at least one row"):
        Scheduler(engine, GREEDY, slots=0)  # no row to admit into: a caller's loop would never end


def test_stream_ends_a_refused_request_alone(engine):
    """A request `add` refuses (too long for the model) finishes with reason "error" in `stream`;
    the requests before and after it get the answers they get alone."""
    good = {"a": image_request(engine, 22), "b": Request(chat([], "Hi"))}
    expected = {key: alone(engine, request) for key, request in good.items()}
    tokens, finished = {key: [] for key in (*good, "long")}, {}
    with torch.inference_mode():
        for event in stream(engine, [("a", good["a"]), ("long", Request([5] * 4090)), ("b", good["b"])], GREEDY, 2):
            if event.token is not None:
                tokens[event.key].append(event.token)
            if event.finished:
                finished[event.key] = event
    assert finished["long"].reason == "error" and tokens["long"] == []
    assert "more than the model's 4096" in str(finished["long"].error)
    assert {key: tokens[key] for key in good} == expected and all(len(t) > 3 for t in expected.values())


def test_a_request_whose_prefill_fails_ends_alone(engine):
    """A request the engine cannot prefill (here its placeholders lack features) finishes at once
    with reason "error" and the exception; the requests beside it get the answers they get alone."""
    bad = Request(chat([tiny.token_id("<|image_pad|>")] * 3, "What is it?"))  # no visual features
    good = {"a": image_request(engine, 21), "b": Request(chat([], "Hi"))}
    expected = {key: alone(engine, request) for key, request in good.items()}
    tokens, finished = run(engine, {"a": good["a"], "bad": bad, "b": good["b"]}, slots=2)
    assert finished["bad"].reason == "error" and tokens["bad"] == []
    assert isinstance(finished["bad"].error, Vl3Error) and "visual features" in str(finished["bad"].error)
    assert {key: tokens[key] for key in good} == expected and all(len(t) > 3 for t in expected.values())
    assert {finished[key].reason for key in good} <= {"stop", "length"}


def test_gumbel_draws_follow_the_softmax():
    """4000 draws with distinct seeds: frequencies within 4 standard deviations of the probabilities."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    n = 4000
    noise = gumbel_noise(torch.arange(n), torch.zeros(n, dtype=torch.long), 5)
    counts = torch.bincount((logits + noise).argmax(-1), minlength=5).float()
    p = logits.softmax(-1)
    assert ((counts / n - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all()
    # a draw depends on (seed, step) only
    again = gumbel_noise(torch.tensor([17, 3]), torch.tensor([2, 0]), 5)
    assert torch.equal(again[0], gumbel_noise(torch.tensor([17]), torch.tensor([2]), 5)[0])
    assert not torch.equal(again[0], gumbel_noise(torch.tensor([17]), torch.tensor([3]), 5)[0])


def test_uniforms_stay_strictly_inside_0_1_so_the_noise_is_finite():
    """At the extremes of the hash's 32 bits (hand-computed: (0 + 1/2) / 2^23 and (2^23 - 1/2) / 2^23)
    the uniform is inside (0, 1); a uniform of exactly 1 made a token's noise +inf, and that token
    won whatever its logit or its top-k/top-p mask."""
    bits = torch.tensor([0, 511, 512, (1 << 32) - 1], dtype=torch.long)
    u = uniform_of(bits)
    assert u.tolist() == [0.5 / 2**23, 0.5 / 2**23, 1.5 / 2**23, (2**23 - 0.5) / 2**23]
    assert (u > 0).all() and (u < 1).all() and (-torch.log(-torch.log(u))).isfinite().all()


def test_a_tiny_temperature_draws_the_most_likely_token():
    """T -> 0 puts all the probability on the largest logit (hand-computed limit). At 1e-40 (a float32
    subnormal) logits / T overflowed: all +inf or all -inf, and the draw fell on token 0 whatever
    the logits, with or without top-k/top-p."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [-3.0, -1.0, -2.0, -5.0], [30.0, 35.0, 10.0, -5.0]])
    n, seen = logits.shape[0], torch.zeros(logits.shape, dtype=torch.bool)
    for top_k, top_p in ((0, 1.0), (2, 1.0), (0, 0.9)):
        params = RowParams.allocate(n, "cpu")
        for row in range(n):
            params.set_row(row, DecodingParams(temperature=1e-40, top_k=top_k, top_p=top_p))
        for seed in range(20):
            seeds = torch.full((n,), seed, dtype=torch.long)
            assert sample(logits, params, seen, seeds, torch.zeros(n, dtype=torch.long)).tolist() == [1, 1, 1]


@pytest.mark.parametrize("penalty, temperature, top_k, top_p",
                         [(1.0, 1.0, 0, 1.0), (1.3, 0.7, 0, 0.8), (0.8, 1.5, 4, 1.0), (1.5, 2.0, 5, 0.9)])
def test_draws_follow_transformers_logits_processors(penalty, temperature, top_k, top_p):
    """4000 draws (distinct seeds) of `sample`: each token's frequency within 4 standard deviations of
    the probability that transformers' repetition penalty, temperature, top-k and top-p processors
    give the same logits; a token they remove is never drawn."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )  # fmt: skip

    logits = torch.tensor([[2.0, 1.5, -0.5, 1.0, 0.2, -1.0, 0.9, -2.0]])
    history = torch.tensor([[1, 4, 5]])
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)])
    processors += [TopKLogitsWarper(top_k)] if top_k else []
    processors += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    p = processors(history, logits.clone()).softmax(-1)[0]
    n, vocab = 4000, logits.shape[1]
    params = RowParams.allocate(n, "cpu")
    params.temperature.fill_(temperature), params.top_k.fill_(top_k), params.top_p.fill_(top_p)
    params.penalty.fill_(penalty)
    seen = torch.zeros(n, vocab, dtype=torch.bool)
    seen[:, history[0]] = True
    drawn = sample(logits.expand(n, -1), params, seen, torch.arange(n), torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(drawn, minlength=vocab).float() / n
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)
    assert (freq[p == 0] == 0).all()


def test_top_p_of_one_keeps_every_token_of_a_large_vocabulary():
    """float32 cumulative sums over 151,936 probabilities pass 1 before the last token; top-p 1
    (off) must still keep the whole tail, as skipping the filter does."""
    logits = torch.randn(4, 151936, generator=torch.Generator().manual_seed(0)) * 3
    out = filter_top_k_top_p(logits, torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert torch.equal(out, logits)


def test_top_k_top_p_per_row_match_their_definitions():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 3)
    out = filter_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]))
    keep = out.isfinite()
    assert keep[0].tolist() == [True, True, False, False, False]  # top-2
    p = logits[1].softmax(-1)  # top-p 0.7: the smallest prefix reaching 0.7
    assert p[0] < 0.7 <= p[:2].sum() and keep[1].tolist() == [True, True, False, False, False]
    assert keep[2].all()
    params = RowParams.allocate(3, "cpu")
    seen = torch.zeros(3, 5, dtype=torch.bool)
    assert sample(logits, params, seen, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)).tolist() == [0, 0, 0]


def test_the_cache_holds_only_the_rows_in_use_and_grows_mid_answer(engine):
    """One answer holds one row of KV cache whatever `slots` is; requests joining while it decodes
    grow the cache (rows in powers of two, and positions for a longer prompt) without changing
    any answer."""
    params = DecodingParams(max_new_tokens=10, ignore_eos=True)
    first = image_request(engine, 21)
    later = [Request(chat([], "Hi")), Request(chat([], "Describe this image in detail. " * 40))]
    scheduler = Scheduler(engine, params, slots=8)
    scheduler.add(0, first)
    tokens = {0: [], 1: [], 2: []}
    shapes = []
    with torch.inference_mode():
        while not scheduler.idle:
            for event in scheduler.step():
                if event.token is not None:
                    tokens[event.key].append(event.token)
            shapes.append((scheduler._cache.batch, scheduler._cache.max_len))
            if len(shapes) == 3:
                for key, request in enumerate(later, start=1):
                    scheduler.add(key, request)
    assert shapes[0][0] == 1 and max(b for b, _ in shapes) == 4  # 3 answers at most: a 4-row bucket
    assert shapes[-1][1] > shapes[0][1] >= len(first.input_ids) + 10
    assert len(later[1].input_ids) + 10 > shapes[0][1]  # the long prompt needed more positions
    for key, request in enumerate([first, *later]):
        assert tokens[key] == alone(engine, request, params), key


class Graphs:
    """Stands in for the engine's CUDA graphs: runs the step eagerly, records the caches used and forgotten."""

    def __init__(self):
        self.ran, self.forgotten = set(), []

    def run(self, engine, cache, tokens, out):
        self.ran.add(cache.k.data_ptr())
        engine.step(cache, tokens, out)

    def forget(self, cache):
        self.forgotten.append(cache.k.data_ptr())


def test_generate_and_stream_forget_their_graphs_however_they_end(engine, monkeypatch):
    """The wrappers close their scheduler: run to the end, or stopped by the caller after one step,
    the decode graphs captured on their cache are freed (they were kept in the engine for good)."""
    graphs = Graphs()
    monkeypatch.setattr(engine, "graphs", graphs)
    params = DecodingParams(max_new_tokens=4, ignore_eos=True)
    with torch.inference_mode():
        assert len(list(generate(engine, [Request(chat([], "Hi"))], params))) == 4
        early = generate(engine, [Request(chat([], "Hi"))], params)
        next(early)
        early.close()
        events = stream(engine, [(0, Request(chat([], "Hi")))], params)
        next(events)
        events.close()
    assert len(graphs.ran) >= 1 and len(graphs.forgotten) == 3 and set(graphs.forgotten) <= graphs.ran


def test_decode_graphs_are_forgotten_with_every_cache_dropped(engine, monkeypatch):
    """CUDA graphs read the cache's buffers: each cache the scheduler drops (grown, or at close)
    is handed to the engine's graphs to forget, and the steps still run through them."""
    graphs = Graphs()
    monkeypatch.setattr(engine, "graphs", graphs)
    params = DecodingParams(max_new_tokens=4, ignore_eos=True)
    scheduler = Scheduler(engine, params, slots=4)
    scheduler.add(0, Request(chat([], "Hi")))
    with torch.inference_mode():
        scheduler.step()
        first = scheduler._cache.k.data_ptr()
        scheduler.add(1, Request(chat([], "Hello there")))  # a second row: the cache grows
        while not scheduler.idle:
            scheduler.step()
        last = scheduler._cache.k.data_ptr()
        scheduler.close()
    assert first != last and graphs.ran == {first, last} and graphs.forgotten == [first, last]


@pytest.mark.parametrize("params", [DecodingParams(max_new_tokens=12, ignore_eos=True),
                                    DecodingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)])
def test_placeholder_tokens_are_never_drawn(engine, monkeypatch, params):
    """The model made to prefer the image and video placeholders (their logits raised above all
    others, after prefill and every decode step): no answer holds one, and a greedy answer is the
    best of the other tokens at every step (worked out from the same logits)."""
    marks = [engine.config.image_token_id, engine.config.video_token_id]
    best_others = []
    real_prefill, real_decode = engine.prefill, engine.decode

    def boosted(logits):
        logits = logits.clone()
        others = logits.clone()
        others[..., marks] = float("-inf")
        best_others.append(others.argmax(dim=-1).reshape(-1).tolist())
        logits[..., marks] = logits.max() + 100
        return logits

    monkeypatch.setattr(engine, "prefill", lambda *a, **k: boosted(real_prefill(*a, **k)))
    monkeypatch.setattr(engine, "decode", lambda cache, tokens, out: out.copy_(boosted(real_decode(cache, tokens, out))))
    tokens = alone(engine, image_request(engine, 5), params)
    assert len(tokens) == 12 and not set(tokens) & set(marks)
    if params.greedy:
        assert tokens == [step[0] for step in best_others[: len(tokens)]]
