"""Weight-only int8 / int4: the quantization error bounds, the packed CPU kernels against the generic
path, and the whole model's logits against float32 on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch
from test_engine import image_case

from vl3cli.engine import Engine
from vl3cli.quantize import (
    DIGITS_STEPS,
    QuantizedLinear,
    activation_digits,
    dequantize,
    onednn_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def weights(n=400, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int8_and_int4_round_to_within_half_a_step():
    w = weights()
    q, s = quantize_int8(w, torch.float32)
    assert (dequantize("int8", q, s, torch.float32) - w).abs().le(s[:, None] / 2 + 1e-6).all()
    q4, sz = quantize_int4(w, 32, torch.float32)
    assert q4.max() <= 15 and torch.equal(unpack_int4(pack_int4(q4)), q4)
    step = sz[..., 0].t().repeat_interleave(32, dim=1)  # (N, K): each weight's group scale
    assert (dequantize("int4", pack_int4(q4), sz, torch.float32) - w).abs().le(step / 2 + 1e-6).all()


def test_activation_digits_write_each_row_to_16_bits():
    """The digits are bytes of an integer X (zero point 128 each) with |x - s X| <= 3/4 s (half a
    step for the rounding, at most a quarter for the float32 quotient x / s) and s = max|x| /
    (128 * 256 - 129 - 2): checked by rebuilding X in float64, for rows with a 10^4 outlier, a
    zero row, a single nonzero element and large and tiny magnitudes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 300, generator=gen, dtype=torch.float64)
    x[1, 7] = 2.5e4  # a massive activation
    x[2] = 0
    x[3] = 0
    x[3, 299] = -3.0
    x[4] *= 1e-30
    x[5] *= 1e30
    digits, top = activation_digits(x.float())
    assert digits.dtype == torch.uint8 and digits.shape == (12, 300) and top.shape == (6, 1)
    s = top.double() / DIGITS_STEPS  # the step the layer multiplies back by
    d = digits.double().view(2, 6, 300) - 128
    whole = d[0] + 256 * d[1]
    xf = x.float().double()
    top_digits = 127 + 256 * 127  # two signed 8-bit digits, the upper one at most 127
    assert whole.abs().max() <= top_digits
    assert ((xf - s * whole).abs() <= 0.75 * s).all()
    amax = xf.abs().amax(1, keepdim=True)
    assert DIGITS_STEPS == top_digits - 2
    assert torch.equal(top.double()[amax > 0], amax[amax > 0]) and top[2].item() == pytest.approx(1e-30)
    assert whole[2].abs().max() == 0 and whole[3, 299] == -(top_digits - 2)


