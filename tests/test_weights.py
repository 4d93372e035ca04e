"""Loading both checkpoint formats: renaming, tying, shards, and every way loading can fail."""

from __future__ import annotations

import json
import mmap
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vl3cli.engine import Engine
from vl3cli.errors import ConfigError, WeightsError
from vl3cli.weights import checkpoint_key, rename_key


def load(path) -> Engine:
    return Engine.load(path, device="cpu", dtype="float32")


def logits_of(engine: Engine) -> torch.Tensor:
    """Logits of a prompt with an image, using the checkpoint's own placeholder id."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(24, 588, generator=gen)
    ids = [1, 7, 9] + [engine.config.image_token_id] * 24 + [11, 2]
    with torch.inference_mode():
        return engine.forward_logits(ids, engine.encode_pixels(pixels, (1, 4, 6), 1))


@pytest.mark.parametrize(
    ("key", "fmt", "name"),
    [
        ("model.vision_encoder.encoder.layers.3.self_attn.q_proj.weight", "original",
         "vision.encoder.layers.3.self_attn.q_proj.weight"),
        ("model.vision_encoder.embeddings.patch_embedding.bias", "original", "vision.embeddings.patch_embedding.bias"),
        ("model.mm_projector.readout.2.weight", "original", "projector.readout.2.weight"),
        ("model.layers.0.mlp.gate_proj.weight", "original", "language.layers.0.mlp.gate_proj.weight"),
        ("model.embed_tokens.weight", "original", "language.embed_tokens.weight"),
        ("model.norm.weight", "original", "language.norm.weight"),
        ("lm_head.weight", "original", "lm_head.weight"),
        ("model.vision_model.post_layernorm.weight", "hf", "vision.post_layernorm.weight"),
        ("model.projector.readout.0.bias", "hf", "projector.readout.0.bias"),
        ("model.language_model.layers.1.self_attn.o_proj.weight", "hf", "language.layers.1.self_attn.o_proj.weight"),
        ("lm_head.weight", "hf", "lm_head.weight"),
        ("something.else", "hf", None),
    ],
)
def test_rename_key(key, fmt, name):
    assert rename_key(key, fmt) == name
    if name is not None:
        assert checkpoint_key(name, fmt) == key


def test_both_formats_tied_and_untied_give_identical_logits(checkpoints):
    tied = {fmt: logits_of(load(checkpoints[f"{fmt}-tied"])) for fmt in ("hf", "original")}
    untied = {fmt: logits_of(load(checkpoints[f"{fmt}-untied"])) for fmt in ("hf", "original")}
    assert torch.equal(tied["hf"], tied["original"])
    assert torch.equal(untied["hf"], untied["original"])
    # Untied weights have their own lm_head: a different model, so different logits.
    assert not torch.allclose(tied["hf"], untied["hf"])


def test_tied_checkpoint_shares_the_embedding(checkpoints):
    engine = load(checkpoints["original-tied"])
    assert engine.model.lm_head.weight.data_ptr() == engine.model.language.embed_tokens.weight.data_ptr()
    stored = load_file(str(checkpoints["original-tied"] / "model.safetensors"))
    assert "lm_head.weight" not in stored


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_sharded_and_single_file_load_alike(checkpoints, fmt):
    assert (checkpoints[f"{fmt}-sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(checkpoints[f"{fmt}-sharded"].glob("*.safetensors"))) == 3
    assert torch.equal(logits_of(load(checkpoints[f"{fmt}-sharded"])), logits_of(load(checkpoints[f"{fmt}-untied"])))


def test_loads_in_bfloat16_without_a_float32_copy(checkpoints):
    engine = Engine.load(checkpoints["hf-untied"], device="cpu", dtype="bfloat16")
    dtypes = {p.dtype for p in engine.model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    reference = logits_of(load(checkpoints["hf-untied"]))
    with torch.inference_mode():
        low = logits_of(engine)
    # bf16 keeps ~3 significant digits: close to fp32, not equal.
    assert not torch.equal(low, reference)
    assert torch.nn.functional.cosine_similarity(low.flatten(), reference.flatten(), dim=0) > 0.995


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_key_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["original-untied"], tmp_path / "c")
    rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing 1 key\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load(folder)


def test_unexpected_key_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    rewrite_weights(folder, lambda s: s.__setitem__("model.language_model.extra.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match=r"unexpected 1 key\(s\): model\.language_model\.extra\.weight"):
        load(folder)


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    key = "model.projector.readout.0.weight"
    rewrite_weights(folder, lambda s: s.__setitem__(key, torch.zeros(3, 5)))
    with pytest.raises(WeightsError, match=r"wrong shape: model\.projector\.readout\.0\.weight \(3, 5\)"):
        load(folder)


def test_config_that_does_not_match_weights(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"missing \d+ key\(s\): model\.language_model\.layers\.2\."):
        load(folder)


def test_unknown_model_type(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type 'llava' is not a VideoLLaMA3 checkpoint"):
        load(folder)


def test_pickle_only_checkpoint_is_refused_without_unpickling(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    (folder / "model.safetensors").unlink()
    # A pickle that would create a file if it were ever unpickled.
    marker = tmp_path / "unpickled"
    payload = (
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(WeightsError, match="only pickle weights.*pytorch_model.bin.*safetensors only"):
        load(folder)
    assert not marker.exists()


def test_no_weights_at_all(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors weights"):
        load(folder)


def test_missing_shard_is_named(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-sharded"], tmp_path / "c")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00003.safetensors"):
        load(folder)


def test_corrupt_safetensors(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="cannot read .*model.safetensors"):
        load(folder)


def test_remote_code_in_checkpoint_is_never_run(checkpoints):
    # The original-format fixture ships a modeling_*.py that exits the interpreter if imported.
    assert list(checkpoints["original-tied"].glob("*.py"))
    assert load(checkpoints["original-tied"]).config.format == "original"


def test_training_code_vision_prefix_loads_like_the_plain_one(checkpoints, tmp_path):
    """Fine-tuned checkpoints from the authors' training code name the tower vision_encoder.vision_encoder."""
    folder = copy_checkpoint(checkpoints["original-tied"], tmp_path / "c")

    def wrap(state):
        for key in [k for k in state if k.startswith("model.vision_encoder.")]:
            state["model.vision_encoder.vision_encoder." + key.removeprefix("model.vision_encoder.")] = state.pop(key)

    rewrite_weights(folder, wrap)
    assert any(k.startswith("model.vision_encoder.vision_encoder.") for k in load_file(str(folder / "model.safetensors")))
    assert rename_key("model.vision_encoder.vision_encoder.post_layernorm.bias", "original") == "vision.post_layernorm.bias"
    assert torch.equal(logits_of(load(folder)), logits_of(load(checkpoints["original-tied"])))


