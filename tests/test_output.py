"""output.py: record schema, writers, and the streaming detokeniser (UTF-8 hold-back)."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tokenizer_json

from vl3cli.output import TIMING_KEYS, Result, StreamDecoder, Writer, terminal_safe
from vl3cli.tokenizer import Tokenizer

SCHEMA = [
    "id", "path", "media", "kind", "segment_start", "segment_end", "prompt", "system", "text", "model", "dtype", "device", "quantize", "width",
    "height", "duration", "frames", "timestamps", "resized", "media_info", "visual_tokens", "visual_tokens_kept",
    "prompt_tokens", "prompt_tokens_cached", "generated_tokens", "finish_reason", "options", "timings", "warnings", "error",
]  # fmt: skip


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


def write(fmt, results, many=None, terminal=False, stop_after=None) -> str:
    out = io.StringIO()
    w = Writer(fmt, out, many=len(results) > 1 if many is None else many, terminal=terminal)
    try:
        for i, r in enumerate(results):
            if i == stop_after:
                raise KeyboardInterrupt
            w.write(r)
    except KeyboardInterrupt:
        pass
    finally:
        w.close()
    return out.getvalue()


def test_writers():
    rs = [Result(path="a", prompt="q1", text="é1"), Result(path="a", prompt="q2", text="two")]
    assert write("text", rs[:1]) == "é1\n"
    assert write("text", rs) == "Q: q1\né1\n\nQ: q2\ntwo\n"
    one = write("json", rs[:1])
    assert json.loads(one)["text"] == "é1" and "é1" in one
    assert [r["prompt"] for r in json.loads(write("json", rs))] == ["q1", "q2"]
    assert [json.loads(line)["prompt"] for line in write("jsonl", rs).splitlines()] == ["q1", "q2"]


def test_json_array_is_closed_when_interrupted():
    rs = [Result(path="a", prompt=f"q{i}", text=str(i)) for i in range(3)]
    assert [r["prompt"] for r in json.loads(write("json", rs, stop_after=2))] == ["q0", "q1"]
    assert json.loads(write("json", rs, stop_after=0)) == []


def test_terminal_text_has_no_control_characters():
    evil = "ok\x1b[2J\x1b]0;title\x07\rback\x08\x9b31m\tend\nnext"
    assert terminal_safe(evil) == "ok[2J]0;titleback31m\tend\nnext"
    r = Result(path="a", prompt="q", text=evil)
    assert write("text", [r], terminal=True) == terminal_safe(evil) + "\n"
    assert write("text", [r]) == evil + "\n"  # a file gets the text as generated
    assert json.loads(write("jsonl", [r]))["text"] == evil


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
