"""openai_format.py alone (no server): stop strings against a plain reference, the limits `stop`
strings and media URLs are checked against, and base64 decoded in slices equal to one call."""

from __future__ import annotations

import base64
import binascii
import random

import pytest

from vl3cli.openai_format import MAX_STOP_CHARS, ApiError, StopText, _b64decode, parse_request


class NaiveStopText:
    """The definition, checked against the whole text at every piece: the earliest match of any stop
    string ends the answer; otherwise the longest end of the text that starts a stop string is held back."""

    def __init__(self, stops):
        self.stops, self.text, self.shown, self.stopped = stops, "", 0, False

    def push(self, piece):
        if self.stopped:
            return ""
        self.text += piece
        starts = [i for s in self.stops if (i := self.text.find(s)) >= 0]
        if starts:
            self.stopped = True
            end = min(starts)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece

    def finish(self):
        if self.stopped:
            return ""
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece


def pieces_of(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_stop_text_equals_the_definition_on_random_answers():
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "aab"])
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ours, naive = StopText(stops), NaiveStopText(stops)
        for piece in pieces_of(text, rng):
            assert ours.push(piece) == naive.push(piece), (stops, text)
            assert ours.stopped == naive.stopped
        assert ours.finish() == naive.finish()
        assert ours.answer == (naive.text[: naive.shown] if naive.stopped else naive.text)


def test_long_stop_strings_hold_back_and_cut_as_the_definition():
    """Stop strings of the largest length allowed, one a run of a single letter (every end of the
    text starts it) and one that repeats a pattern (the automaton falls back often)."""
    rng = random.Random(3)
    stops = ["q" * MAX_STOP_CHARS, "ab" * (MAX_STOP_CHARS // 2), "abc" * 133 + "d"]
    for text in ("q" * (MAX_STOP_CHARS - 1) + "x" + "q" * MAX_STOP_CHARS + "tail", "ab" * 150 + "b" + "ab" * 250,
                 "abc" * 140 + "abc" * 133 + "d" + "after"):  # fmt: skip
        ours, naive, pieces = StopText(stops), NaiveStopText(stops), pieces_of(text, rng)
        assert [ours.push(p) for p in pieces] == [naive.push(p) for p in pieces]
        assert ours.stopped and naive.stopped and ours.answer == naive.text[: naive.shown]
    held = StopText(["q" * MAX_STOP_CHARS])
    assert held.push("x" + "q" * (MAX_STOP_CHARS - 1)) == "x" and held.finish() == "q" * (MAX_STOP_CHARS - 1)


def request(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], **fields}


def test_stop_strings_longer_than_the_limit_are_refused():
    assert parse_request(request(stop=["q" * MAX_STOP_CHARS] * 4)).stop == ["q" * MAX_STOP_CHARS] * 4
    for stop in ("q" * (MAX_STOP_CHARS + 1), ["a", "w" * 200_000]):
        with pytest.raises(ApiError) as info:
            parse_request(request(stop=stop))
        assert (info.value.status, info.value.kind, info.value.param) == (400, "invalid_request_error", "stop")
        assert f"at most {MAX_STOP_CHARS} characters" in info.value.message


@pytest.mark.parametrize(
    "url,fragment",
    [
        ("http://[::1/cat.png", "Invalid IPv6 URL"),
        ("http://[x]/cat.png", "'x' does not appear to be an IPv4 or IPv6 address"),
        ("https://host:99999/cat.png", "Port out of range"),
        ("http://host:port/cat.png", "Port could not be cast to integer"),
        ("file://[x/y", "Invalid IPv6 URL"),
    ],
)
def test_a_malformed_host_or_port_is_the_clients_error(url, fragment):
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(ApiError) as info:
        parse_request({"messages": [{"role": "user", "content": [part]}]}, allow_local_files=True)
    assert (info.value.status, info.value.kind, info.value.param) == (400, "invalid_request_error", "messages[0].content[0]")
    assert info.value.message.startswith("messages[0].content[0]: malformed URL") and fragment in info.value.message


def test_base64_in_slices_equals_one_strict_call():
    rng = random.Random(1)
    payloads = [base64.b64encode(rng.randbytes(n)).decode() for n in (1, 2, 3, 10, 11, 100, 1001)]
    payloads += ["QUJD" + "QQ==" + "QUJD", "QQ=A", "QUJDQ", "QUJ$", "QUJDQUJD=", "QUJDQUJD==", "QUJDQUJDQQ===", "=QUJD", "=", "QQ==", "QUI=", ""]
    for payload in payloads:
        try:
            expected = base64.b64decode(payload, validate=True)
        except binascii.Error:
            expected = None
        for piece in (4, 8, 1 << 22):
            try:
                got = _b64decode(payload, piece)
            except binascii.Error:
                got = None
            assert got == expected, (payload, piece)