def mapped_files() -> dict[int, str]:
    """Start address -> file of every file-backed mapping of this process (Linux)."""
    out = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out[(start, end)] = fields[5]
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
def test_weights_stored_in_the_compute_dtype_are_mapped_not_copied(checkpoints, tmp_path):
    """bf16 into bf16 (fp32 into fp32 here): every unfused weight is a view of the mapped file;
    the fused q/k/v and gate/up matrices are read into place; a conversion copies."""
    engine = load(checkpoints["hf-untied"])
    maps = mapped_files()

    def in_file(t: torch.Tensor) -> bool:
        ptr = t.data_ptr()
        return any(a <= ptr < b and f.endswith("model.safetensors") for (a, b), f in maps.items())

    model = engine.model
    assert in_file(model.language.embed_tokens.weight) and in_file(model.vision.encoder.layers[0].mlp.fc1.weight)
    assert in_file(model.language.layers[0].self_attn.o_proj.weight)
    assert not in_file(model.language.layers[0].self_attn.qkv_proj.weight)
    converted = Engine.load(checkpoints["hf-untied"], device="cpu", dtype="bfloat16")
    maps = mapped_files()
    assert not in_file(converted.model.language.embed_tokens.weight)


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            ours = len(head) >= 6 and head[5] == str(path)
        elif ours and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_read_rows_copies_through_the_mapping_and_hands_its_pages_back(tmp_path):
    """Bytes copied out of the file (fused, converted, packed, quantized weights) do not stay in
    the process's memory as mapped pages, while a tensor used as a view keeps its pages."""
    from vl3cli.weights import RELEASE, SafetensorsFile

    if not RELEASE:
        pytest.skip("no madvise here")
    gen = torch.Generator().manual_seed(0)
    stored = {"a": torch.randn(1024, 2048, generator=gen), "b": torch.randn(512, 2048, generator=gen)}  # 8 and 4 MiB
    save_file(stored, str(tmp_path / "w.safetensors"))
    f = SafetensorsFile(tmp_path / "w.safetensors")
    try:
        view = f.view("b")
        assert float(view.sum()) == pytest.approx(float(stored["b"].sum()), rel=1e-6)  # its pages touched
        kept = mapped_kb(tmp_path / "w.safetensors")
        assert kept >= 4096
        rows = f.read_rows("a", 100, 900)
        assert torch.equal(rows, stored["a"][100:900])
        # 6.25 MiB copied; what stays mapped is the neighbourhood the kernel maps around a fault (its
        # fault-around window, or a page-cache folio) at the two ends, under half of it
        assert mapped_kb(tmp_path / "w.safetensors") < kept + 3200
        out = torch.empty(1024, 2048)
        f.read_rows("a", 0, 1024, out=out)
        assert torch.equal(out, stored["a"]) and torch.equal(view, stored["b"])
        f.release("a")
        assert mapped_kb(tmp_path / "w.safetensors") < kept + 4096  # of the 8 MiB copied
        assert torch.equal(view, stored["b"])  # the view still reads its own bytes
    finally:
        f.close()


