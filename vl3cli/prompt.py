"""Chat layout and tokenisation: question + visual token counts -> prompt input ids.

The layout is Qwen's chat format as VideoLLaMA3 uses it (see shared/VIDEOLLAMA3.md):

    [<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n{visual}\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

- image: `{visual}` is the placeholder repeated once per kept merged token;
- video: `Time 0.0s:{frame 0 tokens},Time 1.0s:{frame 1 tokens},...` (one decimal, frames
  joined by `,`, only the kept tokens of each frame).

The placeholder ids come from the model config (`image_token_id` / `video_token_id`; one id for
both in the original format) and `<|im_start|>` / `<|im_end|>` from the tokenizer. The ids are
built piece by piece: the text between two special tokens is tokenised on its own (exactly what
the tokenizer does with the full string, since it splits at special tokens first) and the
placeholder ids are inserted directly, so a 10,000-token video never goes through the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .errors import TokenizerError

DEFAULT_PROMPTS = {"image": "Describe this image in detail.", "video": "Describe this video in detail."}


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def token_to_id(self, token: str) -> int | None: ...


def default_prompt(kind: str) -> str:
    return DEFAULT_PROMPTS[kind]


def placeholder_id(config, kind: str) -> int:
    """The id whose positions receive visual features for media of `kind`."""
    return config.video_token_id if kind == "video" else config.image_token_id


def visual_pieces(kind: str, tokens_per_frame: Sequence[int], timestamps: Sequence[float], token: int) -> list:
    """`{visual}` as pieces: strings, and (token id, count) runs for the placeholders."""
    if kind == "image":
        return [(token, sum(tokens_per_frame))]
    if len(tokens_per_frame) != len(timestamps):
        raise ValueError(f"{len(tokens_per_frame)} frames but {len(timestamps)} timestamps")
    pieces: list = []
    for i, (n, t) in enumerate(zip(tokens_per_frame, timestamps)):
        pieces += [("," if i else "") + f"Time {t:.1f}s:", (token, n)]
    return pieces


def chat_pieces(question: str, visual: list, system: str | None, im_start: int, im_end: int) -> list:
    """The full chat layout as pieces (strings and (id, count) runs)."""
    pieces: list = []
    if system is not None:
        pieces += [(im_start, 1), f"system\n{system}", (im_end, 1), "\n"]
    pieces += [(im_start, 1), "user\n", *visual, f"\n{question}", (im_end, 1), "\n", (im_start, 1), "assistant\n"]
    return pieces


def pieces_to_ids(tokenizer: _Tokenizer, pieces: list) -> list[int]:
    """Tokenise runs of adjacent text as one string; expand (id, count) runs."""
    ids: list[int] = []
    text = ""
    for piece in pieces:
        if isinstance(piece, str):
            text += piece
            continue
        token, count = piece
        if count == 0:  # no token: the texts on either side meet, as in the full string
            continue
        if text:
            ids += tokenizer.encode(text)
            text = ""
        ids += [token] * count
    if text:
        ids += tokenizer.encode(text)
    return ids


def special_id(tokenizer: _Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"the tokenizer has no {token} token; is this a Qwen2-based VideoLLaMA3 checkpoint?")
    return token_id


def build_input_ids(
    tokenizer: _Tokenizer,
    config,
    question: str,
    kind: str,
    tokens_per_frame: Sequence[int],
    timestamps: Sequence[float] = (),
    system: str | None = None,
) -> list[int]:
    """Prompt ids for one question about one visual input (`kind` "image" or "video")."""
    visual = visual_pieces(kind, tokens_per_frame, timestamps, placeholder_id(config, kind))
    pieces = chat_pieces(question, visual, system, special_id(tokenizer, "<|im_start|>"), special_id(tokenizer, "<|im_end|>"))
    return pieces_to_ids(tokenizer, pieces)


def render(pieces: list, names: dict[int, str]) -> str:
    """The prompt as one string (token names from `names`); for --debug and for tests."""
    return "".join(p if isinstance(p, str) else names[p[0]] * p[1] for p in pieces)
