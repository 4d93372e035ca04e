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
- ``public_only`` (what ``vl3 serve`` uses unless started with ``--allow-private-urls``): every
  connection, the first and each redirect's, goes only to a public address. The name is
  resolved, loopback / private / link-local / shared / reserved / multicast addresses are
  skipped, and the socket connects to a public one among those resolved, so a name that
  resolves differently the second time (DNS rebinding) cannot slip through. Behind a proxy
  the proxy connects; the target's name is checked as this machine resolves it. The command
  line fetches from anywhere: a local user may reach what their machine can.
- ``cancelled``: a callable (``threading.Event.is_set``) asked between reads; once it answers
  True the download stops (``DownloadCancelled``) within one read ``timeout``, so a request
  dropped by its client frees its worker.
- A web page (``text/html``) is refused as not media; any other body is kept and the caller
  checks its content like a local file's.
- Failures are one-line ``MediaError("<url>: <reason>")`` (HTTP status, timeout, too large,
  unreachable host, a refused address, not media), chained to the network error behind them.

Nothing downloaded is ever executed: the file is only handed to the image and video decoders.
"""

from __future__ import annotations

import atexit
import ipaddress
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from vl3cli import __version__
from vl3cli.errors import MediaError, UsageError

SCHEMES = ("http", "https")
MAX_BYTES = 2 * 1024**3
TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 600.0
MAX_REDIRECTS = 5
CHUNK = 1 << 20
WEB_PAGE_TYPES = {"text/html", "application/xhtml+xml"}
# How the command line raises the size limit, ending every "too large" message (a caller with its
# own setting, such as the server's --max-download-mb, names that one instead).
SIZE_HINT = "; raise VL3_MAX_DOWNLOAD_MB"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def check_url(url: str) -> None:
    """Raise MediaError unless ``url`` is an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. "Invalid IPv6 URL"
        raise MediaError(f"{url}: malformed URL ({e})") from e
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise MediaError(f"{url}: {scheme}:// URLs are not supported; use http(s):// or download the file first")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise MediaError(f"{url}: malformed URL ({e})") from e
    if not parts.hostname:
        raise MediaError(f"{url}: malformed URL (no host name)")
    _idna(url, parts.hostname)


