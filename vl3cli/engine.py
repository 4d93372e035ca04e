"""The engine: one loaded model and the three operations generation is built from.

    engine = Engine.load(path, device="auto", dtype="auto")
    features = engine.encode_visual(visual)              # pruned tokens already removed
    cache = engine.new_cache(batch=2, max_len=4096)
    logits = engine.prefill(cache, [(ids_a, features), (ids_b, None)])   # (2, V), last tokens
    logits = engine.decode(cache, next_tokens)                        # (2, V), one step

Weights are loaded once, straight into the requested device and dtype. Everything runs under
the caller's `torch.inference_mode()`; the engine keeps no per-request state besides the cache
it hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import BACKENDS, choose_vision_backend
from .config import ModelConfig
from .errors import UsageError, Vl3Error
from .model import KVCache, VideoLlama3
from .tokenizer import Tokenizer
from .weights import load_into

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
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
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (use auto, bfloat16, float16 or float32)")
    return DTYPES[name]


@dataclass
class Engine:
    path: Path
    config: ModelConfig
    processor: object  # vl3cli.preprocess.ProcessorConfig
    tokenizer: Tokenizer
    model: VideoLlama3
    device: torch.device
    dtype: torch.dtype
    vision_backend: str = "sdpa"

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", attention: str = "auto") -> Engine:
        from .preprocess import ProcessorConfig

        path = Path(path)
        if not path.is_dir():
            raise Vl3Error(f"model folder {path} does not exist")
        config = ModelConfig.from_dir(path)
        tokenizer = Tokenizer.from_dir(path)
        processor = ProcessorConfig.from_dir(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if attention not in BACKENDS:
            raise UsageError(f"unknown attention backend {attention!r} (use {', '.join(BACKENDS)})")
        try:
            backend = choose_vision_backend(dev, dt, attention)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        with torch.device("meta"):
            model = VideoLlama3(config)
        load_into(model, path, config.format, dev, dt, tie_lm_head=config.tie_word_embeddings)
        model.eval()
        return cls(path, config, processor, tokenizer, model, dev, dt, backend)

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
        """Patches of one image/video -> (kept merged tokens, D_text) features."""
        pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
        features = self.model.encode_pixels(pixels, [tuple(grid_thw)], [merge_size], self.vision_backend)
        if keep is not None:
            features = features[keep.to(self.device)]
        return features

    def encode_visual(self, visual) -> torch.Tensor:
        """A prepared `VisualInput` -> its (visual_tokens_kept, D_text) features."""
        return self.encode_pixels(visual.pixel_values, visual.grid_thw, visual.merge_size, visual.keep)

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

    def embed(self, input_ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        return self.model.embed(ids, features)

    def prefill(
        self, cache: KVCache, prompts: list[tuple[list[int], torch.Tensor | None]], start: int = 0
    ) -> torch.Tensor:
        """Run whole prompts into rows start..start+B-1 of `cache` (replacing what they held).

        Returns the logits (B, V) of each prompt's last token.
        """
        lengths = [len(ids) for ids, _ in prompts]
        if max(lengths) > cache.max_len:
            raise Vl3Error(f"a prompt of {max(lengths)} tokens does not fit the cache of {cache.max_len}")
        rows = cache.rows(start, start + len(prompts))
        embeds = [self.embed(ids, feats) for ids, feats in prompts]
        if len(prompts) == 1:
            n = lengths[0]
            positions = torch.arange(n, device=self.device)[None]
            hidden = self.model.language(embeds[0][None], rows, positions, None, n)
            last = hidden[:, -1]
        else:
            longest = max(lengths)
            batch = torch.zeros(len(prompts), longest, embeds[0].shape[-1], device=self.device, dtype=self.dtype)
            for row, e in enumerate(embeds):
                batch[row, : e.shape[0]] = e
            positions = torch.arange(longest, device=self.device).expand(len(prompts), longest)
            valid = torch.tensor(lengths, device=self.device)
            keys = torch.arange(longest, device=self.device)
            # query i of row b sees key j iff j <= i and j < length of row b: (B, 1, L, L)
            mask = (keys[None, :] <= keys[:, None])[None] & (keys < valid[:, None])[:, None, :]
            hidden = self.model.language(batch, rows, positions, mask[:, None], longest)
            last = hidden[torch.arange(len(prompts), device=self.device), valid - 1]
        rows.lengths.copy_(torch.tensor(lengths, device=self.device))
        cache.host_lengths[start : start + len(prompts)] = lengths
        return self.model.logits(last)

    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One step for rows 0..B-1: tokens (B,) enter at each row's next position; logits (B, V)."""
        count = tokens.shape[0]
        rows = cache.rows(0, count) if count < cache.batch else cache
        embeds = self.model.language.embed_tokens(tokens)[:, None]  # (B, 1, D)
        positions = rows.lengths[:, None]  # (B, 1)
        attend = max(rows.host_lengths) + 1
        if attend > cache.max_len:
            raise Vl3Error(f"the KV cache of {cache.max_len} positions is full")
        keys = torch.arange(attend, device=self.device)
        mask = (keys[None, :] <= positions)[:, None, None, :]  # (B, 1, 1, attend)
        hidden = self.model.language(embeds, rows, positions, mask, attend)
        rows.lengths += 1
        cache.host_lengths[:count] = [n + 1 for n in rows.host_lengths]
        return self.model.logits(hidden[:, -1])

    def forward_logits(self, input_ids: list[int], features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (L, V) of every position of one prompt (scoring and tests)."""
        cache = self.new_cache(1, len(input_ids))
        n = len(input_ids)
        positions = torch.arange(n, device=self.device)[None]
        hidden = self.model.language(self.embed(input_ids, features)[None], cache, positions, None, n)
        return self.model.logits(hidden[0])
