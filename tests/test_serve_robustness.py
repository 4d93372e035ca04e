"""`vl3 serve` where its clients or its operator misbehave: a shutdown or a client leaving during an
upload, a large body (parsed off the event loop), a port that cannot be listened on.

The ASGI app is called directly where the exact moment matters (the body half sent), so nothing
here waits on a clock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tiny
from media_factory import make_image

import vl3cli

pytest.importorskip("fastapi")
SHUTTING_DOWN = {"error": {"message": "the server is shutting down; retry on another server or later",
                           "type": "server_shutting_down", "param": None, "code": None}}  # fmt: skip


def stand_in_app():
    """The app around a stand-in model, without its lifespan (no engine): a body is read and refused
    before any model work."""
    from vl3cli.server import Limits, create_app

    return create_app(SimpleNamespace(name="m", runner=SimpleNamespace()), Limits())


def post_scope(length: int) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip


def call(app, receive, during=None) -> list[dict]:
    """The messages `app` sends for one request; `during` (a coroutine function) runs beside it.
    An exception out of the app (what uvicorn logs as "Exception in ASGI application") propagates."""
    sent = []

    async def send(message):
        sent.append(message)

    async def main():
        task = asyncio.ensure_future(app(post_scope(100), receive, send))
        if during is not None:
            await during()
        await asyncio.wait_for(task, 30)  # only a failure would take that long: the request hung

    asyncio.run(main())
    return sent


def test_a_shutdown_answers_a_request_still_uploading_503_at_once():
    """SIGTERM / Ctrl-C during a slow upload: the same 503 body as the requests in flight, not a wait
    for the grace period and then uvicorn's plain-text 500."""
    app = stand_in_app()
    waiting = asyncio.Event()
    calls = []

    async def receive():
        calls.append(1)
        if len(calls) == 1:
            return {"type": "http.request", "body": b'{"messages": ', "more_body": True}
        waiting.set()
        await asyncio.Event().wait()  # the rest of the body never comes

    async def shut_down():
        await waiting.wait()  # the route waits for the rest of the body
        app.state.service.shut_down()  # what the signal handler schedules on the event loop

    sent = call(app, receive, shut_down)
    assert sent[0]["status"] == 503 and json.loads(sent[1]["body"]) == SHUTTING_DOWN


def test_a_client_leaving_during_its_upload_is_no_server_error():
    """starlette's ClientDisconnect while the body is read: the request is dropped quietly."""
    app = stand_in_app()
    pieces = iter([{"type": "http.request", "body": b'{"messages": ', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(pieces)

    sent = call(app, receive)  # raised ClientDisconnect before the fix
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = tiny.make_checkpoint(tmp_path_factory.mktemp("robust-ckpt") / "hf", "hf", tied=True, seed=9)
    return vl3cli.load(str(ckpt), max_new_tokens=2)


def test_a_body_is_parsed_off_the_event_loop(model, monkeypatch, tmp_path):
    """The JSON, the base64 of a data: URL and its file (tens of MB at worst) would stall every other
    client's stream on the event loop: each step runs where no event loop runs (a worker thread)."""
    from fastapi.testclient import TestClient

    from vl3cli import server
    from vl3cli.server import Limits, create_app

    on_loop = {}

    def watched(name, function):
        def run(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:
                on_loop[name] = False
            return function(*args, **kwargs)

        return run

    for name in ("decode_body", "parse_request", "_item"):
        monkeypatch.setattr(server, name, watched(name, getattr(server, name)))
    image = base64.b64encode(make_image(tmp_path / "a.png", size=(42, 56)).read_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
    with TestClient(create_app(model, Limits())) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert on_loop == {"decode_body": False, "parse_request": False, "_item": False}


def serve_command(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VL3_DEBUG", "VL3_API_KEY")}
    return subprocess.run([sys.executable, "-m", "vl3cli", "serve", *args], check=False, capture_output=True, text=True, env=env, timeout=120)


def test_an_address_that_cannot_be_listened_on_is_one_error_before_the_model_loads(tmp_path):
    """A port in use, or an address not this machine's: one `Error:` line and exit 1, before the model
    loads (the model given does not exist: loading it first would give that error instead)."""
    missing = str(tmp_path / "no-model")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = serve_command("-m", missing, "--port", str(port))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [(f"Error: cannot listen on 127.0.0.1:{port}: address already in use "
                                      "(choose another --port, or a --host of this machine)")]  # fmt: skip
    r = serve_command("-m", missing, "--host", "192.0.2.1")  # TEST-NET-1 (RFC 5737): no machine's address
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "Error: cannot listen on 192.0.2.1:8000: cannot assign requested address (choose another --port, or a --host of this machine)"]
