"""Config parsing on the published checkpoints' real field sets, and its error cases."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from vl3cli.attention import choose_vision_backend
from vl3cli.config import ModelConfig
from vl3cli.engine import resolve_device, resolve_dtype
from vl3cli.errors import ConfigError, UsageError

DATA = Path(__file__).parent / "data"


def read(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_original_2b_config():
    c = ModelConfig.from_dict(read("VideoLLaMA3-2B.config.json"))
    assert c.format == "original"
    assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_attention_heads) == (1536, 28, 12)
    assert (c.text.num_key_value_heads, c.text.head_dim, c.text.intermediate_size) == (2, 128, 8960)
    assert c.text.rope_theta == 1e6 and c.text.vocab_size == 151936
    assert c.tie_word_embeddings is True
    assert (c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.num_attention_heads) == (1152, 27, 16)
    assert (c.vision.intermediate_size, c.vision.patch_size, c.vision.head_dim) == (4304, 14, 72)
    # defaults the original format leaves out
    assert c.vision.hidden_act == "gelu_pytorch_tanh" and c.vision.layer_norm_eps == 1e-6
    assert c.image_token_id == c.video_token_id == 151665
    assert c.eos_token_ids == (151645,)


def test_original_7b_config():
    c = ModelConfig.from_dict(read("VideoLLaMA3-7B.config.json"))
    assert (c.text.hidden_size, c.text.num_key_value_heads, c.text.vocab_size) == (3584, 4, 152064)
    assert c.tie_word_embeddings is False


def test_hf_config():
    c = ModelConfig.from_dict(read("VideoLLaMA3-2B-Image-HF.config.json"))
    assert c.format == "hf"
    assert (c.image_token_id, c.video_token_id) == (151655, 151656)
    assert c.text.hidden_size == 1536 and c.vision.hidden_size == 1152
    assert c.tie_word_embeddings is True


def test_hf_config_defaults_and_unknown_keys():
    data = {
        "model_type": "video_llama_3",
        "text_config": {"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_theta": 5.0},
                        "whatever": 1},
        "vision_config": {"brand_new_field": True},
        "image_token_id": 7,
    }
    c = ModelConfig.from_dict(data)
    assert c.text.num_key_value_heads == 4  # transformers: defaults to the attention heads
    assert c.text.rope_theta == 5.0
    assert c.vision.hidden_size == 768 and c.vision.patch_size == 16  # VideoLlama3VisionConfig defaults
    assert c.video_token_id == 151656 and c.image_token_id == 7


def test_generation_config_overrides_stop_ids():
    c = ModelConfig.from_dict(read("VideoLLaMA3-2B.config.json"), {"eos_token_id": [151645, 151643]})
    assert c.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2' is not a VideoLLaMA3 checkpoint"),
        ({}, "model_type None is not a VideoLLaMA3 checkpoint"),
        ({"model_type": "videollama3_qwen2", "image_token_index": 5}, "no 'vision_encoder_config'"),
        ({"model_type": "videollama3_qwen2", "vision_encoder_config": {}}, "no 'image_token_index'"),
        ({"model_type": "video_llama_3", "text_config": {"hidden_size": 10, "num_attention_heads": 3}},
         "not divisible"),
        ({"model_type": "video_llama_3", "text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4}}},
         "RoPE scaling"),
    ],
)
def test_bad_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="does not hold a JSON object"):
        ModelConfig.from_dir(tmp_path)


def test_device_and_dtype_resolution(monkeypatch):
    import vl3cli.engine as engine

    cpu, cuda, bf16, fp16, fp32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float16, torch.float32
    # An fp32 checkpoint stays fp32 everywhere; nothing is ever upcast beyond need.
    for device in (cpu, cuda):
        assert resolve_dtype("auto", device, fp32) == fp32
    monkeypatch.setattr(engine, "cpu_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu, bf16) == bf16
    monkeypatch.setattr(engine, "cpu_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu, bf16) == fp32  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(engine, "cuda_native_bf16", lambda device: True)
    assert resolve_dtype("auto", cuda, bf16) == bf16
    monkeypatch.setattr(engine, "cuda_native_bf16", lambda device: False)
    assert resolve_dtype("auto", cuda, bf16) == fp16  # T4 / V100
    assert resolve_dtype("auto", cuda, fp16) == fp16
    assert resolve_dtype("float16", cpu, fp32) == fp16 and resolve_dtype("float32", cuda, bf16) == fp32
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", cpu, None)
    assert resolve_device("cpu") == cpu
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sees no CUDA GPU"):
            resolve_device("cuda:0")


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86 feature checks")
def test_native_bf16_follows_pytorchs_cpu_feature_checks(monkeypatch):
    """On x86 the answer is PyTorch's own feature checks: AVX512-BF16 or AMX, else not native."""
    from vl3cli.engine import cpu_native_bf16

    for avx512_bf16, amx, native in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_native_bf16() is native


