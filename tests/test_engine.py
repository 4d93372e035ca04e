"""The engine against transformers' VideoLlama3ForConditionalGeneration (CPU, float32).

Both get the same tensors (input ids, pixel values, grids, keep masks); logits must agree within
1e-4 and greedy generation token for token.
"""

from __future__ import annotations

import pytest
import torch
import tiny

from vl3cli.decoding import DecodingParams
from vl3cli.engine import Engine
from vl3cli.generate import Request, generate

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(hf_checkpoint) -> Engine:
    return Engine.load(hf_checkpoint, device="cpu", dtype="float32")


def ids_of(text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tiny.tokenizer_json()).encode(text, add_special_tokens=False).ids


def chat(visual: list[int], question: str) -> list[int]:
    im_start, im_end = tiny.token_id("<|im_start|>"), tiny.token_id("<|im_end|>")
    return (
        [im_start]
        + ids_of("user\n")
        + visual
        + ids_of("\n" + question)
        + [im_end]
        + ids_of("\n")
        + [im_start]
        + ids_of("assistant\n")
    )


def image_case(seed=0, grid=(1, 6, 8)):
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    pixels = torch.randn(t * h * w, 588, generator=gen)
    ids = chat([tiny.token_id("<|image_pad|>")] * (t * h * w), "Describe this image in detail.")
    return ids, pixels, grid


