"""Loading both checkpoint formats: renaming, tying, shards, and every way loading can fail."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import signal
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


# -- damaged and inconsistent checkpoints: one WeightsError, never a guess -----------------------


def read_raw(file: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (JSON) and data section, parsed by hand (to damage them)."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(file: Path, header: dict, data: bytes) -> None:
    head = json.dumps(header).encode()
    file.write_bytes(len(head).to_bytes(8, "little") + head + data)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_integer_and_bool_weights_are_refused(checkpoints, tmp_path, dtype, quantize):
    """A valid safetensors file (written by the library) whose weight holds integers: int8 used to
    quantize the raw integers and compute with them; the other paths raised a traceback."""
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    key = "model.language_model.layers.0.mlp.down_proj.weight"
    rewrite_weights(folder, lambda s: s.__setitem__(key, (s[key] * 100).to(dtype)))
    name = {torch.int16: "I16", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
            torch.int64: "I64"}[dtype]  # fmt: skip
    with pytest.raises(WeightsError, match=rf"model\.safetensors: tensor {key} has dtype {name}; vl3 expects floating"):
        Engine.load(folder, device="cpu", dtype="float32", quantize=quantize)


def test_a_tensor_in_two_files_is_refused(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    key = "model.language_model.norm.weight"
    save_file({key: torch.zeros(64)}, str(folder / "zz-extra.safetensors"))
    with pytest.raises(WeightsError, match=rf"tensor {key} is stored twice, in .*model\.safetensors and in "
                                           r".*zz-extra\.safetensors"):  # fmt: skip
        load(folder)


def test_a_vision_tensor_under_both_prefixes_is_refused(checkpoints, tmp_path):
    """model.vision_encoder.X and its training-code spelling model.vision_encoder.vision_encoder.X."""
    folder = copy_checkpoint(checkpoints["original-tied"], tmp_path / "c")
    key = "model.vision_encoder.post_layernorm.bias"
    rewrite_weights(folder, lambda s: s.__setitem__(key.replace("encoder.", "encoder.vision_encoder.", 1), s[key] + 1))
    with pytest.raises(WeightsError, match=rf"stored twice, as {key} in .* and as model\.vision_encoder\.vision_encoder"):
        load(folder)


@pytest.fixture(scope="module")
def sharded(checkpoints) -> dict:
    folder = checkpoints["hf-sharded"]
    return {"folder": folder, "index": json.loads((folder / "model.safetensors.index.json").read_text())}


def test_a_shard_holding_a_tensor_the_index_places_elsewhere_is_refused(sharded, tmp_path):
    folder = copy_checkpoint(sharded["folder"], tmp_path / "c")
    weight_map = sharded["index"]["weight_map"]
    key = next(k for k, f in weight_map.items() if f == "model-00002-of-00003.safetensors")
    shard = folder / "model-00001-of-00003.safetensors"
    extra = load_file(str(shard))
    extra[key] = load_file(str(folder / "model-00002-of-00003.safetensors"))[key] * 0
    save_file(extra, str(shard))
    with pytest.raises(WeightsError, match=rf"00001-of-00003.safetensors: holds tensor {key}, which .* places in "
                                           r"model-00002-of-00003"):  # fmt: skip
        load(folder)


def test_an_index_placing_a_tensor_in_a_shard_that_lacks_it_is_refused(sharded, tmp_path):
    folder = copy_checkpoint(sharded["folder"], tmp_path / "c")
    index = sharded["index"]
    key = next(k for k, f in index["weight_map"].items() if f == "model-00002-of-00003.safetensors")
    weight_map = dict(index["weight_map"], **{key: "model-00003-of-00003.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(dict(index, weight_map=weight_map)))
    with pytest.raises(WeightsError, match=rf"00002-of-00003.safetensors: holds tensor {key}"):
        load(folder)


@pytest.mark.parametrize("index", [
    {"weight_map": ["model-00001-of-00003.safetensors"]}, {"weight_map": None}, {"metadata": {}},
    {"weight_map": {"model.norm.weight": 1}}, ["weight_map"],
])  # fmt: skip
def test_malformed_index_is_one_error(sharded, tmp_path, index):
    folder = copy_checkpoint(sharded["folder"], tmp_path / "c")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"model\.safetensors\.index\.json"):
        load(folder)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_naming_a_shard_outside_the_folder_is_refused(sharded, tmp_path, where, monkeypatch):
    root = tmp_path / "root"
    folder = copy_checkpoint(sharded["folder"], root / "c")
    # A perfectly good shard, but outside the checkpoint: never read.
    (folder / "model-00002-of-00003.safetensors").rename(root / "outside.safetensors")
    name = "../outside.safetensors" if where == "parent" else str(root / "outside.safetensors")
    index = sharded["index"]
    weight_map = {k: name if f == "model-00002-of-00003.safetensors" else f for k, f in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(dict(index, weight_map=weight_map)))
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(WeightsError, match=r"is not a file inside the checkpoint folder"):
        load(folder)
    assert not any("outside" in p for p in opened)


def test_hub_cache_snapshot_symlinks_into_blobs_load(sharded, tmp_path):
    """huggingface_hub's cache: snapshots/<commit>/<name> -> ../../blobs/<sha256>, outside the folder by target."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in sorted(sharded["folder"].iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snapshot / f.name)
    assert torch.equal(logits_of(load(snapshot)), logits_of(load(sharded["folder"])))


