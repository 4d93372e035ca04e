"""`vl3 serve` through the official `openai` client: real servers on 127.0.0.1 (random ports).

Answers equal the Python API's (greedy, tiny checkpoint); streamed chunks concatenate to the same
text; histories, stop strings, limits (401 / 400 / 404 / 413), malformed bodies and unknown routes
answered in OpenAI's error format, and clients that disconnect (streamed or not) freeing their rows
without disturbing the others.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import tiny
from media_factory import make_image, make_video

import vl3cli
from vl3cli.pipeline import Item
from vl3cli.prompt import Turn

openai = pytest.importorskip("openai")
KEY = "test-key-123"
N = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.make_checkpoint(tmp_path_factory.mktemp("serve-ckpt") / "hf", "hf", tied=True, seed=9)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-media")
    return {"image": make_image(root / "a.png", size=(42, 56)), "video": make_video(root / "b.mp4", seconds=2.0, fps=4, size=(56, 42))}


@pytest.fixture(scope="module")
def model(ckpt):
    return vl3cli.load(str(ckpt), max_new_tokens=N)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, *args: str):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VL3_DEBUG", "VL3_API_KEY")}
    p = subprocess.Popen([sys.executable, "-m", "vl3cli", "serve", "-m", str(ckpt), "--port", str(port), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert p.poll() is None, p.stderr.read()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return p, url
        except OSError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(ckpt):
    p, url = start_server(ckpt, "--api-key", KEY, "--allow-local-files", "--allow-private-urls", "--max-body-mb", "1", "--max-new-tokens", str(N),
                          "--max-download-mb", "1", "--max-video-seconds", "3")  # fmt: skip
    yield url
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server, ckpt):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(text: str, *media: tuple[str, str]) -> dict:
    parts = [{"type": kind, kind: {"url": url}} for kind, url in media]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_image_and_video_answers_equal_the_api(client, ckpt, files, model):
    for kind, part, mime in (("image", "image_url", "image/png"), ("video", "video_url", "video/mp4")):
        expected = model.describe(str(files[kind]), "What is shown?")
        for url in (data_url(files[kind], mime), files[kind].as_uri()):
            r = client.chat.completions.create(model=str(ckpt), messages=[user("What is shown?", (part, url))], max_tokens=N)
            assert r.choices[0].message.content == expected.text and r.choices[0].finish_reason == expected.finish_reason
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, expected.generated_tokens)


def test_streamed_chunks_concatenate_to_the_same_text(client, ckpt, files, model):
    expected = model.describe(str(files["image"]), "Describe it.", max_new_tokens=12, ignore_eos=True)
    stream = client.chat.completions.create(
        model=str(ckpt), messages=[user("Describe it.", ("image_url", files["image"].as_uri()))], max_tokens=12,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


def test_multi_turn_and_text_only(client, ckpt, files, model):
    image = str(files["image"])
    messages = [
        {"role": "system", "content": "Be brief."},
        user("What is it?", ("image_url", files["image"].as_uri())),
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "Which colours?"},
    ]
    r = client.chat.completions.create(model=str(ckpt), messages=messages, max_tokens=N)
    history = (Turn("user", "What is it?", visuals=(image,)), Turn("assistant", "A picture."))
    ((_, expected),) = list(model.run([Item((), ("Which colours?",), history=history)], system="Be brief."))
    assert r.choices[0].message.content == expected.text and r.usage.prompt_tokens == expected.prompt_tokens
    r = client.chat.completions.create(model=str(ckpt), messages=[{"role": "user", "content": "What colour is a banana?"}], max_tokens=N)
    (expected,) = model.ask([], "What colour is a banana?")
    assert r.choices[0].message.content == expected.text


def test_stop_strings(client, ckpt, files, model):
    full = model.describe(str(files["image"]), "Go on.", max_new_tokens=30, ignore_eos=True).text
    stop = full[5:7]
    assert stop and full.find(stop) >= 3
    r = client.chat.completions.create(model=str(ckpt), messages=[user("Go on.", ("image_url", files["image"].as_uri()))],
                                       max_tokens=30, stop=[stop], extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].message.content == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def post(url: str, body, key: str | None = KEY, raw: bytes | None = None):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_in_openais_format(server, ckpt, files, tmp_path):
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for key in (None, "wrong"):
        status, body = post(server, ok, key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    cases = [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
        ({"messages": [user("Hi", ("image_url", "ftp://host/a.png"))]}, 400, "http(s)://"),
        ({"messages": [user("Hi", ("image_url", "data:image/png;base64,@@@"))]}, 400, "base64"),
        ({**ok, "model": "gpt-4"}, 404, "not served here"),
        ({**ok, "max_tokens": 0}, 400, "'max_tokens' must be at least 1"),  # the request's words, not the CLI's
        ({**ok, "n": 2}, 400, "n=1"),
    ]
    for body, status, fragment in cases:
        got, answer = post(server, body)
        assert got == status and fragment in answer["error"]["message"], (body, answer)
        assert "--" not in answer["error"]["message"], answer
    for stream in (False, True):  # known before the first token: the status says it, streamed or not
        got, answer = post(server, {**ok, "max_tokens": 4090, "stream": stream})
        assert got == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        assert "lower 'max_tokens'" in answer["error"]["message"]
    notes = tmp_path / "notes.txt"
    notes.write_text("not media")
    got, answer = post(server, {"messages": [user("Hi", ("image_url", notes.as_uri()))], "max_tokens": 2})
    assert got == 400 and "notes.txt" in answer["error"]["message"]
    for chunked in (False, True):
        got, answer = post_large(server, 1024 * 1024 + 10, chunked)
        assert got == 413 and "limit of 1 MB" in answer["error"]["message"]
    got, answer = post(server, None, raw=b"{not json")
    assert got == 400 and "not valid JSON" in answer["error"]["message"]
    long = make_video(tmp_path / "long.mp4", seconds=4.0, fps=2, size=(28, 28))
    got, answer = post(server, {"messages": [user("Hi", ("video_url", long.as_uri()))], "max_tokens": 2})
    assert got == 400 and "videos up to 3 s" in answer["error"]["message"]
    from http_server import serve

    with serve({"/huge.png": ("image/png", b"\x89PNG" + b"0" * (2 * 1024 * 1024))}) as base:
        got, answer = post(server, {"messages": [user("Hi", ("image_url", base + "/huge.png"))], "max_tokens": 2})
    # the server's own setting (--max-download-mb 1), not the command line's VL3_MAX_DOWNLOAD_MB
    assert got == 413 and answer["error"]["message"] == (
        f"{base}/huge.png: too large: 2.0 MiB (the limit is 1.0 MiB on this server, set by its --max-download-mb)")


def post_large(url: str, size: int, chunked: bool):
    """A body over the limit: announced by Content-Length (and not sent), or sent in chunks without one."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for _ in range(size // 65536 + 1):
            conn.send(b"10000\r\n" + b" " * 65536 + b"\r\n")
        conn.send(b"0\r\n\r\n")
    else:
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_local_files_are_refused_unless_allowed(ckpt, files):
    p, url = start_server(ckpt)
    try:
        status, body = post(url, {"messages": [user("Hi", ("image_url", files["image"].as_uri()))]}, key=None)
        assert status == 400 and "--allow-local-files" in body["error"]["message"]
        from http_server import serve

        with serve({"/a.png": ("image/png", files["image"].read_bytes())}) as base:  # 127.0.0.1: this host
            status, body = post(url, {"messages": [user("Hi", ("image_url", base + "/a.png"))], "max_tokens": 2}, key=None)
        assert status == 400 and "127.0.0.1 (a loopback address)" in body["error"]["message"]
        assert "--allow-private-urls" in body["error"]["message"]
        status, body = post(url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, key=None)
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_a_client_leaving_mid_stream_does_not_disturb_the_others(server, ckpt, files, model):
    import threading

    expected = model.describe(str(files["video"]), "What happens?", max_new_tokens=40, ignore_eos=True).text
    results = {}
    before = health(server)

    def steady():
        c = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model=str(ckpt), messages=[user("What happens?", ("video_url", files["video"].as_uri()))],
                                      max_tokens=40, extra_body={"ignore_eos": True})  # fmt: skip
        results["steady"] = r.choices[0].message.content

    leaver = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    stream = leaver.chat.completions.create(model=str(ckpt), messages=[{"role": "user", "content": "Talk."}], max_tokens=3000,
                                            stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    pieces = 0
    for c in stream:
        pieces += 1
        if pieces == 3:
            break
    t = threading.Thread(target=steady)
    t.start()
    stream.close()  # the client goes away mid-answer
    t.join(timeout=120)
    assert results["steady"] == expected
    deadline = time.monotonic() + 30
    while health(server)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = health(server)
    assert after["in_flight"] == 0  # its row was freed
    # the leaver was cancelled, not run to its 3000th token: one cancellation, one request served
    assert (after["cancelled"] - before["cancelled"], after["served"] - before["served"]) == (1, 1)


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health") as r:
        return json.loads(r.read())


def test_an_internal_error_answers_500_and_the_server_goes_on(ckpt, monkeypatch):
    """A bug anywhere in the engine thread fails the requests in flight with 500 instead of leaving
    them waiting forever; the next requests are served."""
    import threading

    from fastapi.testclient import TestClient

    from vl3cli import server
    from vl3cli.server import Limits, create_app

    model = vl3cli.load(str(ckpt), max_new_tokens=3)
    real, calls = server.Service._deliver, []

    def flaky(self, loop, ticket, out):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, loop, ticket, out)

    monkeypatch.setattr(server.Service, "_deliver", flaky)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    answers = []
    with TestClient(create_app(model, Limits())) as client:
        for _ in range(2):
            t = threading.Thread(target=lambda: answers.append(client.post("/v1/chat/completions", json=body)))
            t.start()
            t.join(timeout=60)
            assert not t.is_alive(), "the request was left waiting"
    assert answers[0].status_code == 500 and "boom" in answers[0].json()["error"]["message"]
    assert answers[1].status_code == 200 and answers[1].json()["usage"]["completion_tokens"] == 3


