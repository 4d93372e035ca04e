"""The static decode step: fused weights, against the previous decode, batched == solo, one graph.

Float32 on CPU throughout. The reference (`reference_decode.py`) is vl3's decode before the static
step, reading the checkpoint file on its own.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from reference_decode import ReferenceDecoder
from test_engine import chat, image_case

from vl3cli.engine import Engine

STEPS = 64
# The static step attends with SDPA (as prefill does), where the reference multiplies q.k itself:
# the same sums in another order, so the logits differ in the last bits (measured: below 2e-6 on
# logits of std ~3).
TOL = 2e-5


@pytest.fixture(scope="module")
def engine(hf_checkpoint) -> Engine:
    return Engine.load(hf_checkpoint, device="cpu", dtype="float32")


def prompts(engine):
    ids, pixels, grid = image_case(seed=31, grid=(1, 4, 6))
    with torch.inference_mode():
        feats = engine.encode_pixels(pixels, grid, 1)
    return [(ids, feats), (chat([], "Hi"), None), (chat([], "What happens after the cat jumps?"), None)]


def test_fused_matrices_hold_the_checkpoint_tensors_exactly(engine, hf_checkpoint):
    state = load_file(str(hf_checkpoint / "model.safetensors"))
    for i, layer in enumerate(engine.model.language.layers):
        p = f"model.language_model.layers.{i}."
        for fused, names in ((layer.self_attn.qkv_proj, ("q", "k", "v")), (layer.mlp.gate_up_proj, ("gate", "up"))):
            kind = "self_attn" if len(names) == 3 else "mlp"
            parts = [state[f"{p}{kind}.{n}_proj.weight"] for n in names]
            assert torch.equal(fused.weight, torch.cat(parts))
            if fused.bias is not None:
                assert torch.equal(fused.bias, torch.cat([state[f"{p}{kind}.{n}_proj.bias"] for n in names]))


def run_static(engine, cases, rows=None, max_len=None):
    """Prefill the cases into rows 0.., then STEPS decode steps feeding each row its greedy token."""
    rows = rows or len(cases)
    cache = engine.new_cache(rows, max_len or max(len(ids) for ids, _ in cases) + STEPS + 1)
    logits = torch.zeros(rows, engine.config.text.vocab_size)
    for row, (ids, f) in enumerate(cases):
        logits[row] = engine.prefill(cache, row, ids, f)
    out = [logits[: len(cases)].clone()]
    for _ in range(STEPS):
        logits = engine.decode(cache, logits.argmax(-1))  # idle rows beyond the cases run too
        out.append(logits[: len(cases)].clone())
    return torch.stack(out)  # (STEPS + 1, B, V)


def run_reference(folder, cases):
    ref = ReferenceDecoder(folder, len(cases), max(len(ids) for ids, _ in cases) + STEPS + 1)
    logits = torch.stack([ref.prefill(row, ids, f) for row, (ids, f) in enumerate(cases)])
    out = [logits]
    for _ in range(STEPS):
        logits = ref.decode(logits.argmax(-1).tolist())
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("which", ["solo", "batched"])
def test_static_step_equals_the_previous_decode_for_64_steps(engine, hf_checkpoint, which):
    cases = prompts(engine)[:1] if which == "solo" else prompts(engine)
    with torch.inference_mode():
        ours = run_static(engine, cases)
        ref = run_reference(hf_checkpoint, cases)
    assert ref.std() > 1.0
    assert (ours - ref).abs().max().item() <= TOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))  # the same greedy tokens, step for step


def test_batched_rows_equal_each_row_alone(engine):
    """A row's answer does not depend on its neighbours (nor on idle rows beyond them), in a cache of
    the same length (the scheduler rounds lengths up to 256 slots). Not bit for bit: on CPU a matrix
    product of 1 row runs another kernel than one of 4 rows: a few 1e-7 apart per step, compounding to
    2.2e-5 over 64 steps (measured), within the 1e-4 used against transformers."""
    cases = prompts(engine)
    with torch.inference_mode():
        batched = run_static(engine, cases, rows=4, max_len=256)
        for row, case in enumerate(cases):
            alone = run_static(engine, [case], max_len=256)[:, 0]
            assert (batched[:, row] - alone).abs().max().item() <= 1e-4
            assert torch.equal(batched[:, row].argmax(-1), alone.argmax(-1))


def test_chunked_prefill_equals_one_pass(engine):
    """Prefill in chunks (as on MPS) == in one pass, within float32 rounding (another SDPA split)."""
    ids, feats = prompts(engine)[0]
    with torch.inference_mode():
        whole = engine.forward_logits(ids, feats)[-1]
        engine.prefill_chunk = 7
        try:
            cache = engine.new_cache(1, len(ids))
            chunked = engine.prefill(cache, 0, ids, feats)
        finally:
            engine.prefill_chunk = None
    assert (whole - chunked).abs().max().item() <= TOL


def test_decode_step_is_one_graph_over_20_growing_steps(engine):
    """dynamo traces the step once: lengths, mask and positions change value, never shape."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(engine.step, backend=counter, fullgraph=True)
    cases = prompts(engine)
    with torch.inference_mode():
        cache = engine.new_cache(4, 128)
        logits = torch.zeros(4, engine.config.text.vocab_size)
        for row, (ids, f) in enumerate(cases):
            logits[row] = engine.prefill(cache, row, ids, f)
        eager_cache = engine.new_cache(4, 128)
        eager_cache.k.copy_(cache.k), eager_cache.v.copy_(cache.v)
        for row, (ids, _) in enumerate(cases):
            eager_cache.set_row(row, len(ids))
        eager = logits.clone()
        for _ in range(20):
            tokens = logits.argmax(-1)
            step(cache, tokens, logits)
            cache.advance()
            engine.step(eager_cache, tokens, eager)
            eager_cache.advance()
            assert torch.equal(logits, eager)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_a_step_attends_over_the_slots_in_use_not_the_whole_cache(engine, monkeypatch):
    """`Engine.decode` hands attention the first max(active lengths) + 1 slots of a 512-slot cache
    (a free row holding more is left out), with the logits of a step over all 512 within float32
    rounding (the masked slots add exact zeros; SDPA splits the sums by the keys' count)."""
    cases = prompts(engine)
    seen: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        if q.shape[2] > 1 and kwargs.get("attn_mask") is not None and kwargs["attn_mask"].shape[2] == 1:
            seen.append(k.shape[2])  # a decode step's call: (B, kv, G, d) queries, one mask row per row
        return sdpa(q, k, v, **kwargs)

    with torch.inference_mode():
        cache = engine.new_cache(4, 512)
        logits = torch.zeros(4, engine.config.text.vocab_size)
        for row, (ids, f) in enumerate(cases):
            logits[row] = engine.prefill(cache, row, ids, f)
        cache.set_row(3, 400, active=False)  # a free row whose stale length is beyond the others
        full_cache = engine.new_cache(4, 512)
        full_cache.k.copy_(cache.k), full_cache.v.copy_(cache.v)
        for row in range(4):
            full_cache.set_row(row, int(cache.host_lengths[row]), bool(cache.host_active[row]))
        full = logits.clone()
        longest = max(len(ids) for ids, _ in cases)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        for step in range(5):
            tokens = logits.argmax(-1)
            seen.clear()
            engine.decode(cache, tokens, logits)
            assert seen == [longest + step + 1] * len(engine.model.language.layers)
            engine.step(full_cache, tokens, full)  # no span: all 512 slots, masked
            full_cache.advance()
            assert (logits[:3] - full[:3]).abs().max().item() <= TOL
            assert torch.equal(logits[:3].argmax(-1), full[:3].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_a_roll_and_signed_sines_equals_rotate_half_bit_for_bit(engine, dtype):
    """apply_rope(x, cos, (-sin, sin)) against the textbook x cos + (-x2, x1) sin written out here,
    on the engine's own table (positions 0..300) for queries and keys stacked as the layers do."""
    from vl3cli.model.language import Qwen2Model, apply_rope

    lm = Qwen2Model(engine.model.language.config)
    lm.init_rope("cpu", dtype)
    d = lm.config.head_dim
    inv_freq = 1.0 / (lm.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    angles = torch.arange(301).float()[:, None] * inv_freq
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    assert torch.equal(lm.rope_cos[:301], cos)
    x = torch.randn(2, 7, 301, d, generator=torch.Generator().manual_seed(4)).to(dtype)  # (B, heads, L, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    expected = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    assert torch.equal(apply_rope(x, lm.rope_cos[:301], lm.rope_sin[:301]), expected)
