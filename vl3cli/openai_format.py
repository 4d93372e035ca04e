"""OpenAI's chat-completions format <-> vl3's items and records: pure functions, no HTTP, no model.

`decode_body(data)` reads the JSON (refusing NaN, Infinity and nesting too deep for the parser);
`parse_request(body, ...)` checks a `/v1/chat/completions` body and turns it into a `ChatRequest`:
the conversation (earlier turns as `prompt.Turn`s whose media are references, the new user
turn's media and text), the vl3 options (`max_tokens` -> `max_new_tokens`, `temperature`,
`top_p`, `seed`, and as extra fields vl3's media options `fps`, `min_frames`, `max_frames`,
`start`, `end`, `max_visual_tokens`, `prune`, `prune_threshold`, and `top_k`,
`repetition_penalty`, `ignore_eos`), `stop`, `stream`. Media come as `image_url` /
`video_url` content parts whose URL is `http(s)://` (fetched by the media reader), `data:`
(base64, decoded by the server into a temporary file) or `file://` (only when the server allows
local files). Anything else is an `ApiError` with the HTTP status and OpenAI's error body.

Unlike OpenAI's API, `temperature` defaults to 0 (greedy: the same answer every time), as
everywhere in vl3.

`completion`, `chunk` and `usage` build the response objects; `StopText` applies `stop`
strings to a growing answer, holding back text that may turn out to be the start of one.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlsplit

from .prompt import Turn

MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
MAX_STOP_CHARS = 400  # characters per stop string: what one request's stop strings may cost the engine thread
OPTION_FIELDS = ("fps", "min_frames", "max_frames", "start", "end", "max_visual_tokens", "prune", "prune_threshold",
                 "ignore_eos")  # fmt: skip


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
        code: str | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Media:
    """A media reference from a content part: a URL to fetch, a local path, or bytes to write to a file."""

    kind: str  # "image" | "video" (as the part said; the content decides in the end)
    url: str | None = None  # http(s)
    path: str | None = None  # file://, when allowed
    data: bytes | None = None  # data: URL
    mime: str | None = None
    where: str | None = None  # the content part it came from ("messages[0].content[1]"), for errors


@dataclass
class ChatRequest:
    history: list[Turn]  # earlier turns; user turns' visuals are `Media`
    media: list[Media]  # the new user turn's media
    prompt: str | None  # the new user turn's text (None: describe its media)
    system: str | None
    options: dict  # vl3 option keywords
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def decode_body(data: bytes):
    """The request body's JSON; NaN, Infinity, numbers out of float's range, bad UTF-8 and nesting too
    deep for the parser are `ApiError`s (Python's json reads NaN and Infinity, which JSON has not)."""
    try:
        return json.loads(data, parse_constant=_not_a_number, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _not_a_number(name: str):
    raise ApiError(400, f"the request body holds {name}, which is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, f"the number {text[:30]} in the request body is out of range")
    return value


def parse_request(body, *, allow_local_files: bool = False, max_stop: int = 4) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):  # null: the default, 1
        raise ApiError(400, "only n=1 is supported", "n")
    for name in ("tools", "functions", "tool_choice"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported", name)
    if _flag(body, "logprobs"):
        raise ApiError(400, "'logprobs' is not supported", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported (use 'repetition_penalty')", name)
    if body.get("logit_bias"):  # null or {}: nothing to apply
        raise ApiError(400, "'logit_bias' is not supported", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format")

    system_parts, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        text, media = _content(message.get("content"), f"messages[{i}].content", allow_local_files)
        if role in ("system", "developer"):
            if turns or media:
                raise ApiError(400, "system messages come first and hold text only", f"messages[{i}]")
            system_parts.append(text)
        elif role == "user":
            turns.append(Turn("user", text, visuals=tuple(media)))
        elif role == "assistant":
            if media:
                raise ApiError(400, "assistant messages hold text only", f"messages[{i}].content")
            turns.append(Turn("assistant", text))
        else:
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported (system, user, assistant)", f"messages[{i}].role")
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    last = turns[-1]
    if not last.text.strip() and not last.visuals:
        raise ApiError(400, "the last user message is empty", "messages")

    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > max_stop:
        raise ApiError(400, f"'stop' must be a string or a list of at most {max_stop} non-empty strings", "stop")
    for s in stop:
        _unicode(s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise ApiError(400, f"'stop' strings may be at most {MAX_STOP_CHARS} characters long (got {len(s)})", "stop")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return ChatRequest(
        history=turns[:-1], media=list(last.visuals), prompt=last.text if last.text.strip() else None,
        system="\n".join(system_parts) if system_parts else None, options=_options(body), stop=stop,
        stream=_flag(body, "stream"), include_usage=_flag(stream_options or {}, "include_usage", "stream_options"),
    )  # fmt: skip


def _flag(fields: dict, name: str, param: str | None = None) -> bool:
    """A true/false field (absent or null: false); "no" or 0 is refused, not read as Python's truth."""
    value = fields.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", param or name)
    return bool(value)


def _unicode(text: str, where: str) -> str:
    """`text`, unless it holds a lone surrogate (JSON allows "\\ud800"), which is no Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where}: the text is not valid Unicode (it holds a lone surrogate)", where) from None
    return text


def _options(body: dict) -> dict:
    options = {}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(name) is not None:  # null is unset: a client that writes every field sends it
        options["max_new_tokens"] = _number(body[name], name, int)
    for name in ("temperature", "top_p", "repetition_penalty"):
        if body.get(name) is not None:
            options[name] = _number(body[name], name, float)
    if body.get("top_k") is not None:
        options["top_k"] = _number(body["top_k"], "top_k", int)
    if body.get("seed") is not None:
        options["seed"] = _number(body["seed"], "seed", int)
    for name in OPTION_FIELDS:
        if body.get(name) is not None:
            value = body[name]
            if name in ("prune", "ignore_eos"):
                options[name] = _flag(body, name)
            else:
                options[name] = _number(value, name, int if name in ("min_frames", "max_frames", "max_visual_tokens") else float)
    return options


def _number(value, name: str, kind: type):
    try:  # float() of an int with hundreds of digits overflows
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:
        ok = False
    if not ok or (kind is int and value != int(value)):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    return kind(value)


def _content(content, where: str, allow_local_files: bool) -> tuple[str, list[Media]]:
    """A message's text (parts joined by newlines) and media, in order."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return _unicode(content, where), []
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content parts", where)
    texts, media = [], []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise ApiError(400, f"{here} must be an object with a string 'type' (text, image_url, video_url)", here)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{here}.text must be a string", here)
            texts.append(_unicode(part["text"], f"{here}.text"))
        elif kind in MEDIA_PARTS:
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{here}.{kind}.url must be a string", here)
            media.append(media_ref(url, MEDIA_PARTS[kind], here, allow_local_files))
        else:
            raise ApiError(400, f"{here}: content part type {kind!r} is not supported (text, image_url, video_url)", here)
    return "\n".join(texts), media


def media_ref(url: str, kind: str, where: str, allow_local_files: bool) -> Media:
    _unicode(url, where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not _split(url, where).hostname:
            raise ApiError(400, f"{where}: {url!r} has no host", where)
        return Media(kind, url=url, where=where)
    if scheme == "data":
        head, sep, payload = url[5:].partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{where}: data URLs must be base64 (data:<type>;base64,...)", where)
        try:
            data = _b64decode(payload)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL is not valid base64", where) from None
        if not data:
            raise ApiError(400, f"{where}: the data URL is empty", where)
        return Media(kind, data=data, mime=head[: -len(";base64")] or None, where=where)
    if scheme == "file":
        if not allow_local_files:
            raise ApiError(400, f"{where}: file:// URLs are refused (start the server with --allow-local-files)", where)
        parsed = _split(url, where)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{where}: file URLs must name a local path", where)
        return Media(kind, path=unquote(parsed.path), where=where)
    raise ApiError(400, f"{where}: media URLs must be http(s)://, data: or file:// (got {url[:40]!r})", where)


def _b64decode(payload: str, piece: int = 1 << 22) -> bytes:
    """Strict base64 (`validate=True`), decoded `piece` characters (a multiple of 4) at a time: one call
    holds the GIL throughout, and a server's event loop would wait for a 45 MB payload's whole
    decoding. The last slice holds all the padding, so that it is judged as in one call."""
    padding = payload.find("=")
    starts = list(range(0, max(1, len(payload) if padding < 0 else padding), piece))
    ends = [*starts[1:], len(payload)]
    return b"".join(base64.b64decode(payload[a:b], validate=True) for a, b in zip(starts, ends))


def _split(url: str, where: str) -> SplitResult:
    """`url`'s parts; a malformed host or port (`http://[::1/a.png`, `http://h:x/`) is the client's error."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise ApiError(400, f"{where}: malformed URL {url[:100]!r} ({e})", where) from None
    return parts


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(request_id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage_,
    }  # fmt: skip


def chunk(request_id: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:  # fmt: skip
    """One server-sent chunk; with `usage_` the final usage-only chunk (no choices)."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_ is not None:
        return body | {"choices": [], "usage": usage_}
    return body | {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]}


class StopText:
    """Applies stop strings to an answer as it grows: `push(piece)` returns the text that is safe
    to show (never the start of a stop string that may still complete); `stopped` turns true when
    a stop string appears, and the answer ends before it.

    Each stop string is followed as a Knuth-Morris-Pratt automaton: its state is the longest
    start of the stop string the text ends with, so a piece costs its own length per stop string,
    whatever their lengths (comparing every start of every stop string would cost their squares)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fallback = [_prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)  # per stop string: how much of its start the text ends with
        self.text = ""  # everything generated
        self.shown = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        start = len(self.text)
        self.text += piece
        cut = None
        for n, (stop, fallback) in enumerate(zip(self.stops, self.fallback)):
            k = self.matched[n]
            for i, c in enumerate(piece, start):
                while k and stop[k] != c:
                    k = fallback[k - 1]
                k += stop[k] == c
                if k == len(stop):  # this stop string's first match: the earliest of this stop string
                    cut = min(cut, i + 1 - k) if cut is not None else i + 1 - k
                    break
            self.matched[n] = k
        if cut is not None:  # the earliest match of any stop string ends the answer
            self.stopped = True
            return self._take(cut)
        return self._take(len(self.text) - max(self.matched, default=0))

    def finish(self) -> str:
        """The rest of the answer once generation ended without a stop string."""
        return "" if self.stopped else self._take(len(self.text))

    @property
    def answer(self) -> str:
        return self.text[: self.shown] if self.stopped else self.text

    def _take(self, end: int) -> str:
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece


def _prefix_function(s: str) -> list[int]:
    """For each i, the length of the longest proper start of `s[: i + 1]` that also ends it (KMP's table)."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table
