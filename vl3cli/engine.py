"""The engine: one loaded model and the operations generation is built from.

    engine = Engine.load(path, device="auto", dtype="auto", quantize=None)
    features = engine.encode_visuals([visual_a, visual_b])   # one vision call; pruned tokens removed
    cache = engine.new_cache(batch=2, max_len=4096)
    logits = engine.prefill(cache, 0, ids_a, features[0])     # (V,) after the prompt, in row 0
    logits = engine.decode(cache, next_tokens)               # (2, V): one step for every row
    prefix = engine.prefill_prefix(ids, features)            # KV of a shared prefix, computed once

Weights are loaded once, straight into the device and dtype (or quantized, see quantize.py).
`dtype="auto"` runs the checkpoint's own dtype where the hardware computes in it natively (see
`resolve_dtype`). Where the vision tower's weights are views of the mapped checkpoint (CPU, the
file's own dtype), each encode hands a layer's pages back as soon as that layer is done
(`release_vision_layers`): the tower is read from the page cache layer by layer, and its 0.8 GB
(2B and 7B) is neither in a run's peak memory nor held between encodes. A decode step (`step`)
is pure tensor code over the cache's static buffers; on CUDA it is captured once per cache shape
in a CUDA graph (`CudaGraphs`) and replayed. Everything runs under the caller's
`torch.inference_mode()`; the engine keeps no per-request state.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import BACKENDS, choose_vision_backend
from .config import ModelConfig
from .errors import UsageError, Vl3Error
from .model import KVCache, VideoLlama3
from .products import float32_faster, packs, wide_language, widen
from .quantize import MODES, check_int4
from .tokenizer import Tokenizer
from .weights import MappedPages, load_into, open_files, stored_dtype

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MPS_PREFILL_CHUNK = 2048  # long prompts on MPS are prefilled in chunks of this many tokens


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return _check_mps(torch.device("mps"))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s) seen)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' was asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return _check_mps(device) if device.type == "mps" else device


def _check_mps(device: torch.device) -> torch.device:
    # SDPA with grouped-query attention (enable_gqa) crashes on MPS up to PyTorch 2.6.
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7):
        raise UsageError(f"MPS needs PyTorch >= 2.7 (this is {torch.__version__}); upgrade it or use --device cpu")
    return device


def cpu_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    cpu = getattr(torch, "cpu", None)
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if getattr(cpu, check, lambda: False)():
            return True
    return platform.machine().lower() in ("arm64", "aarch64") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cuda_native_bf16(device: torch.device) -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older PyTorch: no emulation argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def mps_bf16() -> bool:
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def resolve_dtype(name: str, device: torch.device, stored: torch.dtype | None) -> torch.dtype:
    """The compute dtype for `--dtype name` on `device`, for weights stored in `stored`.

    auto: the checkpoint's dtype where the hardware computes in it natively, never above it
    (an fp32 checkpoint stays fp32). bf16 weights: bf16 on CUDA GPUs with bf16 (fp16 on older ones),
    on CPUs with AVX512-BF16 / AMX / Arm BF16 (else fp32) and on MPS where it has bf16 (else fp16).
    """
    if name != "auto":
        if name not in DTYPES:
            raise UsageError(f"unknown dtype {name!r} (use auto, bfloat16, float16 or float32)")
        return DTYPES[name]
    stored = stored or torch.float32
    if stored not in (torch.bfloat16, torch.float16):
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if stored == torch.bfloat16 and cuda_native_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.bfloat16 if stored == torch.bfloat16 and mps_bf16() else torch.float16
    if stored == torch.bfloat16:
        return torch.bfloat16 if cpu_native_bf16() else torch.float32
    return torch.float16 if getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)() else torch.float32


def release_vision_layers(model: VideoLlama3, pages: MappedPages) -> None:
    """Have each vision layer hand back the pages of its mapped weights once it has run.

    Measured on a 2-core Xeon, 2B geometry in bf16: a run's peak memory 0.76 GB lower (int4:
    1959 -> 1201 MB), an encode of a 224x224 image 1% slower (1.275 against 1.262 s, medians: the
    pages are mapped again from the page cache, 20-30 ms for the whole tower).
    """
    names = [f"vision.encoder.layers.{i}" for i in range(len(model.vision.encoder.layers))]
    if any(pages.under(name) for name in names):
        model.vision.after_layer = lambda i: pages.release(names[i])


@dataclass
class Prefix:
    """The KV cache of a prompt's first tokens, computed once and copied into any row that starts with them."""

    ids: list[int]
    k: torch.Tensor  # (layers, kv_heads, len(ids), d)
    v: torch.Tensor


