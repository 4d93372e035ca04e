"""Decoding maths on the device: logits -> next token, each row with its own parameters and seed.

Order of operations (as in transformers' `generate`): repetition penalty, temperature, top-k,
top-p, then a draw. Temperature 0 is greedy (argmax), which ignores top-k/top-p and the seed.
Every operation works row by row, so requests with different parameters share one batch.

The draw is Gumbel-max: argmax(logits / T + g) picks token i with probability softmax(logits / T)_i
when g_i are independent Gumbel(0, 1) draws. The g_i are counter-based (`gumbel_noise`): computed
by integer hashing from (seed, step, vocabulary index) on the device, with no generator state.
Why not one `torch.Generator` per request: a request's draws then depend only on its seed and how
many tokens it has drawn, never on its row or its batch neighbours (batched == alone, rows may be
compacted freely); there is no per-row Python loop and no host round trip, so the step stays
capturable in a CUDA graph; and the integer noise is the same bits on CPU, CUDA and MPS (the float
`log` that turns it into Gumbel noise may still differ in its last bit between devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import UsageError

MASK32 = 0xFFFFFFFF
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class DecodingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self):
        # Each test is written so that NaN fails it; the bounds keep every value representable in
        # the device tensors that carry it (float32, int64).
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.max_new_tokens > INT64_MAX:
            raise UsageError(f"--max-new-tokens must be at most {INT64_MAX} (got {self.max_new_tokens})")
        if not 0 <= self.temperature <= FLOAT32_MAX:
            raise UsageError(f"--temperature must be a finite number >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.top_k <= INT64_MAX:
            raise UsageError(f"--top-k must be >= 0 and at most {INT64_MAX} (got {self.top_k})")
        if not 0 < self.repetition_penalty <= FLOAT32_MAX:
            raise UsageError(f"--repetition-penalty must be a finite number > 0 (got {self.repetition_penalty})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanching 32-bit integer hash (xorshift-multiply rounds) on int64 values in [0, 2^32).

    The multipliers stay below 2^31, so no product leaves int64: the same bits on every device.
    """
    for mult in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        x = x ^ (x >> 16)
        x = (x * mult) & MASK32
    return x ^ (x >> 16)


@lru_cache(maxsize=4)
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """_mix32 of every token id: the same for every step, so hashed once per vocabulary and device."""
    return _mix32(torch.arange(vocab, device=device, dtype=torch.long))


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, V) float32 for rows with `seeds` (B,) int64 at draw number `steps` (B,)."""
    seed_lo, seed_hi = seeds & MASK32, (seeds >> 32) & MASK32
    key = _mix32(_mix32(_mix32(seed_lo) ^ seed_hi) ^ (steps & MASK32))  # (B,)
    bits = _mix32(key[:, None] ^ _token_hashes(vocab, seeds.device)[None, :])  # (B, V) in [0, 2^32)
    return -torch.log(-torch.log(uniform_of(bits)))


def uniform_of(bits: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2^32) -> float32 strictly inside (0, 1): 23 bits, (n + 1/2) / 2^23, which float32
    holds exactly (with 24 bits, (2^24 - 1/2) / 2^24 would round to 1.0, and its noise to +inf)."""
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


@dataclass
class RowParams:
    """Per-row decoding parameters as device tensors (B,)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # long; 0 = off
    top_p: torch.Tensor  # float32
    penalty: torch.Tensor  # float32; 1 = off

    @classmethod
    def allocate(cls, batch: int, device) -> RowParams:
        def full(value, dtype):
            return torch.full((batch,), value, dtype=dtype, device=device)

        return cls(full(0.0, torch.float32), full(0, torch.long), full(1.0, torch.float32), full(1.0, torch.float32))

    def set_row(self, row: int, params: DecodingParams) -> None:
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.penalty[row] = params.repetition_penalty

    def move_row(self, src: int, dst: int) -> None:
        for t in (self.temperature, self.top_k, self.top_p, self.penalty):
            t[dst] = t[src]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by each row's `penalty` (B, 1) (CTRL).

    A penalty of 1 leaves the row bit-for-bit unchanged."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row: keep the top_k largest logits (ties with the k-th kept; 0 = all), then the smallest set
    of those whose probability reaches top_p (at least one). Others become -inf. One sort for both."""
    vocab = logits.shape[-1]
    ordered, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # (B,)
    kth = ordered.gather(1, (k - 1)[:, None])  # (B, 1)
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    # Nucleus over the survivors: drop a token when the probability mass strictly before it already
    # reaches p (the same set as transformers' ascending cumsum <= 1 - p, the most likely kept).
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    # top_p >= 1 is off: float32 sums can pass 1 before the tail and must not drop it
    drop_sorted = (before >= top_p[:, None]) & (top_p < 1)[:, None] & (torch.arange(vocab, device=logits.device) > 0)
    ordered = ordered.masked_fill(drop_sorted, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def sample(
    logits: torch.Tensor,
    params: RowParams,
    seen: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    any_sampling: bool = True,
    any_penalty: bool = True,
    any_filter: bool = True,
) -> torch.Tensor:
    """Next token ids (B,) from float32 logits (B, V); each row with its params, seed and draw number.

    `seen` (B, V) bool marks the tokens of each row's prompt and answer (repetition penalty).
    What the caller knows of every row skips work that would leave the logits as they are:
    `any_sampling=False` (all greedy) the sort and the noise, `any_penalty=False` (all penalties 1)
    the penalty, `any_filter=False` (no top-k, top-p 1) the sort.
    """
    if any_penalty:
        logits = apply_repetition_penalty(logits, seen, params.penalty[:, None])
    greedy = logits.argmax(dim=-1)
    if not any_sampling:
        return greedy
    sampling = params.temperature > 0
    # Each row's largest logit is moved to 0 before the division (the same softmax, the same draws):
    # a tiny temperature then sends the others to -inf, where dividing the logits themselves made
    # them all +inf (or all -inf) and the draw fell on the first token.
    shifted = logits - logits.gather(1, greedy[:, None])  # (B, V), <= 0
    scaled = shifted / torch.where(sampling, params.temperature, 1.0)[:, None]
    if any_filter:
        scaled = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    drawn = (scaled + gumbel_noise(seeds, steps, logits.shape[-1])).argmax(dim=-1)
    return torch.where(sampling, drawn, greedy)