def present_pages(t: torch.Tensor) -> list[bool]:
    """For each page wholly inside `t`'s bytes: is it mapped in this process? (/proc/self/pagemap,
    bit 63: page present; readable without privileges.)"""
    page = mmap.PAGESIZE
    first, end = -(-t.data_ptr() // page), (t.data_ptr() + t.numel() * t.element_size()) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        data = f.read(max(0, end - first) * 8)
    return [bool(int.from_bytes(data[i : i + 8], "little") >> 63) for i in range(0, len(data), 8)]


def present_share(module: torch.nn.Module) -> float:
    pages = [p for t in module.parameters() for p in present_pages(t)]
    return sum(pages) / len(pages)


needs_pagemap = pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs /proc/self/pagemap")


@needs_pagemap
def test_mapped_pages_hand_back_the_pages_of_one_module(tmp_path):
    """Spans of one module's tensors are merged and handed back together; other modules' pages and
    every tensor's values stay (a page handed back is read again from the file)."""
    from vl3cli.weights import RELEASE, MappedPages, SafetensorsFile

    if not RELEASE:
        pytest.skip("no madvise here")
    gen = torch.Generator().manual_seed(0)
    stored = {k: torch.randn(512, 1024, generator=gen) for k in ("a", "b", "c")}  # 2 MiB each, in this order
    save_file(stored, str(tmp_path / "w.safetensors"))
    f = SafetensorsFile(tmp_path / "w.safetensors")
    views = {k: f.view(k) for k in stored}
    pages = MappedPages()
    pages.add("m.x.weight", f, "a")
    pages.add("m.y.weight", f, "b")
    pages.add("n.weight", f, "c")
    info = f.tensors
    assert pages.under("m") == [(f, info["a"].offset, info["a"].nbytes + info["b"].nbytes)]
    assert pages.under("n") == [(f, info["c"].offset, info["c"].nbytes)] and pages.under("o") == []
    assert all(float(v.sum()) == pytest.approx(float(stored[k].sum()), rel=1e-5) for k, v in views.items())
    assert all(all(present_pages(v)) for v in views.values())
    pages.release("m")
    a, b, c = (present_pages(views[k]) for k in "abc")
    assert not any(a) and not any(b) and all(c)
    assert all(torch.equal(views[k], stored[k]) for k in stored)  # read again, the same bytes
    f.close()


@pytest.fixture(scope="module")
def wide_vision(tmp_path_factory):
    """A tiny checkpoint whose vision layers (3 MiB each) are much larger than what one page fault maps."""
    import tiny

    vision = dict(tiny.VISION, hidden_size=256, intermediate_size=1024)
    return tiny.make_checkpoint(tmp_path_factory.mktemp("wide-vision") / "hf", "hf", vision=vision)


@needs_pagemap
def test_vision_layers_hand_back_their_mapped_pages_after_running(wide_vision):
    """A vision layer whose weights are views of the file leaves them out of the process's memory
    once it has run; encodes give the same features as with the pages kept, again and again."""
    from vl3cli.weights import RELEASE

    if not RELEASE:
        pytest.skip("no madvise here")
    engine = load(wide_vision)  # stored in float32, run in float32: the tower's weights are views
    vision = engine.model.vision
    release, vision.after_layer = vision.after_layer, None
    assert release is not None
    pixels = torch.randn(24, 588, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        kept = engine.encode_pixels(pixels, (1, 4, 6), 1)
        held = [present_share(layer) for layer in vision.encoder.layers]
        vision.after_layer = release
        first = engine.encode_pixels(pixels, (1, 4, 6), 1)
        after = [present_share(layer) for layer in vision.encoder.layers]
        second = engine.encode_pixels(pixels, (1, 4, 6), 1)
    assert held == [1.0] * len(held)
    # what stays is what faults of neighbouring weights map around themselves, a small part of a layer
    assert max(after) < 0.25, after
    assert torch.equal(first, kept) and torch.equal(second, kept)


def test_vision_weights_that_were_copied_are_never_handed_back(wide_vision):
    """Converted weights (float32 file, bf16 run) are the only copy: no hand-back is set up, and
    repeated encodes keep giving the same features."""
    engine = Engine.load(wide_vision, device="cpu", dtype="bfloat16")
    assert engine.model.vision.after_layer is None
    pixels = torch.randn(24, 588, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        first = engine.encode_pixels(pixels, (1, 4, 6), 1)
        second = engine.encode_pixels(pixels, (1, 4, 6), 1)
    assert torch.equal(first, second) and first.abs().sum() > 0
