"""The CPU's bf16 products (products.py): oneDNN's packed weights, and float32 products of many
rows read from the mapped checkpoint, against plain float32 / float64 products and each other."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_weights import present_pages

from vl3cli import products
from vl3cli.engine import Engine
from vl3cli.errors import UsageError
from vl3cli.products import PackedLinear, WideLinear, packs, wide_product
from vl3cli.weights import RELEASE

CPU = torch.device("cpu")
PAGEMAP = Path("/proc/self/pagemap").exists()


def needs_native_bf16() -> None:
    if not packs(CPU, torch.bfloat16, None):
        pytest.skip("this CPU has no native bf16")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, hf_checkpoint):
    """The tiny checkpoint's weights stored in bf16, as the published ones are."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("bf16") / "hf"
    shutil.copytree(hf_checkpoint, folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) for k, v in state.items()},
        str(folder / "model.safetensors"),
    )
    return folder


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max())


def bf16_linear(k: int, n: int, gen: torch.Generator) -> torch.nn.Linear:
    """A bf16 linear layer with random weights and bias; skips where the CPU has no native bf16
    (the packed layer's condition)."""
    needs_native_bf16()
    lin = torch.nn.Linear(k, n, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin.requires_grad_(False)  # an engine's layers hold no gradients


def test_packed_bf16_linear_equals_the_plain_product():
    """oneDNN's prepacked bf16 linear (the CPU default for bf16) computes what F.linear does."""
    gen = torch.Generator().manual_seed(4)
    lin = bf16_linear(96, 160, gen)
    packed = PackedLinear(lin)
    for shape in ((1, 1, 96), (2, 7, 96)):
        x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        ref = x.float() @ lin.weight.float().T + lin.bias.float()
        got, plain = (
            packed(x).float(),
            torch.nn.functional.linear(x, lin.weight, lin.bias).float(),
        )
        assert got.shape == plain.shape
        # bf16 products, fp32 sums, one bf16 rounding of the result: within 2 bf16 steps of the exact value
        assert ((got - ref).abs() / ref.abs().clamp(min=1)).max() < 2**-7
        assert ((got - plain).abs() / plain.abs().clamp(min=1)).max() < 2**-7


def test_bf16_engine_packs_its_language_model_and_stays_close(hf_checkpoint, monkeypatch):
    from vl3cli import engine as engine_module

    needs_native_bf16()
    packed = Engine.load(hf_checkpoint, device="cpu", dtype="bfloat16")
    assert isinstance(packed.model.lm_head, PackedLinear)
    assert all(isinstance(layer.mlp.gate_up_proj, PackedLinear) for layer in packed.model.language.layers)
    assert not any(isinstance(m, PackedLinear) for m in packed.model.vision.modules())
    monkeypatch.setattr(engine_module, "packs", lambda *a: False)
    plain = Engine.load(hf_checkpoint, device="cpu", dtype="bfloat16")
    ids = list(range(10, 60))
    with torch.inference_mode():
        a, b = packed.forward_logits(ids), plain.forward_logits(ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.999 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_packed_linear_in_blocks_of_rows_computes_the_whole_product(monkeypatch):
    """A weight packed a block of rows at a time (the mapped head) gives the plain product, bias
    included, and hands back each block's rows once packed, in order, covering them all."""
    gen = torch.Generator().manual_seed(5)
    lin = bf16_linear(96, 250, gen)
    monkeypatch.setattr(products, "PACK_BLOCK_BYTES", 64 * 96 * 2)  # blocks of 64 rows: 64, 64, 64, 58
    released = []
    blocked = PackedLinear(lin, lambda a, b: released.append((a, b)))
    assert released == [(0, 64), (64, 128), (128, 192), (192, 250)]
    whole = PackedLinear(lin)  # no release: one block
    assert len(whole.spans) == 1
    for shape in ((1, 96), (3, 5, 96)):
        x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        ref = x.float() @ lin.weight.float().T + lin.bias.float()
        got = blocked(x).float()
        assert got.shape == ref.shape
        assert ((got - ref).abs() / ref.abs().clamp(min=1)).max() < 2**-7
        assert ((got - whole(x).float()).abs() / ref.abs().clamp(min=1)).max() < 2**-7


def test_bf16_engine_packs_its_mapped_head_in_blocks(bf16_checkpoint, monkeypatch):
    """A checkpoint stored in bf16 and run in bf16: the loader packs the tied head from the mapped
    embedding a block of rows at a time; the logits are those of the engine that packs it whole."""
    needs_native_bf16()
    folder = bf16_checkpoint
    whole = Engine.load(folder, device="cpu", dtype="bfloat16")
    monkeypatch.setattr(products, "PACK_BLOCK_BYTES", 128 * whole.config.text.hidden_size * 2)
    blocked = Engine.load(folder, device="cpu", dtype="bfloat16")
    vocab = whole.config.text.vocab_size
    assert len(whole.model.lm_head.spans) == 1 and blocked.model.lm_head.spans[:2] == [
        (0, 128),
        (128, 256),
    ]
    assert blocked.model.lm_head.spans[-1][1] == vocab
    ids = list(range(10, 60))
    with torch.inference_mode():
        a, b = whole.forward_logits(ids), blocked.forward_logits(ids)
    assert a.shape == (len(ids), vocab)
    assert ((a - b).abs() / a.abs().clamp(min=1)).max() < 2**-7


def mapped(tmp_path, tensors: dict[str, torch.Tensor]):
    """`tensors` written to a safetensors file and opened by vl3's reader: (file, {key: mapped view})."""
    from safetensors.torch import save_file

    from vl3cli.weights import SafetensorsFile

    save_file(tensors, str(tmp_path / "w.safetensors"))
    f = SafetensorsFile(tmp_path / "w.safetensors")
    return f, {k: f.view(k) for k in tensors}


def test_wide_product_is_the_float32_product_of_every_source_row(monkeypatch):
    """Two sources side by side (a fused q/k), each in blocks of rows: every output element is the
    exact product rounded once (within one bf16 step of the float64 value, and of PyTorch's own
    float32 product); each source's blocks are handed back in order, then the whole source."""
    monkeypatch.setattr(products, "WIDE_BLOCK", 64)
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(rows, 80, generator=gen).to(torch.bfloat16) for rows in (150, 40))
    bias = torch.randn(190, generator=gen).to(torch.bfloat16)
    x = torch.randn(130, 80, generator=gen).to(torch.bfloat16)
    released = {"q": [], "k": []}
    sources = [
        (0, q, lambda a, b: released["q"].append((a, b))),
        (150, k, lambda a, b: released["k"].append((a, b))),
    ]
    got = wide_product(x, sources, 190, bias)
    weight = torch.cat([q, k])
    exact = x.double() @ weight.double().T + bias.double()
    assert got.dtype == torch.bfloat16 and got.shape == (130, 190)
    assert relative(got, exact) < 2**-7
    plain = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    assert relative(got, plain) < 2**-7 and (got == plain).float().mean() > 0.99
    assert released == {"q": [(0, 64), (64, 128), (128, 150), (0, 150)], "k": [(0, 40)]}


def test_packed_linear_multiplies_many_rows_from_the_mapped_file(tmp_path):
    """With its mapped rows given, a packed layer's product of WIDE_ROWS rows or more reads them
    (their pages leave the process once used) and one of fewer rows runs on the packed weight;
    both give the exact product within one bf16 step."""
    needs_native_bf16()
    gen = torch.Generator().manual_seed(8)
    lin = bf16_linear(256, 1024, gen)  # 512 KiB of weight: 128 pages
    f, views = mapped(tmp_path, {"w": lin.weight.detach().clone()})
    calls = []

    def release(a, b):
        calls.append((a, b))
        f.release_rows("w", a, b)

    layer = PackedLinear(lin, plain=[(0, views["w"], release)])
    for rows, wide in (
        (4, False),
        (products.WIDE_ROWS - 1, False),
        (products.WIDE_ROWS, True),
        (200, True),
    ):
        calls.clear()
        x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16)
        views["w"].sum()  # every page present before the product
        before = present_pages(views["w"]) if PAGEMAP else [True]
        got = layer(x)
        exact = x.double() @ lin.weight.double().T + lin.bias.double()
        assert relative(got, exact) < 2**-7, rows
        assert bool(calls) is wide, rows
        if wide and PAGEMAP and RELEASE:
            assert all(before) and not any(present_pages(views["w"])), rows
    f.close()