def video_case(seed=1, grid=(4, 4, 6)):
    """A video whose keep mask drops tokens of frames 1..3 (frame 0 whole, each frame keeps >= 1)."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    pixels = torch.randn(t * h * w, 588, generator=gen)
    per_frame = (h // 2) * (w // 2)
    keep = torch.rand(t * per_frame, generator=gen) > 0.4
    keep[:per_frame] = True
    keep[per_frame::per_frame] = True
    assert not keep.all()
    video = tiny.token_id("<|video_pad|>")
    visual = []
    for f in range(t):
        visual += ids_of(f"Time {f:.1f}s:") + [video] * int(keep[f * per_frame : (f + 1) * per_frame].sum())
        visual += ids_of(",") if f < t - 1 else []
    return chat(visual, "What happens?"), pixels, grid, keep


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_text_only_logits(engine, reference):
    ids = chat([], "The quick brown fox jumps over the lazy dog.")
    with torch.inference_mode():
        ours = engine.forward_logits(ids)
        ref = reference(input_ids=torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert ref.std() > 1.0  # the reference is not flat: a diff below TOL means something
    assert max_diff(ours, ref) <= TOL


def test_image_logits(engine, reference):
    ids, pixels, grid = image_case()
    with torch.inference_mode():
        ours = engine.forward_logits(ids, engine.encode_pixels(pixels, grid, 1))
        ref = reference(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            image_grid_thw=torch.tensor([grid]),
            image_merge_sizes=torch.tensor([1]),
        ).logits[0]
    assert max_diff(ours, ref) <= TOL


def test_video_logits_with_pruning(engine, reference):
    ids, pixels, grid, keep = video_case()
    with torch.inference_mode():
        features = engine.encode_pixels(pixels, grid, 2, keep)
        assert features.shape[0] == int(keep.sum()) < keep.numel()
        ours = engine.forward_logits(ids, features)
        ref = reference(
            input_ids=torch.tensor([ids]),
            pixel_values_videos=pixels,
            video_grid_thw=torch.tensor([grid]),
            video_merge_sizes=torch.tensor([2]),
            video_compression_mask=keep,
        ).logits[0]
    assert max_diff(ours, ref) <= TOL


def test_batch_of_two_prompts_of_different_lengths(engine, reference):
    """Two rows of different lengths, each prefilled, then decode steps for both == transformers on each alone."""
    long_ids, pixels, grid = image_case(seed=3, grid=(1, 4, 6))
    short_ids = chat([], "Hi")
    assert len(long_ids) != len(short_ids)
    steps = [5, 17, 42]  # tokens fed in three decode steps, to both rows
    with torch.inference_mode():
        feats = engine.encode_pixels(pixels, grid, 1)
        cache = engine.new_cache(2, len(long_ids) + len(steps))
        ours = [torch.stack([engine.prefill(cache, 0, long_ids, feats), engine.prefill(cache, 1, short_ids)])]
        for token in steps:
            ours.append(engine.decode(cache, torch.tensor([token, token])))
        ref_long = reference(
            input_ids=torch.tensor([long_ids + steps]),
            pixel_values=pixels,
            image_grid_thw=torch.tensor([grid]),
            image_merge_sizes=torch.tensor([1]),
        ).logits[0]
        ref_short = reference(input_ids=torch.tensor([short_ids + steps])).logits[0]
    for i, logits in enumerate(ours):
        assert max_diff(logits[0], ref_long[len(long_ids) - 1 + i]) <= TOL
        assert max_diff(logits[1], ref_short[len(short_ids) - 1 + i]) <= TOL


def test_cached_decode_equals_full_forward(engine):
    ids = chat([], "What happens after the cat jumps?")
    with torch.inference_mode():
        full = engine.forward_logits(ids)
        cache = engine.new_cache(1, len(ids))
        stepped = [engine.prefill(cache, 0, ids[:4])]
        for token in ids[4:]:
            stepped.append(engine.decode(cache, torch.tensor([token]))[0])
    assert max_diff(torch.stack(stepped), full[3:]) <= TOL


@pytest.mark.parametrize("start, keep", [(0, 1), (0, 3), (7, 1), (7, 3)])
def test_prefill_of_the_last_positions_only(engine, start, keep):
    """The last layer's attention output and MLP run for the kept positions alone; their hidden
    states, and every key and value cached, equal those of the whole chunk's prefill."""
    ids = chat([], "What happens after the cat jumps?")
    language, last = engine.model.language, engine.model.language.layers[-1]
    rows = []
    hook = last.mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        with torch.inference_mode():
            embeds = engine.embed(ids, None)
            caches = [engine.new_cache(1, len(ids)) for _ in range(2)]
            for cache in caches:  # a prefix already in place, when start > 0
                if start:
                    language.prefill(embeds[:start], cache, 0, 0)
            rows.clear()
            whole = language.prefill(embeds[start:], caches[0], 0, start)
            kept = language.prefill(embeds[start:], caches[1], 0, start, keep=keep)
    finally:
        hook.remove()
    assert rows == [len(ids) - start, keep]
    assert kept.shape == (keep, whole.shape[1])
    assert max_diff(kept, whole[-keep:]) <= 1e-5
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_32_greedy_tokens_equal_transformers_generate(engine, reference):
    ids, pixels, grid = image_case(seed=5)
    params = DecodingParams(max_new_tokens=32, ignore_eos=True)
    with torch.inference_mode():
        feats = engine.encode_pixels(pixels, grid, 1)
        ours = [step[0] for step in generate(engine, [Request(ids, feats)], params)]
        ref = reference.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=pixels,
            image_grid_thw=torch.tensor([grid]),
            image_merge_sizes=torch.tensor([1]),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=[],
            pad_token_id=0,
            suppress_tokens=tiny.placeholder_ids(engine.path),
        )[0, len(ids) :].tolist()
    assert len(ours) == 32
    assert ours == ref


def test_greedy_stops_at_eos_like_transformers(engine, reference):
    """With the checkpoint's stop ids in force both stop at the same place (or both run to the limit)."""
    ids, pixels, grid, keep = video_case(seed=7)
    params = DecodingParams(max_new_tokens=24)
    with torch.inference_mode():
        feats = engine.encode_pixels(pixels, grid, 2, keep)
        ours = [step[0] for step in generate(engine, [Request(ids, feats)], params)]
        ref = reference.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values_videos=pixels,
            video_grid_thw=torch.tensor([grid]),
            video_merge_sizes=torch.tensor([2]),
            video_compression_mask=keep,
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=list(engine.eos_token_ids),
            pad_token_id=0,
            suppress_tokens=tiny.placeholder_ids(engine.path),
        )[0, len(ids) :].tolist()
    ref = [t for t in ref if t not in engine.eos_token_ids]  # we never yield the stop token
    assert ours == ref