def test_stored_dtype_from_config_or_weights(checkpoints, tmp_path, monkeypatch):
    """auto's input: torch_dtype / dtype in config.json (top level or text_config), else the header's."""
    from vl3cli import engine as engine_module
    from vl3cli.engine import Engine

    hf = json.loads((checkpoints["hf-tied"] / "config.json").read_text())
    assert ModelConfig.from_dict(hf).torch_dtype is None
    assert ModelConfig.from_dict(dict(hf, torch_dtype="bfloat16")).torch_dtype == "bfloat16"
    assert ModelConfig.from_dict(dict(hf, text_config=dict(hf["text_config"], dtype="float16"))).torch_dtype == "float16"
    assert ModelConfig.from_dict(json.loads((DATA / "VideoLLaMA3-2B.config.json").read_text())).torch_dtype == "bfloat16"
    # The tiny checkpoints say nothing and are stored in fp32: auto stays fp32.
    assert Engine.load(checkpoints["hf-tied"], device="cpu").dtype == torch.float32
    # The same weights stored in bf16, config silent: the header says bf16, which auto runs where native.
    from safetensors.torch import load_file, save_file

    bf16 = tmp_path / "bf16"
    shutil.copytree(checkpoints["hf-tied"], bf16)
    for f in bf16.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)
    monkeypatch.setattr(engine_module, "cpu_native_bf16", lambda: True)
    assert Engine.load(bf16, device="cpu").dtype == torch.bfloat16
    monkeypatch.setattr(engine_module, "cpu_native_bf16", lambda: False)
    assert Engine.load(bf16, device="cpu").dtype == torch.float32


def test_vision_backend_choice():
    cpu = torch.device("cpu")
    assert choose_vision_backend(cpu, torch.float32) == "sdpa"
    assert choose_vision_backend(torch.device("cuda"), torch.float32) == "sdpa"  # varlen kernels need fp16/bf16
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_vision_backend(cpu, torch.float32, "varlen")


