"""`vl3 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the Python API.

    POST /v1/chat/completions   OpenAI's chat format: text, image_url and video_url parts, histories,
                                max_tokens, temperature, top_p, seed, stop, stream (server-sent events)
    GET  /v1/models             the one model served
    GET  /health                liveness

One engine thread owns the model (`Service`): requests from every client become items of one
continuous batch (`pipeline.Loop`, the road every vl3 command takes); media is read by the
loop's worker threads and request bodies are parsed in another, never on the event loop. A
client that disconnects (its video's decoding included), or an answer that reaches a `stop`
string, is cancelled at once and frees its row. At most `max_batch` answers decode together and
`max_queue` more wait; beyond that the server answers 503, as it answers every request, uploads
still arriving included, when it shuts down (Ctrl-C, SIGTERM).

Safety: binds to 127.0.0.1 unless told otherwise (`bind`, before the model loads: an address in
use is an error at once); with an API key every /v1 request needs `Authorization: Bearer KEY`
(the scheme in any case; 401 otherwise); request bodies, media downloads and video lengths
are limited (413 / 400 with OpenAI's error body); `file://` media only with `allow_local_files`;
http(s) media only from public addresses unless `allow_private_urls` (fetch's `public_only`).
Every refusal is OpenAI's error body, unknown paths (404), wrong methods (405) and unexpected
failures (500, details in the log only) included. The request format lives in openai_format.py
(pure); this module is HTTP and threads, and is imported only by `vl3 serve` (FastAPI is the
`serve` extra).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .errors import ContextError, MediaError, UsageError, Vl3Error
from .fetch import SIZE_HINT
from .openai_format import (
    ApiError,
    ChatRequest,
    Media,
    StopText,
    chunk,
    completion,
    decode_body,
    new_id,
    parse_request,
    usage,
)
from .pipeline import Item
from .prompt import Turn

SHUTTING_DOWN = "the server is shutting down; retry on another server or later"
MIME_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
               "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov"}  # fmt: skip


@dataclass
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch: int = 8
    max_queue: int = 64
    allow_local_files: bool = False
    allow_private_urls: bool = False  # http(s) media from loopback / private / link-local addresses


@dataclass
class Ticket:
    """One request inside the engine thread: its item, how to reach its client, its stop strings."""

    id: int
    item: Item
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    stops: list[str]
    stop_text: StopText | None = None
    tmpdir: str | None = None
    uploads: dict[str, str] = field(default_factory=dict)  # temporary file of a data: URL -> what the client sent
    stopped: bool = False  # a stop string was found: the answer ends there
    done: bool = False


class Service:
    """The engine thread: submissions and cancellations in, text pieces and endings out."""

    def __init__(self, model, limits: Limits, workers: int = 2):
        self.model, self.limits, self.workers = model, limits, workers
        # what clients name is fetched from public addresses only (no probing of this host's network)
        model.runner.public_urls_only = not limits.allow_private_urls
        self.inbox: queue.Queue = queue.Queue()
        self.tickets: dict[int, Ticket] = {}  # in flight (engine thread only)
        self.in_flight = 0  # submitted and not finished (any thread; guarded by the lock)
        self.served = self.cancelled = 0  # finished requests; requests dropped because their client left
        self.closing = False  # shutting down: no new requests
        self.uploading: set[asyncio.Future] = set()  # requests whose body still arrives: resolved by `shut_down`
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._run, name="vl3-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(("stop", None))
        self.thread.join(timeout=10)

    def submit(self, item: Item, stops: list[str], tmpdir: str | None, uploads: dict[str, str] | None = None) -> Ticket:
        with self.lock:
            if self.closing:
                raise ApiError(503, SHUTTING_DOWN, kind="server_shutting_down")
            if self.in_flight >= self.limits.max_batch + self.limits.max_queue:
                raise ApiError(503, "the server is busy: too many requests in flight; retry later", kind="server_busy")
            self.in_flight += 1
        ticket = Ticket(next(self.ids), item, asyncio.get_running_loop(), asyncio.Queue(), stops, tmpdir=tmpdir,
                        uploads=uploads or {})  # fmt: skip
        ticket.stop_text = StopText(stops) if stops else None
        self.inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self.inbox.put(("cancel", ticket))

    def shut_down(self) -> None:
        """The server is stopping: the requests in flight end now with 503 instead of being cut when
        the grace period ends, and new ones are refused. Called on the event loop (as `submit` is,
        so a request is either in before the command or refused)."""
        with self.lock:
            self.closing = True
        for waiter in self.uploading:
            if not waiter.done():
                waiter.set_result(None)
        self.inbox.put(("shut down", None))

    def closed(self) -> asyncio.Future:
        """A future resolved when the server shuts down (at once if it has); on the event loop."""
        waiter = asyncio.get_running_loop().create_future()
        if self.closing:
            waiter.set_result(None)
        self.uploading.add(waiter)
        waiter.add_done_callback(self.uploading.discard)
        return waiter

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        loop = self.model.runner.loop(self.model.defaults, self.limits.max_batch, self.workers)
        try:
            while True:
                try:
                    command, ticket = self.inbox.get(block=loop.idle, timeout=None)
                except queue.Empty:
                    command = None
                try:
                    while command is not None:
                        if command == "stop":
                            return
                        self._command(loop, command, ticket)
                        try:
                            command, ticket = self.inbox.get_nowait()
                        except queue.Empty:
                            command = None
                    for (key, _), out in loop.step():
                        ticket = self.tickets.get(key)
                        if ticket is not None:
                            self._deliver(loop, ticket, out)
                except Exception as e:  # noqa: BLE001 -- a bug must not take the server down with it
                    error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
                    for t in list(self.tickets.values()):
                        self._end(t, ("error", error))
                    loop.close()  # a fresh batch for the requests to come
                    loop = self.model.runner.loop(self.model.defaults, self.limits.max_batch, self.workers)
        finally:
            loop.close()

    def _command(self, loop, command: str, ticket: Ticket) -> None:
        if command == "submit":
            self.tickets[ticket.id] = ticket
            loop.submit(ticket.id, ticket.item, stream=True)
        elif command == "cancel" and not ticket.done:
            loop.cancel(ticket.id)
            self.cancelled += 1
            self._end(ticket, None)
        elif command == "shut down":
            for t in list(self.tickets.values()):
                loop.cancel(t.id)
                self._end(t, ("error", ApiError(503, SHUTTING_DOWN, kind="server_shutting_down")))

    def _deliver(self, loop, ticket: Ticket, out) -> None:
        if isinstance(out, str):
            piece = ticket.stop_text.push(out) if ticket.stop_text else out
            if piece:
                self._send(ticket, ("text", piece))
            if ticket.stop_text and ticket.stop_text.stopped and not ticket.stopped:
                ticket.stopped = True
                answer = loop.answers.get((ticket.id, 0))
                if answer is None:  # it finished in this very step: its Result, with the counts, comes next
                    return
                loop.cancel(ticket.id)
                self._end(ticket, ("done", ticket.stop_text.answer, "stop", usage(len(answer.input_ids), len(answer.ids))))
            return
        if ticket.stopped:  # a stop string was found in its last pieces
            self._end(ticket, ("done", ticket.stop_text.answer, "stop", usage(out.prompt_tokens, out.generated_tokens)))
            return
        if out.error is not None:
            message = out.error
            for name, label in ticket.uploads.items():  # the client never saw the server's temporary files
                message = message.replace(name, label)
            self._end(ticket, ("error", api_error(out.exception, message)))
            return
        text = out.text
        if ticket.stop_text:
            rest = ticket.stop_text.finish()
            if rest:
                self._send(ticket, ("text", rest))
            text = ticket.stop_text.answer
        self._end(ticket, ("done", text, out.finish_reason, usage(out.prompt_tokens, out.generated_tokens)))

    def _send(self, ticket: Ticket, event) -> None:
        ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, event)

    def _end(self, ticket: Ticket, event) -> None:
        if ticket.done:
            return
        ticket.done = True
        self.tickets.pop(ticket.id, None)
        with self.lock:
            self.in_flight -= 1
            self.served += event is not None
        if ticket.tmpdir:
            shutil.rmtree(ticket.tmpdir, ignore_errors=True)
        if event is not None:
            self._send(ticket, event)


# Options named in errors as the command line spells them, and the request field a client sets.
_OPTION = re.compile(r"(?<![\w-])--(max-new-tokens|temperature|top-p|top-k|seed|repetition-penalty|fps|min-frames|"
                     r"max-frames|start|end|max-visual-tokens|prune|prune-threshold|ignore-eos|system)\b")  # fmt: skip


def request_terms(message: str) -> tuple[str, str | None]:
    """An error in the request's own words (`--max-new-tokens` is 'max_tokens', `--top-p` 'top_p'),
    and the first field it names (OpenAI's `param`)."""
    fields = []

    def to_param(m: re.Match) -> str:
        fields.append("max_tokens" if m.group(1) == "max-new-tokens" else m.group(1).replace("-", "_"))
        return f"'{fields[-1]}'"

    return _OPTION.sub(to_param, message), (fields[0] if fields else None)


def api_error(exception: BaseException | None, message: str) -> ApiError:
    """The HTTP face of an item's error: the client's input is at fault unless vl3 itself failed."""
    message = request_terms(message)[0]
    if isinstance(exception, ContextError):
        return ApiError(400, message, "messages", code="context_length_exceeded")
    if isinstance(exception, MediaError) and "too large" in message:  # the server's limit, not the command line's
        return ApiError(413, message.replace(SIZE_HINT, " on this server, set by its --max-download-mb"), "messages")
    if isinstance(exception, Vl3Error):
        return ApiError(400, message, "messages")
    return ApiError(500, message, kind="server_error")


def _request(data: bytes, model, limits: Limits) -> tuple[ChatRequest, Item, str | None, dict[str, str]]:
    """A request body as the request and its item (with `_item`'s folder and file names); run in a
    worker thread."""
    body = decode_body(data)
    parsed = parse_request(body, allow_local_files=limits.allow_local_files)
    if body.get("model") not in (None, model.name):
        raise ApiError(404, f"model {body.get('model')!r} is not served here (this server serves {model.name!r})", "model", "model_not_found")
    return parsed, *_item(parsed, model)


def _item(request: ChatRequest, model) -> tuple[Item, str | None, dict[str, str]]:
    """The request as an item; `data:` media are written to a temporary folder (returned, for cleanup),
    each file named in errors as the content part it came from (the third value)."""
    tmpdir, uploads = None, {}

    def path(media: Media) -> str:
        nonlocal tmpdir
        if media.url is not None:
            return media.url
        if media.path is not None:
            return media.path
        tmpdir = tmpdir or tempfile.mkdtemp(prefix="vl3-serve-")
        fd, name = tempfile.mkstemp(dir=tmpdir, suffix=MIME_SUFFIX.get(media.mime or "", ""))
        with os.fdopen(fd, "wb") as f:
            f.write(media.data)
        uploads[name] = f"{media.where or 'media'} (data: URL)"
        return name

    try:
        system = {} if request.system is None else {"system": request.system}  # none: the server's --system
        options = model.options(**request.options, **system)
    except UsageError as e:
        raise ApiError(400, *request_terms(str(e))) from None
    history = tuple(Turn(t.role, t.text, t.ids, tuple(path(m) for m in t.visuals)) for t in request.history)
    item = Item(tuple(path(m) for m in request.media), (request.prompt,), options=options, history=history)
    return item, tmpdir, uploads


def create_app(model, limits: Limits, api_key: str | None = None, workers: int = 2):
    """The FastAPI application; its engine thread starts and stops with the app."""
    service = Service(model, limits, workers)
    model_id = model.name

    @asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()
        service.start()
        yield
        service.stop()

    # No redirect of `/v1/models/` to `/v1/models`: an unknown path is a 404 in OpenAI's body, and a
    # redirect would be built from the client's own Host header.
    app = FastAPI(title="vl3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.service = service

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown path (404), wrong method (405)
        message = f"{e.detail}: {request.method} {request.url.path}"
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: OpenAI's body; the traceback goes to the log
        return error(ApiError(500, f"internal error ({type(e).__name__}); see the server's log", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "in_flight": service.in_flight, "served": service.served,
                "cancelled": service.cancelled}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "vl3"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            data = await _read_body(request, limits.max_body_bytes, service.closed())
            # Off the event loop: the JSON, the base64 of data: URLs and their files can be tens of
            # MB, and every other client's stream would wait for them.
            parsed, item, tmpdir, uploads = await asyncio.to_thread(_request, data, model, limits)
            try:
                ticket = service.submit(item, parsed.stop, tmpdir, uploads)
            except ApiError:  # busy or shutting down: the files are nobody's now
                if tmpdir:
                    shutil.rmtree(tmpdir, ignore_errors=True)
                raise
        except ApiError as e:
            return error(e)
        except ClientDisconnect:  # the client left during its upload
            return _gone()
        request_id = new_id()
        if parsed.stream:  # what fails before the first token (media, context) answers with its status
            first = await _last_event(request, service, ticket, first=True)
            if first is None or first[0] == "error":
                return _gone() if first is None else error(first[1])
            return StreamingResponse(_stream(service, ticket, request_id, model_id, parsed.include_usage, first),
                                     media_type="text/event-stream")  # fmt: skip
        event = await _last_event(request, service, ticket)
        if event is None:  # the client left: nobody reads this
            return _gone()
        if event[0] == "error":
            return error(event[1])
        return completion(request_id, model_id, event[1], event[2], event[3])

    return app


async def _last_event(request: Request, service: Service, ticket: Ticket, first: bool = False):
    """A request's ending event ("done" or "error"), skipping the text pieces (`first`: its first
    event of any kind), or None as soon as the client disconnects (its row is then cancelled)."""
    left = asyncio.ensure_future(_disconnect(request.receive))
    try:
        while True:
            get = asyncio.ensure_future(ticket.events.get())
            await asyncio.wait((get, left), return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                service.cancel(ticket)
                return None
            if first or get.result()[0] != "text":
                return get.result()
    except asyncio.CancelledError:
        service.cancel(ticket)
        raise
    finally:
        left.cancel()


async def _disconnect(receive) -> None:
    """Returns when the client has gone: the body is read, so the server's next message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(service: Service, ticket: Ticket, request_id: str, model_id: str, include_usage: bool, first):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; `first` is the
    answer's first event, already taken from its queue."""
    created = int(time.time())

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield sse(chunk(request_id, model_id, created, {"role": "assistant", "content": ""}))
        while True:
            event, first = first or await ticket.events.get(), None
            if event[0] == "text":
                yield sse(chunk(request_id, model_id, created, {"content": event[1]}))
                continue
            finished = True
            if event[0] == "error":
                yield sse(event[1].body())
            else:
                yield sse(chunk(request_id, model_id, created, {}, event[2]))
                if include_usage:
                    yield sse(chunk(request_id, model_id, created, usage_=event[3]))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:  # the client went away: free its row now
            service.cancel(ticket)


def error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _gone() -> JSONResponse:
    """The answer to a client that left: nobody reads it (499, nginx's "client closed request")."""
    return JSONResponse({}, status_code=499)


class Guard:
    """ASGI middleware: the API key on /v1 (401) and an announced body over the limit (413), before any
    route runs. Plain ASGI: it reads the headers as the bytes sent, and hands `receive` to the
    route untouched (the route watches it for the client's disconnect)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        # ASGI headers are the bytes as sent: a client sends a non-ASCII key as UTF-8
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await error(refusal)(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def refusal(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"].startswith("/v1/") and not self.authorized(headers.get(b"authorization", b"")):
            return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", kind="authentication_error")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.max_body_bytes):
            return _too_large(self.max_body_bytes)
        return None

    def authorized(self, header: bytes) -> bool:
        """`Bearer KEY`, the scheme in any case (RFC 7235: `bearer` too); the key compared in constant time."""
        scheme, _, key = header.partition(b" ")
        return hmac.compare_digest(key, self.key) and scheme.lower() == b"bearer"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit // (1024 * 1024)} MB", kind="request_too_large")


async def _read_body(request, limit: int, closed: asyncio.Future) -> bytes:
    """The body, read in pieces and refused (413) as soon as it passes `limit` bytes. When the server
    shuts down (`closed`) while it still arrives (a slow upload), 503 at once, as for the requests in
    flight; uvicorn would otherwise cancel the request after its grace period, a plain-text 500."""
    reading = asyncio.ensure_future(_body(request, limit))
    try:
        done, _ = await asyncio.wait((reading, closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        reading.cancel()  # no-ops once done
        closed.cancel()
    if reading not in done:
        raise ApiError(503, SHUTTING_DOWN, kind="server_shutting_down")
    return reading.result()


async def _body(request, limit: int) -> bytes:
    data = bytearray()
    async for piece in request.stream():  # raises ClientDisconnect when the client leaves
        data += piece
        if len(data) > limit:
            raise _too_large(limit)
    return bytes(data)


def address(host: str, port: int) -> str:
    """host:port as a URL writes it ([::1]:8000)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a Vl3Error saying why not (in use, not this machine's address,
    a name that does not resolve). Bound before the model loads, so that such an error comes at
    once; it listens only once the server runs (until then a client is refused, not kept waiting)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: no wait for the last run's connections
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        raise Vl3Error(f"cannot listen on {address(host, port)}: {reason[:1].lower()}{reason[1:]} "
                       "(choose another --port, or a --host of this machine)") from None  # fmt: skip
    return sock


def serve(model, sock: socket.socket, limits: Limits, api_key: str | None, workers: int, log_level: str = "warning",
          ready: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Run the server on `sock` (from `bind`) until interrupted (the caller loaded `model`); `ready`
    is called once it listens."""
    import uvicorn

    app = create_app(model, limits, api_key, workers)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                ready()

        def handle_exit(self, sig, frame) -> None:  # SIGINT / SIGTERM: answer the requests in flight first
            # A signal handler may run in the middle of `submit` on this thread: the shutdown goes
            # onto the event loop (a self-pipe write, safe here) instead of taking locks now.
            loop = getattr(app.state, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(app.state.service.shut_down)
            super().handle_exit(sig, frame)

    Server(config).run(sockets=[sock])