@dataclass
class Engine:
    path: Path
    config: ModelConfig
    processor: object  # vl3cli.preprocess.ProcessorConfig
    tokenizer: Tokenizer
    model: VideoLlama3
    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None
    vision_backend: str = "sdpa"
    vision_dtype: torch.dtype | None = None  # fp32 when the model runs in fp16 (no overflow in the tower)
    prefill_chunk: int | None = None  # prompts longer than this are prefilled in chunks (MPS)
    graphs: CudaGraphs | None = field(default=None, repr=False)
    float32_products: str = ""  # where bf16 products of many rows run in float32 (products.py)

    @classmethod
    def load(
        cls, path: str | Path, device: str = "auto", dtype: str = "auto", quantize: str | None = None,
        attention: str = "auto",
    ) -> Engine:
        from .preprocess import ProcessorConfig

        path = Path(path)
        if not path.is_dir():
            raise Vl3Error(f"model folder {path} does not exist")
        if quantize not in (None, *MODES):
            raise UsageError(f"unknown quantization {quantize!r} (use {', '.join(MODES)})")
        config = ModelConfig.from_dir(path)
        if quantize == "int4":
            check_int4(config.text)
        tokenizer = Tokenizer.from_dir(path)
        processor = ProcessorConfig.from_dir(path, patch_size=config.vision.patch_size)
        dev = resolve_device(device)
        if attention not in BACKENDS:
            raise UsageError(f"unknown attention backend {attention!r} (use {', '.join(BACKENDS)})")
        dt = resolve_dtype(dtype, dev, None) if dtype != "auto" else None
        files = open_files(path)  # headers only; load_into reads the weights through them, once
        try:
            if dt is None:  # what the tensors are stored in; config.json's torch_dtype only when they say nothing
                dt = resolve_dtype(dtype, dev, stored_dtype(files) or DTYPES.get(config.torch_dtype or ""))
            vision_dt = torch.float32 if dt == torch.float16 else dt
            try:
                backend = choose_vision_backend(dev, vision_dt, attention)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            with torch.device("meta"):
                model = VideoLlama3(config)
            file_bytes = sum(info.nbytes for f in files for info in f.tensors.values())
            wide = wide_language(dev, dt, quantize, file_bytes)
            pages = load_into(model, path, config.format, dev, dt, tie_lm_head=config.tie_word_embeddings,
                              quantize=quantize, vision_dtype=vision_dt, pack=packs(dev, dt, quantize), files=files,
                              wide=wide)  # fmt: skip
        finally:
            for f in files:
                f.close()
        release_vision_layers(model, pages)
        products = ""
        if float32_faster(dev, vision_dt):  # the tower's bf16 products of many rows, in float32
            widen(model.vision)
            widen(model.projector)
            # the language model's only where its weights are stored as they run (views of the file)
            language = any(getattr(m, "plain", None) is not None for m in model.language.modules())
            products = "vision and language" if language else "vision"
        model.language.init_rope(dev, dt)
        model.eval().requires_grad_(False)  # inference only: no autograd graph, whoever calls
        chunk = MPS_PREFILL_CHUNK if dev.type == "mps" else None
        graphs = CudaGraphs() if dev.type == "cuda" else None
        return cls(path, config, processor, tokenizer, model, dev, dt, quantize, backend, vision_dt, chunk, graphs,
                   products)  # fmt: skip

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The checkpoint's stop ids, plus <|im_end|> / <|endoftext|> when its tokenizer has them."""
        ids = list(self.config.eos_token_ids)
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return tuple(ids)

    # -- vision ---------------------------------------------------------------------------

    def encode_pixels(
        self,
        pixel_values: torch.Tensor,
        grid_thw: tuple[int, int, int],
        merge_size: int,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised patches of one image/video -> (kept merged tokens, D_text) features."""
        pixels = pixel_values.to(self.device, self.vision_dtype, non_blocking=True)
        features = self.model.encode_pixels(pixels, [tuple(grid_thw)], [merge_size], self.vision_backend)
        if keep is not None:
            features = features[keep.nonzero()[:, 0].to(self.device)]
        return features.to(self.dtype)

    def encode_visual(self, visual) -> torch.Tensor:
        """A prepared `VisualInput` -> its (visual_tokens_kept, D_text) features."""
        return self.encode_visuals([visual])[0]

    def encode_visuals(self, visuals: list) -> list[torch.Tensor]:
        """Several prepared `VisualInput`s (images, videos) encoded in one vision call.

        Their uint8 patches travel to the device and are normalised there (the 256-entry table of
        preprocessing, so the values are bit-identical); pruned tokens are dropped by indices
        computed on the host.
        """
        from .preprocess import normalise

        pixels = torch.cat([normalise(v.patches.to(self.device, non_blocking=True), v.table.to(self.device))
                            for v in visuals])
        grids = [tuple(v.grid_thw) for v in visuals]
        merges = [v.merge_size for v in visuals]
        features = self.model.encode_pixels(pixels.to(self.vision_dtype), grids, merges, self.vision_backend)
        out, start = [], 0
        for v in visuals:
            chunk = features[start : start + v.visual_tokens]
            start += v.visual_tokens
            if v.keep is not None:
                chunk = chunk[v.keep.nonzero()[:, 0].to(self.device, non_blocking=True)]
            out.append(chunk.to(self.dtype))
        return out

    # -- language ------------------------------------------------------------------------

    def check_length(self, positions: int) -> None:
        """Raise when a prompt plus its answer needs more positions than the model has."""
        if positions > self.config.text.max_position_embeddings:
            raise Vl3Error(
                f"the prompt and the tokens to generate need {positions} positions, more than the model's "
                f"{self.config.text.max_position_embeddings}: lower --max-new-tokens, --max-frames or "
                "--max-visual-tokens"
            )

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self.check_length(max_len)
        return KVCache.allocate(self.config.text, batch, max_len, self.device, self.dtype)

    def placeholders(self, input_ids: list[int]) -> list[int]:
        """Positions of the visual placeholder tokens in `input_ids`."""
        ids = (self.config.image_token_id, self.config.video_token_id)
        return [i for i, t in enumerate(input_ids) if t in ids]

    def embed(self, input_ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        """Embeddings (L, D) with `features` at the placeholders (their positions found on the host)."""
        positions = self.placeholders(input_ids)
        given = 0 if features is None else features.shape[0]
        if len(positions) != given:
            raise Vl3Error(f"the prompt has {len(positions)} visual placeholder tokens but {given} visual features "
                           "were given")
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        where = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        return self.model.embed(ids, features, where)

    def prefill(
        self, cache: KVCache, row: int, input_ids: list[int], features: torch.Tensor | None = None, start: int = 0
    ) -> torch.Tensor:
        """Run `input_ids` into row `row` of `cache` at positions start..; slots 0..start-1 must already
        hold the keys of the tokens before (a prefix). Returns the logits (V,) after the last token."""
        end = start + len(input_ids)
        if end > cache.max_len:
            raise Vl3Error(f"a prompt of {end} tokens does not fit the cache of {cache.max_len}")
        embeds = self.embed(input_ids, features)
        chunk = self.prefill_chunk or len(input_ids)
        for first in range(0, len(input_ids), chunk):
            hidden = self.model.language.prefill(embeds[first : first + chunk], cache, row, start + first, keep=1)
        cache.set_row(row, end)
        return self.model.logits(hidden[-1])

    def prefill_prefix(self, input_ids: list[int], features: torch.Tensor | None = None) -> Prefix:
        """The KV of a shared prompt start (system turn, a video's tokens...), to reuse in many requests."""
        self.check_length(len(input_ids))
        cache = self.new_cache(1, len(input_ids))
        self.prefill(cache, 0, input_ids, features)
        return Prefix(list(input_ids), cache.k[:, 0], cache.v[:, 0])

    def step(self, cache: KVCache, tokens: torch.Tensor, out: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """The pure decode step: tokens (B,) enter every row of `cache`; logits (B, V) written into `out`.

        No host reads; without `span` (the slots attended over, see `Qwen2Model.decode_step`) of
        fixed shapes: traceable as one graph, capturable. Lengths do not move here.
        """
        return out.copy_(self.model.logits(self.model.language.decode_step(tokens, cache, span)))

    def forget_graphs(self, cache: KVCache) -> None:
        """`cache` is being dropped: free the decode graphs captured on its buffers."""
        if self.graphs is not None:
            self.graphs.forget(cache)

    def decode(self, cache: KVCache, tokens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One step for every row of `cache` (free rows compute unused values); logits (B, V) float32."""
        longest = int(cache.host_lengths[cache.host_active].max(initial=0))  # the host's mirror: no device read
        if longest >= cache.max_len:
            raise Vl3Error(f"the KV cache of {cache.max_len} positions is full")
        tokens = tokens.to(self.device, non_blocking=True)
        if out is None:
            out = torch.empty(cache.batch, self.config.text.vocab_size, device=self.device)
        if self.graphs is not None:
            self.graphs.run(self, cache, tokens, out)
        else:
            self.step(cache, tokens, out, longest + 1)  # attention over the slots in use
        cache.advance()
        return out

    def forward_logits(self, input_ids: list[int], features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (L, V) of every position of one prompt (scoring and tests)."""
        cache = self.new_cache(1, len(input_ids))
        hidden = self.model.language.prefill(self.embed(input_ids, features), cache, 0, 0)
        return self.model.logits(hidden)


class CudaGraphs:
    """Decode steps captured in CUDA graphs, one per (cache buffers, rows, logits buffer), then replayed.

    The step reads only tensors that live as long as the cache (tokens are copied into a static
    buffer), so a graph captured once per batch bucket serves every later step of that bucket.
    A graph is keyed by the address, shape and strides of every cache tensor it reads, so a cache
    allocated where a dropped one was never replays a graph of another layout; `forget` frees the
    graphs of a cache that is dropped. `capture_s` records what each capture cost.
    """

    def __init__(self):
        self.graphs: dict[tuple, tuple] = {}
        self.capture_s: dict[tuple, float] = {}

    def run(self, engine: Engine, cache: KVCache, tokens: torch.Tensor, out: torch.Tensor) -> None:
        key = self._key(cache) + (out.data_ptr(), tuple(out.shape))
        if key not in self.graphs:
            start = time.perf_counter()
            static = tokens.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (the same values the replay writes)
                for _ in range(2):
                    engine.step(cache, static, out)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                engine.step(cache, static, out)
            torch.cuda.synchronize()
            self.graphs[key] = (graph, static)
            self.capture_s[key] = time.perf_counter() - start
        graph, static = self.graphs[key]
        static.copy_(tokens, non_blocking=True)
        graph.replay()

    @staticmethod
    def _key(cache: KVCache) -> tuple:
        tensors = (cache.k, cache.v, cache.lengths, cache.active, cache.row_index, cache.slot_index)
        return tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors)

    def forget(self, cache: KVCache) -> None:
        """Drop the graphs captured on any rows of `cache` (their buffers are about to be freed)."""
        base = cache.k.data_ptr()
        for key in [key for key in self.graphs if key[0][0] == base]:
            del self.graphs[key]  # capture_s keeps what it cost