def test_onednn_int8_product_is_exact_here_or_not_chosen():
    """The check behind the "onednn" kernel agrees with an exact integer product; where it fails
    (no VNNI), int8 layers fall back to PyTorch's packed kernel."""
    layer = QuantizedLinear(128, 64, "int8", False, torch.float32, torch.device("cpu"))
    assert layer.kernel == ("onednn" if onednn_int8() else "packed")
    if not onednn_int8():
        pytest.skip("no exact oneDNN int8 product on this CPU")
    from vl3cli.quantize import _qlinear

    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (80, 512), dtype=torch.int8, generator=gen)
    x = torch.randint(0, 256, (7, 512), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        y = _qlinear(x, torch.ops.onednn.qlinear_prepack(w, None), torch.full((80,), 0.5), torch.zeros(80, dtype=torch.long))
    assert torch.equal(y.double(), 0.5 * ((x.double() - 128) @ w.double().T))


@pytest.mark.parametrize("mode,kernel", [("int8", "packed"), ("int8", "onednn"), ("int4", "packed")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 1])  # prefill, and a decode step (one row: its digits a strided view)
def test_cpu_kernels_equal_the_generic_path(mode, kernel, dtype, rows):
    """Same stored values, two kernels: within float rounding of each other (relative to |y|)."""
    if kernel == "onednn" and not onednn_int8():
        pytest.skip("no exact oneDNN int8 product on this CPU")
    w, x = weights(), torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0, 5] = x[1, 5] = 300  # an outlier: the oneDNN kernel's activation rows must keep the small elements too
    x = x[:rows]
    given = x.clone()
    layers = {}
    for kernel in ("generic", kernel):
        layer = QuantizedLinear(128, 400, mode, True, dtype, torch.device("cpu"), kernel=kernel)
        layer.fill_rows(0, w[:150])  # filled in two blocks, as the loader does
        layer.fill_rows(150, w[150:])
        layer.bias.data.copy_(torch.linspace(-1, 1, 400))
        layer.finish()
        with torch.inference_mode():
            layers[kernel] = layer(x).float()
    assert torch.equal(x, given)  # a layer never writes to its input
    layers["packed"] = layers.pop(kernel)
    scale = layers["generic"].abs().max(dim=1, keepdim=True).values  # per row
    # fp32: the two products sum in another order (1e-5); bf16: the generic path rounds the
    # dequantized weight to bf16 first, the packed kernel does not (measured < 1%).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    bound = tol * scale
    if kernel == "onednn":  # plus each activation's rounding to 16 bits: 3/4 s per element, times sum |w|
        _, top = activation_digits(x.float())
        s = top / DIGITS_STEPS
        bound = bound + 0.75 * s * dequantize(mode, *quantize_int8(w, dtype), torch.float32).abs().sum(1)
    assert ((layers["generic"] - layers["packed"]).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_one_row_equals_the_rows_path(dtype):
    """A decode step's row goes through a shorter path (its max|x| a host scalar, the kernel's
    activation scale); it must give what the several-row path gives for that row: the same digits
    up to one step where the two float orders round a tie apart, so within one step times sum|w|."""
    if not onednn_int8():
        pytest.skip("no exact oneDNN int8 product on this CPU")
    w = weights(n=272, k=96, seed=3)
    layer = QuantizedLinear(96, 272, "int8", True, dtype, torch.device("cpu"))
    layer.fill_rows(0, w)
    layer.finish()
    layer.bias.data.copy_(torch.linspace(-2, 2, 272))  # set after finish, as the loader assigns it
    sum_w = dequantize("int8", *quantize_int8(w, dtype), torch.float32).abs().sum(1)
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randn(1, 96, generator=gen), torch.zeros(1, 96), torch.full((1, 96), -0.25)]
    rows[0][0, 7] = 900.0  # an outlier sets the step
    with torch.inference_mode():
        for x in rows:
            x = x.to(dtype)
            one = layer(x).float()
            pair = layer(torch.cat([x, x])).float()  # two rows: the general path
            assert one.shape == (1, 272)
            assert torch.equal(pair[0], pair[1])
            step = x.float().abs().max().clamp(min=1e-30) / DIGITS_STEPS
            tol = step * sum_w + (1e-6 if dtype == torch.float32 else 1e-2) * pair[0].abs().max().clamp(min=1)
            assert ((one[0] - pair[0]).abs() <= tol).all()
        assert torch.equal(layer(torch.zeros(1, 96, dtype=dtype)).float()[0], layer.bias.float())


@pytest.fixture(scope="module")
def engines(hf_checkpoint):
    return {q: Engine.load(hf_checkpoint, device="cpu", dtype="float32", quantize=q) for q in (None, "int8", "int4")}


def test_only_the_language_model_and_head_are_quantized(engines):
    model = engines["int4"].model
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert "lm_head" in quantized and "language.layers.0.self_attn.qkv_proj" in quantized
    assert not any(name.startswith(("vision.", "projector.")) for name in quantized)
    # the tied embedding stays in the compute dtype; the head has its own quantized copy
    assert model.language.embed_tokens.weight.dtype == torch.float32