def test_batched_generation_equals_one_at_a_time(engine):
    cases = [image_case(seed=s, grid=g) for s, g in ((11, (1, 4, 6)), (12, (1, 6, 4)), (13, (1, 2, 8)))]
    params = DecodingParams(max_new_tokens=12)
    with torch.inference_mode():
        requests = [Request(ids, engine.encode_pixels(px, grid, 1)) for ids, px, grid in cases]
        requests.append(Request(chat([], "Hi"), None))
        batched = list(generate(engine, requests, params))
        for row, request in enumerate(requests):
            alone = [step[0] for step in generate(engine, [request], params)]
            column = [step[row] for step in batched]
            assert [t for t in column if t is not None] == alone


def test_sampling_is_reproducible_and_greedy_ignores_seed(engine):
    ids = chat([], "Describe this image in detail.")
    with torch.inference_mode():
        def run(params, seed):
            return [s[0] for s in generate(engine, [Request(ids, seed=seed)], params)]

        # A high temperature: the tiny model is very peaked, and two seeds must be able to differ.
        sampled = DecodingParams(max_new_tokens=16, temperature=8.0, top_k=200, top_p=0.99, ignore_eos=True)
        assert run(sampled, 1) == run(sampled, 1)
        assert run(sampled, 1) != run(sampled, 2)
        greedy = DecodingParams(max_new_tokens=16)
        assert run(greedy, 1) == run(greedy, 2)


def test_continuous_batching_equals_one_at_a_time(engine):
    """7 requests through 3 slots: rows leave as they finish and new requests take their place.

    Prompts grow along the way (the cache must grow) and max_new_tokens differs in effect because
    some requests stop at EOS early; every request's tokens equal its solo greedy run.
    """
    from vl3cli.generate import stream

    requests = {}
    for i in range(7):
        if i % 2:
            ids, px, grid = image_case(seed=20 + i, grid=(1, 2 + i, 4))
            with torch.inference_mode():
                requests[i] = Request(ids, engine.encode_pixels(px, grid, 1))
        else:
            requests[i] = Request(chat([], "Hi " * (1 + 3 * i)))
    for params in (DecodingParams(max_new_tokens=10), DecodingParams(max_new_tokens=6, repetition_penalty=1.3)):
        with torch.inference_mode():
            got: dict[int, list[int]] = {k: [] for k in requests}
            finished = []
            for event in stream(engine, requests.items(), params, slots=3):
                assert event.key not in finished
                if event.token is not None:
                    got[event.key].append(event.token)
                if event.finished:
                    finished.append(event.key)
            assert sorted(finished) == list(requests)
            for key, request in requests.items():
                alone = [s[0] for s in generate(engine, [request], params)]
                assert got[key] == alone, key


def test_encode_visuals_packs_several_items_in_one_call(engine):
    """Two images and a pruned video in one vision call == each encoded alone; the uint8 patches are
    normalised on the device to exactly the values of the float pre-processing."""
    from vl3cli.preprocess import VisualInput, normalise_table

    table = torch.from_numpy(normalise_table((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    gen = torch.Generator().manual_seed(3)

    def item(kind, grid, merge, keep=None):
        patches = torch.randint(0, 256, (grid[0] * grid[1] * grid[2], 588), generator=gen, dtype=torch.uint8)
        return VisualInput("x", kind, patches, table, grid, merge, keep, [], 1, 1, None, None, 1, 1)

    _, _, _, keep = video_case()
    visuals = [item("image", (1, 4, 6), 1), item("video", (4, 4, 6), 2, keep), item("image", (1, 6, 4), 1)]
    # (x / 255 - mean) / std, computed here by hand: the table's values are those, to float32 rounding
    by_hand = (visuals[0].patches.double() / 255 - 0.5) / 0.5
    assert (visuals[0].pixel_values.double() - by_hand).abs().max() <= 1e-6
    with torch.inference_mode():
        packed = engine.encode_visuals(visuals)
        for v, features in zip(visuals, packed):
            alone = engine.encode_pixels(v.pixel_values, v.grid_thw, v.merge_size, v.keep)
            assert features.shape == alone.shape == (v.visual_tokens_kept, engine.config.text.hidden_size)
            # more rows per matrix product: another kernel, float32 rounding apart
            assert max_diff(features, alone) <= 1e-5
