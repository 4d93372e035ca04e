"""prompt.py: the piecewise ids equal tokenising the full chat string, for both formats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tokenizer_json
from tokenizers import Tokenizer as Backend

from vl3cli.errors import TokenizerError
from vl3cli.prompt import Turn, build_input_ids, conversation_ids, conversation_pieces, follow_up_ids, render
from vl3cli.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(Backend.from_str(tokenizer_json()))


REFERENCE = Backend.from_str(tokenizer_json())  # the library as is: special tokens in a string are recognised


def full_ids(text: str) -> list[int]:
    """The ids of a whole chat string, as the tokenizers library gives them (the reference layout)."""
    return REFERENCE.encode(text, add_special_tokens=False).ids


def configs(tok):
    hf = SimpleNamespace(image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"))
    image = tok.token_to_id("<image>")
    original = SimpleNamespace(image_token_id=image, video_token_id=image)
    return {"hf": (hf, "<|image_pad|>", "<|video_pad|>"), "original": (original, "<image>", "<image>")}


def visual(kind, tokens_per_frame, timestamps=()):
    return SimpleNamespace(kind=kind, tokens_per_frame=list(tokens_per_frame), timestamps=list(timestamps))


def full_string(question, kind, tokens_per_frame, timestamps, system, placeholder):
    if kind == "image":
        visual = placeholder * sum(tokens_per_frame)
    else:
        visual = ",".join(f"Time {t:.1f}s:" + placeholder * n for n, t in zip(tokens_per_frame, timestamps))
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return head + f"<|im_start|>user\n{visual}\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("fmt", ["hf", "original"])
@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_image_and_video_match_full_string(tok, fmt, system):
    config, image_tok, video_tok = configs(tok)[fmt]
    q = "What happens after the cat jumps?"
    ids = build_input_ids(tok, config, q, [visual("image", [12])], system=system)
    assert ids == full_ids(full_string(q, "image", [12], [], system, image_tok))
    assert ids.count(config.image_token_id) == 12
    tpf, ts = [6, 2, 1, 3], [0.0, 1.0, 2.5, 10.25]
    ids = build_input_ids(tok, config, q, [visual("video", tpf, ts)], system=system)
    text = full_string(q, "video", tpf, ts, system, video_tok)
    assert "Time 10.2s:" in text or "Time 10.3s:" in text
    assert ids == full_ids(text)
    assert ids.count(config.video_token_id) == sum(tpf)


def test_layout_string_is_exact(tok):
    names = {1: "<|im_start|>", 2: "<|im_end|>", 9: "<P>"}

    def layout(turns, system=None):
        return render(conversation_pieces(turns, system, 1, 2, lambda kind: 9), names)

    assert layout([Turn("user", "Q?", visuals=(visual("video", [2, 1], [0.0, 1.0]),))]) == (
        "<|im_start|>user\nTime 0.0s:<P><P>,Time 1.0s:<P>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert layout([Turn("user", "Q?", visuals=(visual("image", [3]),))], "S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<P><P><P>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    two = [Turn("user", "What changed?", visuals=(visual("image", [2]), visual("video", [1, 1], [0.0, 0.5])))]
    assert layout(two) == (
        "<|im_start|>user\n<P><P>\nTime 0.0s:<P>,Time 0.5s:<P>\nWhat changed?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert layout([Turn("user", "Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert layout([Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Bye")]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


@settings(max_examples=40, deadline=None)
@given(
    question=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
    tpf=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    video=st.booleans(),
)
def test_any_question_matches_full_string(tok, question, tpf, video):
    config, image_tok, video_tok = configs(tok)["hf"]
    kind = "video" if video else "image"
    ts = [i * 0.5 for i in range(len(tpf))]
    ids = build_input_ids(tok, config, question, [visual(kind, tpf, ts)])
    assert ids == full_ids(full_string(question, kind, tpf, ts, None, video_tok if video else image_tok))


def test_missing_chat_token_is_a_tokenizer_error(tok):
    class NoChat:
        def encode(self, text):
            return tok.encode(text)

        def token_to_id(self, token):
            return None

    config, _, _ = configs(tok)["hf"]
    with pytest.raises(TokenizerError, match="im_start"):
        build_input_ids(NoChat(), config, "q", [visual("image", [1])])


def test_conversation_ids_equal_tokenising_the_full_string(tok):
    """Several media, text only, and a follow-up whose answer is kept as ids: all as the full string."""
    config, image_tok, video_tok = configs(tok)["hf"]
    v = visual("video", [2, 1], [0.0, 1.5])
    two = build_input_ids(tok, config, "What changed?", [visual("image", [3]), v])
    text = f"<|im_start|>user\n{image_tok * 3}\nTime 0.0s:{video_tok * 2},Time 1.5s:{video_tok}\nWhat changed?<|im_end|>\n<|im_start|>assistant\n"
    assert two == full_ids(text)
    assert build_input_ids(tok, config, "What color is a banana?") == full_ids(
        "<|im_start|>user\nWhat color is a banana?<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = tok.encode("A cat, then a dog.")
    turns = [Turn("user", "What?", visuals=(v,)), Turn("assistant", ids=tuple(answer)), Turn("user", "And then?")]
    first = build_input_ids(tok, config, "What?", [v])
    assert conversation_ids(tok, config, turns) == first + answer + follow_up_ids(tok, "And then?")
    full = full_ids(f"<|im_start|>user\nTime 0.0s:{video_tok * 2},Time 1.5s:{video_tok}\nWhat?<|im_end|>\n<|im_start|>assistant\n")
    assert first == full
    assert follow_up_ids(tok, "And then?") == full_ids("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
