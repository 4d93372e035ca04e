"""`vl3 serve`: the OpenAI-compatible server (server.py) started from the command line."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import UsageError
from .app import (
    _env_debug,
    _load,
    _options,
    _params,
    app,
    with_options,
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 serve\n\n"
        "  vl3 serve -m DAMO-NLP-SG/VideoLLaMA3-7B --port 8080 --api-key $VL3_API_KEY --max-batch 16\n\n"
        "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
        "-d '{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", "
        "\"image_url\": {\"url\": \"https://example.com/cat.jpg\"}}, {\"type\": \"text\", \"text\": \"What is this?\"}]}]}'\n\n"
        "The options below set the defaults of every request; a request's own fields override them."
    )
)
@with_options("model", "decoding", "media", "debug")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="VL3_API_KEY", help="Require 'Authorization: Bearer KEY' on every /v1 request.", show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Answers generated together in one forward pass.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a free row; beyond, the server answers 503.")] = 64,
    workers: Annotated[int, typer.Option(help="Threads reading media (downloads, decoding) off the event loop.")] = 2,
    allow_local_files: Annotated[bool, typer.Option("--allow-local-files", help="Accept file:// media URLs (files this machine can read).")] = False,
    allow_private_urls: Annotated[bool, typer.Option("--allow-private-urls", help="Fetch http(s) media from loopback, private and link-local addresses too (by default only public ones).")] = False,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body, in MB (413 above).")] = 64,
    max_download_mb: Annotated[int, typer.Option(help="Largest media download for an http(s) URL, in MB (413 above).")] = 1024,
    max_video_seconds: Annotated[float, typer.Option(help="Longest video a request may send, in seconds (400 above).")] = 3600.0,
    **options,
) -> None:
    """Serve the model over HTTP with OpenAI's chat-completions API (images and videos in messages)."""
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--workers", workers),
                        ("--max-body-mb", max_body_mb), ("--max-download-mb", max_download_mb), ("--max-video-seconds", max_video_seconds)):  # fmt: skip
        if not value >= (0 if name == "--max-queue" else 1) or value == float("inf"):  # nan and inf too
            raise UsageError(f"{name} must be at least {0 if name == '--max-queue' else 1} and finite (got {value})")
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        # `--api-key "$VL3_API_KEY"` with the variable unset: no client could ever be let in
        raise UsageError("--api-key is empty or starts or ends with spaces; give the key itself")
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535 (got {port})")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("vl3 serve needs FastAPI and uvicorn: pip install 'vl3cli[serve]'") from None
    from ..server import Limits, address, bind
    from ..server import serve as run_server

    params = _params(locals())
    with bind(host, port) as sock:  # a port in use is an error before the model loads
        loaded = _load(params, _options(params))
        loaded.runner.max_duration = max_video_seconds
        loaded.runner.max_download_bytes = max_download_mb * 1024 * 1024
        if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model", file=sys.stderr)
        limits = Limits(max_body_bytes=max_body_mb * 1024 * 1024, max_batch=max_batch, max_queue=max_queue, allow_local_files=allow_local_files,
                        allow_private_urls=allow_private_urls)  # fmt: skip

        def ready() -> None:
            print(f"Serving {loaded.name} on http://{address(host, port)}/v1 (OpenAI chat completions); Ctrl-C stops.", file=sys.stderr)

        run_server(loaded, sock, limits, api_key, workers, log_level="info" if _env_debug() else "warning", ready=ready)
