"""output.py: record schema, writers, and the streaming detokeniser (UTF-8 hold-back)."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tokenizer_json

from vl3cli.output import (
    TIMING_KEYS,
    Result,
    StreamDecoder,
    write_json,
    write_jsonl,
    write_text,
)
from vl3cli.tokenizer import Tokenizer

SCHEMA = [
    "path", "kind", "prompt", "text", "model", "width", "height", "duration", "frames", "timestamps",
    "resized", "visual_tokens", "visual_tokens_kept", "prompt_tokens", "generated_tokens",
    "finish_reason", "timings", "warnings", "error",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_str(tokenizer_json()))


def test_record_schema_and_order():
    d = Result(path="a.png", kind="image", text="hi", timings={"load_s": 1.23456}).to_dict()
    assert list(d) == SCHEMA
    assert list(d["timings"]) == list(TIMING_KEYS)
    assert d["timings"]["load_s"] == 1.2346 and d["timings"]["total_s"] == 0.0
    assert Result.from_dict(json.loads(json.dumps(d) )).to_dict() == d


def test_writers():
    rs = [Result(path="a", prompt="q1", text="é1"), Result(path="a", prompt="q2", text="two")]
    out = io.StringIO()
    write_text(rs[:1], out)
    assert out.getvalue() == "é1\n"
    out = io.StringIO()
    write_text(rs, out)
    assert out.getvalue() == "Q: q1\né1\n\nQ: q2\ntwo\n"
    out = io.StringIO()
    write_json(rs[:1], out)
    assert json.loads(out.getvalue())["text"] == "é1" and "é1" in out.getvalue()
    out = io.StringIO()
    write_json(rs, out)
    assert [r["prompt"] for r in json.loads(out.getvalue())] == ["q1", "q2"]
    out = io.StringIO()
    write_jsonl(rs, out)
    assert [json.loads(line)["prompt"] for line in out.getvalue().splitlines()] == ["q1", "q2"]


def stream(tok, ids):
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.finish()


def test_split_multibyte_char_is_held_back(tok):
    ids = tok.encode("a🙂b")
    assert len(ids) >= 4  # the emoji is not in the tiny vocabulary: one token per byte
    pieces, tail = stream(tok, ids)
    assert pieces[0] == "a"
    assert all(p == "" for p in pieces[1:-2]) and pieces[-2] == "🙂" and pieces[-1] == "b"
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)


def test_incomplete_tail_is_flushed_at_the_end(tok):
    ids = tok.encode("x🙂")[:-1]  # generation stopped inside a character
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "x" and tail == tok.decode(ids)[1:]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_stream_concatenation_equals_decode_of_valid_text(tok, text):
    ids = tok.encode(text)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 359), max_size=30))
def test_stream_concatenation_equals_decode_of_any_ids(tok, ids):
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