def _overlap(h: dict, data: bytes) -> bytes:
    """Two tensors of one size share bytes: the second reads the first's (a gap is left behind)."""
    a, b = sorted(k for k in h if k.startswith("model.language_model.") and k.endswith("k_proj.weight"))
    h[b]["data_offsets"] = h[a]["data_offsets"]
    return data


def _shift(h: dict, data: bytes) -> bytes:
    """Every tensor after the first moved 4 bytes back: each overlaps its neighbour, no gap at the end."""
    first = min(h, key=lambda k: h[k].get("data_offsets", [0])[0] if k != "__metadata__" else -1)
    for k, v in h.items():
        if k not in ("__metadata__", first) and v["data_offsets"][0] > 0:
            v["data_offsets"] = [x - 4 for x in v["data_offsets"]]
    return data[:-4]


@pytest.mark.parametrize("damage", [
    _overlap,
    _shift,
    lambda h, data: data + b"\0" * 16,  # bytes after the last tensor
    lambda h, data: h.__setitem__("model.language_model.norm.weight",
                                  dict(h["model.language_model.norm.weight"], shape="64")) or data,
    lambda h, data: h.__setitem__("model.language_model.norm.weight",
                                  dict(h["model.language_model.norm.weight"], shape=[64.0])) or data,
    lambda h, data: h.__setitem__("model.language_model.norm.weight",
                                  dict(h["model.language_model.norm.weight"], data_offsets="ab")) or data,
], ids=["overlap", "shift", "trailing", "shape-str", "shape-float", "offsets-str"])  # fmt: skip
def test_files_the_safetensors_library_refuses_are_refused(checkpoints, tmp_path, damage):
    from safetensors import safe_open

    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    file = folder / "model.safetensors"
    header, data = read_raw(file)
    write_raw(file, header, damage(header, data))
    with pytest.raises(Exception):  # noqa: B017 -- the reference: the library refuses the file
        safe_open(str(file), "pt").keys()
    with pytest.raises(WeightsError, match=r"cannot read .*model\.safetensors: "):
        load(folder)


def test_tensors_listed_out_of_offset_order_are_fine_as_for_the_library(checkpoints, tmp_path):
    from safetensors import safe_open

    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    file = folder / "model.safetensors"
    header, data = read_raw(file)
    write_raw(file, dict(reversed(header.items())), data)
    with safe_open(str(file), "pt") as f:
        assert len(list(f.keys())) == len(header) - 1
    assert torch.equal(logits_of(load(folder)), logits_of(load(checkpoints["hf-untied"])))


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_shard_that_is_not_a_regular_file_is_refused_without_hanging(checkpoints, tmp_path, kind):
    folder = copy_checkpoint(checkpoints["hf-untied"], tmp_path / "c")
    file = folder / "model.safetensors"
    file.unlink()
    os.mkfifo(file) if kind == "fifo" else file.mkdir()

    def hung(*_):
        raise TimeoutError("opening the shard hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(WeightsError, match=r"model\.safetensors: not a regular file"):
            load(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
