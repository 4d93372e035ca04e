"""Chat layout and tokenisation: conversations (questions, answers, visual token counts) -> prompt ids.

The layout is Qwen's chat format as VideoLLaMA3 uses it (see shared/VIDEOLLAMA3.md):

    [<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n{visual}\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

- image: `{visual}` is the placeholder repeated once per kept merged token;
- video: `Time 0.0s:{frame 0 tokens},Time 1.0s:{frame 1 tokens},...` (one decimal, frames
  joined by `,`, only the kept tokens of each frame);
- several visuals in one user turn: each one followed by `\\n`, in the order given, then the
  question; none: `<|im_start|>user\\n{question}<|im_end|>\\n...` (a text-only prompt);
- a follow-up: the previous prompt, the answer's ids as generated, then
  `<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n` (`follow_up_ids`).

The placeholder ids come from the model config (`image_token_id` / `video_token_id`; one id for
both in the original format) and `<|im_start|>` / `<|im_end|>` from the tokenizer. The ids are
built piece by piece: the text between two special tokens is tokenised on its own (exactly what
the tokenizer does with the full string, since it splits at special tokens first) and the
placeholder ids are inserted directly, so a 10,000-token video never goes through the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import TokenizerError

DEFAULT_PROMPTS = {"image": "Describe this image in detail.", "video": "Describe this video in detail."}


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def token_to_id(self, token: str) -> int | None: ...


def default_prompt(kinds: Sequence[str]) -> str:
    """The caption prompt for the media of a turn ("image" / "video" each)."""
    if len(kinds) == 1:
        return DEFAULT_PROMPTS[kinds[0]]
    if not kinds:
        raise ValueError("no media to describe")
    nouns = sorted({f"{kind}s" for kind in kinds})
    return f"Describe these {' and '.join(nouns)} in detail."


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


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: a user's text with the visual inputs it carries (in order;
    anything with `kind`, `tokens_per_frame` and `timestamps`, e.g. a `VisualInput`), or an
    assistant's answer, as text or as the ids it was generated as (used as is, never re-tokenised)."""

    role: str  # "user" | "assistant"
    text: str = ""
    ids: tuple[int, ...] | None = None
    visuals: tuple = ()


def conversation_pieces(turns: Sequence[Turn], system: str | None, im_start: int, im_end: int, placeholder) -> list:
    """The chat layout of `turns` as pieces, ending with an open assistant turn.

    A user turn is `<|im_start|>user\n` + each visual followed by `\n` + its text + `<|im_end|>\n`;
    an assistant turn is `<|im_start|>assistant\n` + its answer + `<|im_end|>\n`. `placeholder(kind)`
    gives the id that receives the visual features of that kind.
    """
    pieces: list = []
    if system is not None:
        pieces += [(im_start, 1), f"system\n{system}", (im_end, 1), "\n"]
    for turn in turns:
        if turn.role == "user":
            pieces += [(im_start, 1), "user\n"]
            for v in turn.visuals:
                pieces += [*visual_pieces(v.kind, v.tokens_per_frame, v.timestamps, placeholder(v.kind)), "\n"]
            pieces += [turn.text, (im_end, 1), "\n"]
        elif turn.role == "assistant":
            answer = list(turn.ids) if turn.ids is not None else turn.text
            pieces += [(im_start, 1), "assistant\n", answer, (im_end, 1), "\n"]
        else:
            raise ValueError(f"unknown role {turn.role!r}")
    return pieces + [(im_start, 1), "assistant\n"]


def pieces_to_ids(tokenizer: _Tokenizer, pieces: list) -> list[int]:
    """Tokenise runs of adjacent text as one string; expand (id, count) runs; lists of ids as they are."""
    ids: list[int] = []
    text = ""
    for piece in pieces:
        if isinstance(piece, str):
            text += piece
            continue
        if isinstance(piece, tuple) and piece[1] == 0:  # no token: the texts on either side meet, as in the full string
            continue
        if text:
            ids += tokenizer.encode(text)
            text = ""
        ids += list(piece) if isinstance(piece, list) else [piece[0]] * piece[1]
    if text:
        ids += tokenizer.encode(text)
    return ids


def special_id(tokenizer: _Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"the tokenizer has no {token} token; is this a Qwen2-based VideoLLaMA3 checkpoint?")
    return token_id


def conversation_ids(tokenizer: _Tokenizer, config, turns: Sequence[Turn], system: str | None = None) -> list[int]:
    """Prompt ids for a conversation, ending where the assistant's next answer begins."""
    pieces = conversation_pieces(
        turns, system, special_id(tokenizer, "<|im_start|>"), special_id(tokenizer, "<|im_end|>"),
        lambda kind: placeholder_id(config, kind),
    )  # fmt: skip
    return pieces_to_ids(tokenizer, pieces)


def build_input_ids(tokenizer: _Tokenizer, config, question: str, visuals: Sequence = (), system: str | None = None) -> list[int]:
    """Prompt ids for one question about some visual inputs (none: a text-only prompt)."""
    return conversation_ids(tokenizer, config, [Turn("user", question, visuals=tuple(visuals))], system)


def follow_up_ids(tokenizer: _Tokenizer, question: str) -> list[int]:
    """What follows an answer's ids when the user asks again: the answer's end and a new user turn."""
    im_start, im_end = special_id(tokenizer, "<|im_start|>"), special_id(tokenizer, "<|im_end|>")
    return pieces_to_ids(tokenizer, [(im_end, 1), "\n", (im_start, 1), f"user\n{question}", (im_end, 1), "\n",
                                     (im_start, 1), "assistant\n"])  # fmt: skip


def render(pieces: list, names: dict[int, str]) -> str:
    """The prompt as one string (token names from `names`); for --debug and for tests."""
    return "".join(p if isinstance(p, str) else names[p[0]] * p[1] for p in pieces)