def test_wide_linear_keeps_small_products_on_the_plain_kernel():
    """The vision tower's layers: fewer than WIDE_ROWS rows go through F.linear unchanged (bit for
    bit), more through the float32 product; the parameters are the same tensors, not copies."""
    gen = torch.Generator().manual_seed(9)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    wide = WideLinear.of(lin)
    assert wide.weight is lin.weight and wide.bias is lin.bias
    small = torch.randn(2, products.WIDE_ROWS // 2 - 1, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(wide(small), torch.nn.functional.linear(small, lin.weight, lin.bias))
    large = torch.randn(2, products.WIDE_ROWS, 64, generator=gen).to(torch.bfloat16)
    exact = large.double() @ lin.weight.double().T + lin.bias.double()
    got = wide(large)
    assert got.shape == (2, products.WIDE_ROWS, 48) and relative(got, exact) < 2**-7
    # the same layer in float32 (a float32 run) is F.linear whatever the rows
    lin32 = torch.nn.Linear(64, 48).requires_grad_(False)
    assert torch.equal(
        WideLinear.of(lin32)(large.float()),
        torch.nn.functional.linear(large.float(), lin32.weight, lin32.bias),
    )


def test_float32_products_follow_the_setting_and_memory(monkeypatch):
    monkeypatch.setattr(products, "measured_faster", lambda: True)
    monkeypatch.setattr(products, "packs", lambda *a: True)
    monkeypatch.delenv(products.ENV, raising=False)
    gib = 1 << 30
    monkeypatch.setattr(products, "physical_memory", lambda: 16 * gib)
    assert products.float32_faster(CPU, torch.bfloat16)
    assert not products.float32_faster(CPU, torch.float32) and not products.float32_faster(
        torch.device("cuda"), torch.bfloat16
    )
    # memory for the packed weights, the file's pages and 4 GiB: 6 GiB of files fit 16 GiB, 7 do not
    assert products.wide_language(CPU, torch.bfloat16, None, 6 * gib)
    assert not products.wide_language(CPU, torch.bfloat16, None, 6 * gib + 1)
    monkeypatch.setenv(products.ENV, "on")
    assert products.wide_language(CPU, torch.bfloat16, None, 100 * gib)
    monkeypatch.setenv(products.ENV, "off")
    assert not products.float32_faster(CPU, torch.bfloat16)
    assert not products.wide_language(CPU, torch.bfloat16, None, 1)
    monkeypatch.setattr(products, "measured_faster", lambda: False)
    for value, faster in (
        ("auto", False),
        ("ON", True),
        ("1", True),
        ("no", False),
        ("", False),
    ):
        monkeypatch.setenv(products.ENV, value)
        assert products.float32_faster(CPU, torch.bfloat16) is faster, value
    monkeypatch.setenv(products.ENV, "fast")
    with pytest.raises(UsageError, match="VL3_FLOAT32_PRODUCTS='fast' is not auto, on or off"):
        products.float32_faster(CPU, torch.bfloat16)


def test_engine_with_float32_products_stays_with_the_packed_engine(bf16_checkpoint, monkeypatch):
    """A bf16 checkpoint run in bf16 with float32 products of many rows: the language model's
    layers hold their mapped rows, the tower's layers are WideLinears, and a 120-token forward and
    an encode agree with the engine without them to bf16's precision."""
    needs_native_bf16()
    monkeypatch.setenv(products.ENV, "on")
    wide = Engine.load(bf16_checkpoint, device="cpu", dtype="auto")
    monkeypatch.setenv(products.ENV, "off")
    packed = Engine.load(bf16_checkpoint, device="cpu", dtype="auto")
    assert wide.dtype == packed.dtype == torch.bfloat16
    assert wide.float32_products == "vision and language" and packed.float32_products == ""
    layers = wide.model.language.layers
    assert all(
        layer.self_attn.qkv_proj.plain is not None and len(layer.self_attn.qkv_proj.plain) == 3 for layer in layers
    )
    assert all(layer.mlp.down_proj.plain is not None for layer in layers)
    assert all(m.plain is None for m in packed.model.modules() if isinstance(m, PackedLinear))
    assert any(isinstance(m, WideLinear) for m in wide.model.vision.modules())
    assert isinstance(wide.model.projector.readout[0], WideLinear) and isinstance(
        wide.model.projector.readout[2], WideLinear
    )
    assert not any(isinstance(m, WideLinear) for m in packed.model.modules())
    ids = list(range(10, 130))
    pixels = torch.randn(144, 588, generator=torch.Generator().manual_seed(0))
    rows = []
    product = products.wide_product
    monkeypatch.setattr(products, "wide_product", lambda x2, *rest: rows.append(x2.shape[0]) or product(x2, *rest))
    with torch.inference_mode():
        a, b = wide.forward_logits(ids), packed.forward_logits(ids)
        fa, fb = (
            wide.encode_pixels(pixels, (1, 12, 12), 1),
            packed.encode_pixels(pixels, (1, 12, 12), 1),
        )
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    assert cos.min() > 0.999 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(fa.float(), fb.float(), dim=-1).min() > 0.999
    # the 120 tokens through every language layer's 4 products and the head; the 144 patches through
    # the tower's 6 per layer (q, k, v, out, fc1, fc2) and the projector's 2
    assert rows == [120] * (4 * len(layers) + 1) + [144] * (6 * len(wide.model.vision.encoder.layers) + 2)


def test_quantized_engine_widens_only_its_vision_tower(bf16_checkpoint, monkeypatch):
    needs_native_bf16()
    monkeypatch.setenv(products.ENV, "on")
    engine = Engine.load(bf16_checkpoint, device="cpu", dtype="auto", quantize="int8")
    assert engine.float32_products == "vision"
    assert any(isinstance(m, WideLinear) for m in engine.model.vision.modules())
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())


def test_converted_language_weights_keep_the_packed_kernel(hf_checkpoint, monkeypatch):
    """Weights stored in float32 and run in bf16 are converted copies, with no rows in the file to
    read again: the language model keeps its packed products, and the engine says so."""
    needs_native_bf16()
    monkeypatch.setenv(products.ENV, "on")
    engine = Engine.load(hf_checkpoint, device="cpu", dtype="bfloat16")
    assert engine.float32_products == "vision"
    assert all(m.plain is None for m in engine.model.modules() if isinstance(m, PackedLinear))