def test_quantized_logits_stay_close_to_float32(engines):
    """Stated tolerances, from measurement on the tiny checkpoint (logits std 2.5, random weights twice
    the usual scale, so harsher than a trained model): int8 max |diff| <= 1.0 and cosine >= 0.999
    (measured 0.49 and 0.9996); int4 (groups of 32 here) cosine >= 0.85 (measured 0.92). The figures
    at the 2B geometry are bench/bench_quality.py's."""
    ids, pixels, grid = image_case(seed=9)
    logits = {}
    with torch.inference_mode():
        for q, engine in engines.items():
            logits[q] = engine.forward_logits(ids, engine.encode_pixels(pixels, grid, 1))
    ref = logits[None]
    assert ref.std() > 1.0
    def cosine(a):
        return torch.nn.functional.cosine_similarity(a.flatten(), ref.flatten(), dim=0)

    assert (logits["int8"] - ref).abs().max() <= 1.0 and cosine(logits["int8"]) >= 0.999
    assert cosine(logits["int4"]) >= 0.85
    assert (logits["int4"] - ref).abs().max() > (logits["int8"] - ref).abs().max() > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_filling_in_cache_sized_pieces_stores_what_one_piece_does(mode, monkeypatch):
    """The loader's rows are quantized a few at a time; every row's values are its own, so the
    stored weights are identical to quantizing the block at once."""
    import vl3cli.quantize as quantize

    w = weights(n=300, k=128, seed=6).to(torch.bfloat16)
    layers = []
    for elements in (1 << 30, 7 * 128):  # one piece; pieces of 7 rows (300 = 42 * 7 + 6)
        monkeypatch.setattr(quantize, "QUANTIZE_ELEMENTS", elements)
        layer = QuantizedLinear(128, 300, mode, False, torch.bfloat16, torch.device("cpu"), kernel="generic")
        layer.fill_rows(0, w)
        layers.append(layer)
    assert torch.equal(layers[0].qweight, layers[1].qweight) and torch.equal(layers[0].scales, layers[1].scales)
    # and against the quantizer called directly on the whole block
    if mode == "int8":
        q, s = quantize_int8(w, torch.bfloat16)
        assert torch.equal(layers[1].qweight, q) and torch.equal(layers[1].scales, s)


@pytest.mark.parametrize("pieces", [
    [(0, 64), (64, 100), (100, 256), (256, 400)],  # whole blocks, a block's start, a block's end, up to N
    [(256, 400), (100, 256), (0, 64), (64, 100)],  # the same pieces out of order
    [(0, 400)],  # one piece
    [(i, min(400, i + 7)) for i in range(0, 400, 7)],  # none whole
])
def test_int4_kernel_layout_is_the_same_however_the_rows_arrive(pieces):
    """Rows that arrive as whole 64-row blocks go straight into the CPU int4 kernel's layout, the
    others through plain nibbles laid out at finish(): the stored bytes are what PyTorch's own
    conversion makes of the whole quantized matrix at once."""
    w = weights(n=400, k=128, seed=8).to(torch.bfloat16)
    layer = QuantizedLinear(128, 400, "int4", False, torch.bfloat16, torch.device("cpu"), kernel="packed")
    for start, stop in pieces:
        layer.fill_rows(start, w[start:stop])
    layer.finish()
    q, sz = quantize_int4(w, layer.group_size, torch.bfloat16)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(layer.qweight, expected) and torch.equal(layer.scales, sz)


@pytest.mark.parametrize(("hidden", "intermediate", "odd"), [(48, 128, "hidden_size 48"), (64, 80, "intermediate_size 80")])
def test_int4_on_dimensions_not_divisible_by_32_is_a_usage_error_before_loading(hf_checkpoint, tmp_path, hidden,
                                                                                intermediate, odd):  # fmt: skip
    import json
    import shutil

    from vl3cli.errors import UsageError

    folder = shutil.copytree(hf_checkpoint, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(hidden_size=hidden, intermediate_size=intermediate)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(UsageError, match=rf"int4 needs .* divisible by 32 \(this model has {odd}\); use --quantize int8"):
        Engine.load(folder, device="cpu", quantize="int4")