def test_fast_vision_kernels_need_ampere_and_a_varlen_that_takes_scale(monkeypatch):
    """T4 / V100 (compute capability 7.x) fall back to SDPA; a varlen_attn without scale= is not used."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")  # PyTorch >= 2.9

    import vl3cli.attention as attention

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert choose_vision_backend(cuda, torch.float16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(varlen, "varlen_attn", lambda q, k, v, cu_q, cu_k, max_q, max_k, scale=None: q)
    assert attention.has_torch_varlen() and choose_vision_backend(cuda, torch.bfloat16) == "varlen"
    monkeypatch.setattr(varlen, "varlen_attn", lambda q, k, v, cu_q, cu_k, max_q, max_k: q)  # an older signature
    assert not attention.has_torch_varlen()
    assert choose_vision_backend(cuda, torch.bfloat16) == "sdpa"


def _hf(text: dict | None = None, vision: dict | None = None, **top) -> dict:
    import tiny

    config = tiny.hf_config(tied=True)
    config["text_config"].update(text or {})
    config["vision_config"].update(vision or {})
    return dict(config, **top)


@pytest.mark.parametrize(("data", "field"), [
    (_hf({"num_attention_heads": 0}), "num_attention_heads"),
    (_hf({"num_key_value_heads": 0}), "num_key_value_heads"),
    (_hf(vision={"num_attention_heads": 0}), "vision num_attention_heads"),
    (_hf({"hidden_size": "64"}), "hidden_size"),
    (_hf({"num_hidden_layers": "2"}), "num_hidden_layers"),
    (_hf({"num_hidden_layers": -1}), "num_hidden_layers"),
    (_hf({"num_attention_heads": 4.0}), "num_attention_heads"),
    (_hf({"vocab_size": True}), "vocab_size"),
    (_hf({"rms_norm_eps": "x"}), "rms_norm_eps"),
    (_hf({"rope_theta": float("nan")}), "rope_theta"),
    (_hf({"rope_scaling": "linear"}), "RoPE scaling"),
    (_hf({"max_position_embeddings": 0}), "max_position_embeddings"),
    (_hf({"max_position_embeddings": -5}), "max_position_embeddings"),
    (_hf({"max_position_embeddings": 10**12}), "max_position_embeddings"),
    (_hf(vision={"patch_size": 0}), "vision patch_size"),
    (_hf(vision={"num_channels": 1}), "num_channels"),
    (dict(_hf(), text_config=[1, 2]), "text_config must be a JSON object"),
    (dict(_hf(), vision_config="x"), "vision_config must be a JSON object"),
    (_hf(image_token_id="abc"), "image_token_id 'abc'"),
    (_hf(image_token_id=99999), "image_token_id 99999 is not a token id of the vocabulary"),
    (_hf(video_token_id=-1), "video_token_id -1"),
])  # fmt: skip
def test_bad_field_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("eos", ["x", {"a": 1}, [1, "2"], [True], 2.0])
def test_bad_eos_token_ids_name_the_file(eos):
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id"):
        ModelConfig.from_dict(_hf(), {"eos_token_id": eos})


def test_max_position_bound_covers_published_contexts():
    from vl3cli.config import MAX_POSITIONS

    assert ModelConfig.from_dict(_hf({"max_position_embeddings": 1_010_000})).text.max_position_embeddings == 1_010_000
    assert MAX_POSITIONS >= 1_010_000  # Qwen2.5-1M


def test_bad_config_is_reported_before_any_weight_is_read(checkpoints, tmp_path):
    from vl3cli.engine import Engine

    folder = tmp_path / "c"
    shutil.copytree(checkpoints["hf-tied"], folder)
    (folder / "config.json").write_text(json.dumps(_hf({"num_attention_heads": 0})))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="num_attention_heads must be a positive integer, not 0"):
        Engine.load(folder, device="cpu")


def test_auto_dtype_follows_the_stored_tensors_over_config(checkpoints, tmp_path, monkeypatch):
    """A float32 checkpoint whose config.json says bfloat16 stays float32 (README: 'a checkpoint
    stored in float32 stays float32'); bf16 tensors with a config that says so still run in bf16."""
    from safetensors.torch import load_file, save_file

    from vl3cli import engine as engine_module
    from vl3cli.engine import Engine

    monkeypatch.setattr(engine_module, "cpu_native_bf16", lambda: True)
    f32 = tmp_path / "f32"
    shutil.copytree(checkpoints["hf-tied"], f32)
    (f32 / "config.json").write_text(json.dumps(dict(json.loads((f32 / "config.json").read_text()),
                                                     torch_dtype="bfloat16")))  # fmt: skip
    assert Engine.load(f32, device="cpu").dtype == torch.float32
    bf16 = tmp_path / "bf16"
    shutil.copytree(f32, bf16)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(bf16 / "model.safetensors").items()},
              bf16 / "model.safetensors")  # fmt: skip
    assert Engine.load(bf16, device="cpu").dtype == torch.bfloat16