def test_a_server_limits_the_downloads_of_a_model_already_used(model):
    """Media options are cached per runner: a Service created after the model read media must
    still switch its downloads to public addresses only."""
    from vl3cli.server import Limits, Service

    assert not model.runner.media_options(model.defaults).download_limits().get("public_only")
    try:
        Service(model, Limits())  # not started: the constructor sets the policy
        assert model.runner.media_options(model.defaults).download_limits()["public_only"] is True
        Service(model, Limits(allow_private_urls=True))
        assert not model.runner.media_options(model.defaults).download_limits().get("public_only")
    finally:
        model.runner.public_urls_only = False


def test_a_client_leaving_a_plain_request_is_cancelled(server):
    """Not streamed: the handler waits for the whole answer, and must still see the client leave."""
    before = health(server)
    body = json.dumps({"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 3000, "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        deadline = time.monotonic() + 30
        while health(server)["in_flight"] == 0:
            assert time.monotonic() < deadline, "the request never started"
    deadline = time.monotonic() + 30  # closed: the row must go long before 3000 tokens
    while (now := health(server))["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["in_flight"] == 0
    assert (now["cancelled"] - before["cancelled"], now["served"] - before["served"]) == (1, 0)


def test_malformed_bodies_answer_400_in_openais_format(server):
    """Python's json reads NaN / Infinity / 1e400 and lone surrogates, and recurses on nesting: none
    of them may reach the model or turn into a 500."""
    hi = '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": %s}'
    cases = [
        (hi % "Infinity", "Infinity, which is not a JSON number"),
        (hi % "NaN", "NaN, which is not a JSON number"),
        (hi % "1e400", "1e400 in the request body is out of range"),
        ("[" * 100000, "nested too deeply"),
    ]
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for part_type in (["text"], {"a": 1}):
        cases.append((json.dumps({**ok, "messages": [{"role": "user", "content": [{"type": part_type, "text": "Hi"}]}]}),
                      "messages[0].content[0] must be an object with a string 'type'"))  # fmt: skip
    surrogate = "\ud800 hi"  # json.dumps sends it as the escape "\ud800", which JSON allows
    for body, where in (
        ({**ok, "messages": [{"role": "user", "content": surrogate}]}, "messages[0].content"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": surrogate}]}]}, "messages[0].content[0].text"),
        ({**ok, "messages": [{"role": "system", "content": surrogate}, *ok["messages"]]}, "messages[0].content"),
        ({**ok, "messages": [*ok["messages"], {"role": "assistant", "content": surrogate}, *ok["messages"]]}, "messages[1].content"),
        ({**ok, "stop": [surrogate]}, "stop"),
    ):  # fmt: skip
        cases.append((json.dumps(body), f"{where}: the text is not valid Unicode"))
    for extra, fragment in (({"stream": "no"}, "'stream' must be true or false"), ({"stream": 1}, "'stream' must be true or false"),
                            ({"stream_options": [1]}, "'stream_options' must be an object"),
                            ({"stream": True, "stream_options": {"include_usage": "yes"}}, "'include_usage' must be true or false"),
                            ({"logprobs": "no"}, "'logprobs' must be true or false")):  # fmt: skip
        cases.append((json.dumps({**ok, **extra}), fragment))
    for raw, fragment in cases:
        status, answer = post(server, None, raw=raw.encode())
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", (raw[:80], answer)
        assert fragment in answer["error"]["message"], (raw[:80], answer)


def test_unknown_paths_and_methods_answer_in_openais_format(server):
    # a trailing slash is an unknown path too, not a redirect built from the client's Host header
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/health", 405),
                                 ("POST", "/v1/chat/completions/", 404), ("GET", "/v1/models/", 404)):  # fmt: skip
        request = urllib.request.Request(f"{server}{path}", method=method, headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        body = json.loads(info.value.read())
        assert info.value.code == status and set(body["error"]) == {"message", "type", "param", "code"}
        assert f"{method} {path}" in body["error"]["message"]
        if method == "DELETE":
            assert info.value.headers["Allow"] == "GET"


def test_a_data_url_is_named_in_errors_not_its_temporary_file(server):
    junk = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
    status, answer = post(server, {"messages": [user("Hi", ("image_url", junk))], "max_tokens": 2})
    message = answer["error"]["message"]
    assert status == 400 and message.startswith("messages[0].content[0] (data: URL): "), message
    assert "vl3-serve-" not in message and ".png" not in message


def fake_app():
    """The app around a stand-in model: enough for what is answered before the engine is reached."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from vl3cli.server import Limits, create_app

    def options(**_):
        raise RuntimeError("a bug at /srv/secret/path")

    model = SimpleNamespace(name="m", runner=SimpleNamespace(), options=options)
    return TestClient(create_app(model, Limits()), raise_server_exceptions=False)  # no lifespan: no engine


def guard_status(authorization: bytes, api_key: str) -> int:
    """The status the API-key guard answers /v1/models with, called directly: ASGI servers hand headers
    over as the bytes sent (TestClient re-encodes them)."""
    import asyncio

    from vl3cli.server import Guard

    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": [(b"authorization", authorization)]}
    asyncio.run(Guard(app, api_key=api_key, max_body_bytes=1000)(scope, receive, send))
    return sent[0]["status"]


def test_a_non_ascii_api_key_sent_as_utf8_is_accepted():
    """`--api-key clé` matches a client that sends the key as UTF-8, as curl does."""
    assert guard_status(b"Bearer cl\xc3\xa9", "clé") == 200  # UTF-8
    assert guard_status(b"Bearer cl\xe9", "clé") == guard_status(b"Bearer cle", "clé") == guard_status(b"", "clé") == 401


def test_the_bearer_scheme_is_case_insensitive():
    """RFC 7235: the scheme's case does not matter (some clients and proxies lowercase it); the key's does."""
    for header in (b"Bearer sekret", b"bearer sekret", b"BEARER sekret"):
        assert guard_status(header, "sekret") == 200, header
    for header in (b"Bearer Sekret", b"Bearer sekret2", b"Basic sekret", b"sekret", b"Bearersekret", b"bearer", b""):
        assert guard_status(header, "sekret") == 401, header


def test_an_unexpected_exception_answers_500_json_without_details():
    r = fake_app().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "server_error" and "secret" not in r.text and "Traceback" not in r.text


def test_request_fields_as_openai_clients_send_them(ckpt, model):
    """In-process app on a model loaded with a system prompt: requests without a system message use
    it; null fields are unset; a stop string found in the answer's last step still reports usage;
    a context error carries its code where OpenAI puts it."""
    from fastapi.testclient import TestClient

    from vl3cli.server import Limits, create_app

    pirate = vl3cli.load(str(ckpt), max_new_tokens=N, system="You are a pirate.")

    def ask(client, **body):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], **body})
        return r.status_code, r.json()

    with TestClient(create_app(pirate, Limits())) as client:
        (expected,) = pirate.ask([], "Hi")  # the model's default system prompt applies
        status, body = ask(client)
        assert status == 200 and body["usage"]["prompt_tokens"] == expected.prompt_tokens
        (plain,) = model.ask([], "Hi")
        assert expected.prompt_tokens > plain.prompt_tokens  # ...and is really there
        status, body = ask(client, max_completion_tokens=None, max_tokens=3, n=None, logit_bias=None, ignore_eos=True)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        for text in ("Hi", "Go on.", "Hello there", "abc"):  # a one-token answer with text: stop at its first character
            (one,) = pirate.ask([], text, max_new_tokens=1, ignore_eos=True)
            if one.text:
                break
        status, body = ask(client, messages=[{"role": "user", "content": text}], max_tokens=1, ignore_eos=True, stop=one.text[0])
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"] == {"prompt_tokens": one.prompt_tokens, "completion_tokens": 1, "total_tokens": one.prompt_tokens + 1}
        status, body = ask(client, max_tokens=4090)
        assert status == 400 and (body["error"]["type"], body["error"]["code"]) == ("invalid_request_error", "context_length_exceeded")
        for field, value in (("n", True), ("n", 2), ("logit_bias", {"5": 10})):
            status, body = ask(client, **{field: value})
            assert status == 400 and body["error"]["param"] == field


def test_a_server_stopped_with_requests_in_flight_answers_them_503(ckpt):
    """SIGTERM while an answer decodes: its client gets OpenAI's error body with 503 at once (not a
    plain-text 500 when the grace period runs out), and the server leaves without a traceback."""
    import signal
    import threading

    p, url = start_server(ckpt)
    answers = []
    body = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 3000, "ignore_eos": True}
    t = threading.Thread(target=lambda: answers.append(post(url, body, key=None)))
    t.start()
    deadline = time.monotonic() + 60
    while health(url)["in_flight"] == 0:
        assert time.monotonic() < deadline, "the request never started"
    began = time.monotonic()
    p.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    _, stderr = p.communicate(timeout=60)
    assert answers and answers[0][0] == 503 and answers[0][1]["error"]["type"] == "server_shutting_down", answers
    assert time.monotonic() - began < 4  # well inside the 5 s grace period
    assert "Traceback" not in stderr and "Exception in ASGI" not in stderr, stderr