def env_number(name: str, default: float) -> float:
    """A positive finite number from environment variable `name`, `default` when unset or blank; else UsageError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{name} must be a positive number, got {raw!r}")
    return value


def default_limits() -> dict:
    """``max_bytes`` and ``total_timeout`` from the environment, else the defaults."""
    return {
        "max_bytes": int(env_number("VL3_MAX_DOWNLOAD_MB", MAX_BYTES / 2**20) * 2**20),
        "total_timeout": env_number("VL3_DOWNLOAD_TIMEOUT", TOTAL_TIMEOUT_S),
    }


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def address_refusal(ip: str) -> str | None:
    """Why ``public_only`` downloads may not connect to ``ip``: "a loopback address", ...; None
    for a public (globally routable unicast) address. IPv4 mapped into IPv6 counts as IPv4."""
    addr = ipaddress.ip_address(ip.partition("%")[0])  # an IPv6 zone (fe80::1%eth0) names no other host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for test, kind in ((addr.is_loopback, "loopback"), (addr.is_link_local, "link-local"),
                       (addr.is_unspecified, "unspecified"), (addr.is_multicast, "multicast"),
                       (addr.is_private, "private")):  # fmt: skip
        if test:
            return f"a {kind} address"
    return None if addr.is_global else "not a public address"


class DownloadCancelled(MediaError):
    """The caller no longer wants the download (``cancelled`` answered True)."""


class AddressRefused(Exception):
    """A ``public_only`` download would have connected to a non-public address."""

    def __init__(self, host: str, refused: list[str]):
        super().__init__(f"{host} resolves only to non-public addresses: {', '.join(refused)}")
        self.host, self.refused = host, refused


def _public_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """``socket.create_connection`` that connects only to a public address among those ``address``'s
    host resolves to (raises AddressRefused when there is none, the last OSError when none answers)."""
    host, port = address
    refused, error = [], None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        why = address_refusal(sockaddr[0])
        if why:
            refused.append(f"{sockaddr[0]} ({why})")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    if error is not None:
        raise error
    raise AddressRefused(host, refused)


def _check_proxied(req) -> None:
    """Through a proxy the proxy connects: refuse a target whose name resolves (here) to a non-public address."""
    host = urlsplit(req.full_url).hostname
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return  # not resolvable here: the proxy resolves it
    refused = [f"{i[4][0]} ({why})" for i in infos if (why := address_refusal(i[4][0]))]
    if refused:
        raise AddressRefused(host, refused)


def _public_handlers():
    """urllib handlers whose connections go only to public addresses (the proxy's excepted)."""
    import http.client
    import urllib.request

    class Connect:
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = self._connect

        def _connect(self, address, *args):
            if self._tunnel_host:  # to the proxy, which connects to the (checked) target
                return socket.create_connection(address, *args)
            return _public_connection(address, *args)

    class HTTPConnection(Connect, http.client.HTTPConnection):
        pass

    class HTTPSConnection(Connect, http.client.HTTPSConnection):
        pass

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            if req.has_proxy():
                _check_proxied(req)
                return self.do_open(http.client.HTTPConnection, req)
            return self.do_open(HTTPConnection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            if req._tunnel_host:
                _check_proxied(req)
            args = {"context": self._context}
            if getattr(self, "_check_hostname", None) is not None:  # Python < 3.12
                args["check_hostname"] = self._check_hostname
            return self.do_open(HTTPSConnection, req, **args)

    return [HTTPHandler, HTTPSHandler]


def _opener(max_redirects: int, public_only: bool = False):
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = max_redirects

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if urlsplit(newurl).scheme.lower() not in SCHEMES:
                raise MediaError(f"{req.full_url}: redirected to {newurl}, which is not http(s)")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # + the proxy handler reading *_PROXY; every hop of a redirect goes through the same handlers
    return urllib.request.build_opener(Redirects, *(_public_handlers() if public_only else []))


def _idna(url: str, host: str) -> str:
    """``host`` as it goes out: a non-ASCII (internationalised) name in IDNA, ``xn--...``."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise MediaError(f"{url}: malformed URL (the host name {host!r} has no IDNA form: {e})") from e


def _ascii_url(url: str) -> str:
    """``url`` as browsers send it: a non-ASCII host name in IDNA, non-ASCII characters in its path
    and query percent-encoded as UTF-8 (http.client sends ASCII only: it would send the host name
    as Latin-1 bytes in the Host header, or fail)."""
    parts = urlsplit(url)
    # Printable ASCII stays as written (so `%41` stays `%41`); spaces, control characters and
    # non-ASCII are percent-encoded: http.client refuses them.
    safe = "".join(map(chr, range(0x21, 0x7F)))
    netloc = parts.netloc
    if not netloc.isascii():
        user, at, _ = netloc.rpartition("@")
        port = "" if parts.port is None else f":{parts.port}"
        netloc = f"{quote(user, safe=safe)}{at}{_idna(url, parts.hostname)}{port}"
    return urlunsplit(parts._replace(netloc=netloc, path=quote(parts.path, safe=safe), query=quote(parts.query, safe=safe)))


def _file_name(url: str) -> str:
    """A safe local name that keeps the URL's last path segment (and so its extension)."""
    name = os.path.basename(urlsplit(url).path)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[-100:]
    return name or "download"


def download(
    url: str, folder, *, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT_S,
    total_timeout: float = TOTAL_TIMEOUT_S, max_redirects: int = MAX_REDIRECTS, public_only: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> Path:  # fmt: skip
    """Stream ``url`` into a new file in ``folder`` and return its path (see the module doc).
    On failure nothing is left in ``folder``."""
    import urllib.request

    check_url(url)
    target = Path(folder) / _file_name(url)
    request = urllib.request.Request(
        _ascii_url(url), headers={"User-Agent": f"vl3/{__version__}", "Accept": "image/*, video/*, */*;q=0.5"}
    )
    try:
        got = _stream(url, request, target, max_bytes=max_bytes, timeout=timeout, total_timeout=total_timeout,
                      max_redirects=max_redirects, public_only=public_only, cancelled=cancelled)  # fmt: skip
    except BaseException:
        target.unlink(missing_ok=True)  # no partial file left behind
        raise
    if got == 0:
        target.unlink(missing_ok=True)
        raise MediaError(f"{url}: the server sent an empty body: not an image or video")
    return target


def _stream(url: str, request, target: Path, *, max_bytes: int, timeout: float, total_timeout: float,
            max_redirects: int, public_only: bool = False, cancelled: Callable[[], bool] | None = None) -> int:  # fmt: skip
    """``download``'s transfer: the body into ``target``; returns its size in bytes."""
    import http.client
    import urllib.error

    deadline = time.monotonic() + total_timeout
    got = 0
    try:
        with _opener(max_redirects, public_only).open(request, timeout=timeout) as response:
            kind = response.headers.get_content_type() if response.headers.get("Content-Type") else ""
            if kind in WEB_PAGE_TYPES:
                raise MediaError(
                    f"{url}: not media: the server sent a web page ({kind}); link to the image or video file itself"
                )
            length = response.headers.get("Content-Length", "")
            length = int(length) if length.isdigit() else None
            if length is not None and length > max_bytes:
                raise MediaError(f"{url}: too large: {_size(length)} (the limit is {_size(max_bytes)}{SIZE_HINT})")
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):  # vl3 asks for none; a server that sends it anyway
                raise MediaError(f"{url}: the server sent the file {encoding}-encoded (Content-Encoding), "
                                 "not as the file itself")  # fmt: skip
            with open(target, "wb") as out:
                while chunk := response.read1(CHUNK):  # what has arrived: the deadline is checked often
                    if cancelled is not None and cancelled():  # asked here: a read waits at most `timeout`
                        raise DownloadCancelled(f"{url}: cancelled ({_size(got)} received)")
                    got += len(chunk)
                    if got > max_bytes:
                        raise MediaError(f"{url}: too large: more than {_size(max_bytes)} (the limit is {_size(max_bytes)}{SIZE_HINT})")
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
    except AddressRefused as e:
        raise MediaError(
            f"{url}: not downloaded: {e} (this server fetches from public addresses only; "
            "vl3 serve --allow-private-urls lifts that)"
        ) from None
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400 and urlsplit(e.url or "").scheme.lower() not in SCHEMES:
            # urllib refuses file:, data: and the like itself, before Redirects sees them
            raise MediaError(f"{url}: redirected to {e.url[:100]}, which is not http(s)") from e
        if 300 <= e.code < 400 and "infinite loop" in str(e.reason):
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
    except (OSError, http.client.HTTPException, UnicodeError, ValueError) as e:  # ValueError: a malformed redirect
        raise MediaError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    return got


_FOLDERS: set[str] = set()  # download folders in use: removed at exit, whatever thread still writes there


@atexit.register
def _remove_folders() -> None:
    """A program stopped while a reader thread downloads (Ctrl-C) leaves without waiting for it:
    its folder goes here (the exit handlers run on every exit, vl3's fast one included)."""
    for folder in list(_FOLDERS):
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def local_copy(url: str, **limits) -> Iterator[Path]:
    """Download ``url`` into a fresh temporary folder, yield the file, delete the folder after
    (also on an error, Ctrl-C, or an exit that does not wait for this thread)."""
    folder = tempfile.mkdtemp(prefix="vl3-")
    _FOLDERS.add(folder)
    try:
        yield download(url, folder, **(default_limits() | limits))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _FOLDERS.discard(folder)
