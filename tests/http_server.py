"""A local HTTP server for URL tests: 127.0.0.1, a random port, a daemon thread.

    with serve({"/cat.png": ("image/png", data)}) as base:   # base = "http://127.0.0.1:PORT"
        ...

Besides the files given, it answers the routes the download limits are tested with:
/redirect (to /cat.png), /loop, /to-ftp, /to-file, /to-data, /to-internal (to internal.example, same port), /page (HTML), /big (a huge Content-Length),
/chunked (160 KiB without a length), /short (less than its Content-Length), /stall (then
silence), /trickle (64 bytes every 20 ms for 4 s); anything else is a 404. Proxy variables
are cleared while it runs, so the client talks to it directly.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901 - one branch per route
        files, release = self.server.files, self.server.release
        path = posixpath.normpath(urlsplit(self.path).path)  # /a/../clip.mp4?x=1 -> /clip.mp4
        try:
            if path in files:
                ctype, body = files[path]
                self.send(200, body, ctype)
            elif path == "/redirect":
                self.send(302, Location="/cat.png")
            elif path == "/loop":
                self.send(302, Location="/loop")
            elif path == "/to-internal":
                self.send(302, Location=f"http://internal.example:{self.server.server_port}/cat.png")
            elif path == "/to-ftp":
                self.send(302, Location=f"ftp://127.0.0.1:{self.server.server_port}/cat.png")
            elif path == "/to-file":
                self.send(302, Location="file:///etc/passwd")
            elif path == "/to-data":
                self.send(302, Location="data:image/png;base64,iVBORw0KGgo=")
            elif path == "/page":
                self.send(200, b"<!doctype html><title>a cat</title><img src=cat.png>", "text/html; charset=utf-8")
            elif path == "/big":  # says it is huge; the client must not start reading
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
            elif path == "/chunked":  # no length given: 160 KiB in chunks
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"4000\r\n" + b"\0" * 0x4000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/short":  # promises 10000 bytes, sends 100, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "10000")
                self.end_headers()
                self.wfile.write(b"\0" * 100)
                self.close_connection = True
            elif path == "/stall":  # headers and a little data, then silence
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"\0" * 1000)
                self.wfile.flush()
                release.wait(5)
            elif path == "/gzipped":  # a file served compressed though nobody asked for it
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Encoding", "gzip")
                body = gzip.compress(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/trickle":  # never idle long, done after 4 s (or when released)
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(200):
                    if release.wait(0.02):
                        break
                    self.wfile.write(b"\0" * 64)
                    self.wfile.flush()
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass


@contextmanager
def serve(files: dict[str, tuple[str, bytes]]):
    """Serve ``files`` ({route: (content type, body)}) and the test routes; yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.release = threading.Event()
    httpd.files = files
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    saved = {k: os.environ.pop(k) for k in PROXY_VARIABLES if k in os.environ}
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        os.environ.update(saved)
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
