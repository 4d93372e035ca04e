"""URLs -> local temporary files: how vl3 reads ``https://host/path/cat.jpg``.

Contract:

- ``is_url(text)``: True for ``scheme://...`` (so ``s3://`` gets a clear error, not "no such
  file"). ``check_url(url)``: the cheap syntax check the command line runs before loading a
  model (http or https, a host name).
- ``local_copy(url)``: a context manager that streams the body into a new temporary folder
  (``tempfile``, so ``TMPDIR`` chooses where) and yields the file's path; the folder is deleted
  on exit, also on error or Ctrl-C. ``download(url, folder)`` does the streaming.
- Limits: at most ``max_bytes`` (default 2 GiB, env ``VL3_MAX_DOWNLOAD_MB``), refused up front
  when Content-Length says more and cut off when a body without one grows past it; ``timeout``
  seconds to connect and between two reads (default 30), ``total_timeout`` for the whole
  download (default 600, env ``VL3_DOWNLOAD_TIMEOUT``); at most ``max_redirects`` redirects
  (default 5), to http or https only. Proxies come from ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
  ``NO_PROXY`` (the standard library's rules); certificates are verified.
- A web page (``text/html``) is refused as not media; any other body is kept and the caller
  checks its content like a local file's.
- Failures are one-line ``MediaError("<url>: <reason>")`` (HTTP status, timeout, too large,
  unreachable host, not media), chained to the network error behind them.

Nothing downloaded is ever executed: the file is only handed to the image and video decoders.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from vl3cli import __version__
from vl3cli.errors import MediaError, UsageError

SCHEMES = ("http", "https")
MAX_BYTES = 2 * 1024**3
TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 600.0
MAX_REDIRECTS = 5
CHUNK = 1 << 20
WEB_PAGE_TYPES = {"text/html", "application/xhtml+xml"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def check_url(url: str) -> None:
    """Raise MediaError unless ``url`` is an http(s) URL with a host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise MediaError(f"{url}: {scheme}:// URLs are not supported; use http(s):// or download the file first")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise MediaError(f"{url}: malformed URL ({e})") from e
    if not parts.hostname:
        raise MediaError(f"{url}: malformed URL (no host name)")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{name} must be a positive number, got {raw!r}")
    return value


def default_limits() -> dict:
    """``max_bytes`` and ``total_timeout`` from the environment, else the defaults."""
    return {
        "max_bytes": int(_env_number("VL3_MAX_DOWNLOAD_MB", MAX_BYTES / 2**20) * 2**20),
        "total_timeout": _env_number("VL3_DOWNLOAD_TIMEOUT", TOTAL_TIMEOUT_S),
    }


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _opener(max_redirects: int):
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = max_redirects

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if urlsplit(newurl).scheme.lower() not in SCHEMES:
                raise MediaError(f"{req.full_url}: redirected to {newurl}, which is not http(s)")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(Redirects)  # + the proxy handler reading *_PROXY


def _file_name(url: str) -> str:
    """A safe local name that keeps the URL's last path segment (and so its extension)."""
    name = os.path.basename(urlsplit(url).path)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[-100:]
    return name or "download"


def download(
    url: str, folder, *, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT_S,
    total_timeout: float = TOTAL_TIMEOUT_S, max_redirects: int = MAX_REDIRECTS,
) -> Path:  # fmt: skip
    """Stream ``url`` into a new file in ``folder`` and return its path (see the module doc).
    On failure nothing is left in ``folder``."""
    import urllib.request

    check_url(url)
    target = Path(folder) / _file_name(url)
    request = urllib.request.Request(
        url, headers={"User-Agent": f"vl3/{__version__}", "Accept": "image/*, video/*, */*;q=0.5"}
    )
    try:
        got = _stream(url, request, target, max_bytes=max_bytes, timeout=timeout, total_timeout=total_timeout,
                      max_redirects=max_redirects)  # fmt: skip
    except BaseException:
        target.unlink(missing_ok=True)  # no partial file left behind
        raise
    if got == 0:
        target.unlink(missing_ok=True)
        raise MediaError(f"{url}: the server sent an empty body: not an image or video")
    return target


def _stream(url: str, request, target: Path, *, max_bytes: int, timeout: float, total_timeout: float,
            max_redirects: int) -> int:  # fmt: skip
    """``download``'s transfer: the body into ``target``; returns its size in bytes."""
    import http.client
    import urllib.error

    deadline = time.monotonic() + total_timeout
    got = 0
    try:
        with _opener(max_redirects).open(request, timeout=timeout) as response:
            kind = response.headers.get_content_type() if response.headers.get("Content-Type") else ""
            if kind in WEB_PAGE_TYPES:
                raise MediaError(
                    f"{url}: not media: the server sent a web page ({kind}); link to the image or video file itself"
                )
            length = response.headers.get("Content-Length", "")
            length = int(length) if length.isdigit() else None
            if length is not None and length > max_bytes:
                raise MediaError(
                    f"{url}: too large: {_size(length)} (the limit is {_size(max_bytes)}; raise VL3_MAX_DOWNLOAD_MB)"
                )
            with open(target, "wb") as out:
                while chunk := response.read1(CHUNK):  # what has arrived: the deadline is checked often
                    got += len(chunk)
                    if got > max_bytes:
                        raise MediaError(f"{url}: too large: more than {_size(max_bytes)} (raise VL3_MAX_DOWNLOAD_MB)")
                    if time.monotonic() > deadline:
                        raise MediaError(
                            f"{url}: timed out: the download took more than {total_timeout:g} s "
                            f"({_size(got)} received; raise VL3_DOWNLOAD_TIMEOUT)"
                        )
                    out.write(chunk)
            if length is not None and got < length:
                raise http.client.IncompleteRead(b"", length - got)
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise MediaError(f"{url}: too many redirects (more than {max_redirects})") from e
        raise MediaError(f"{url}: HTTP {e.code} {e.reason}") from e
    except http.client.IncompleteRead as e:
        raise MediaError(
            f"{url}: the server closed the connection after {_size(got + len(e.partial))}; try again"
        ) from e
    except (TimeoutError, socket.timeout) as e:
        raise MediaError(f"{url}: timed out: no data for {timeout:g} s ({_size(got)} received)") from e
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise MediaError(f"{url}: timed out connecting (after {timeout:g} s)") from e
        if isinstance(reason, socket.gaierror):
            raise MediaError(f"{url}: unknown host {urlsplit(url).hostname} ({reason.strerror or reason})") from e
        text = getattr(reason, "strerror", None) or str(reason)
        raise MediaError(f"{url}: cannot connect ({text})") from e
    except (OSError, http.client.HTTPException) as e:
        raise MediaError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    return got


@contextmanager
def local_copy(url: str, **limits) -> Iterator[Path]:
    """Download ``url`` into a fresh temporary folder, yield the file, delete the folder after."""
    folder = tempfile.mkdtemp(prefix="vl3-")
    try:
        yield download(url, folder, **(default_limits() | limits))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
