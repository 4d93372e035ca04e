"""URLs: a local HTTP server on 127.0.0.1 (random port) serves files, errors and slow bodies.

A URL's pixels must equal the local file's; every failure is one line naming the URL; no
temporary file outlives the call; limits and timeouts are small test parameters, so nothing
here waits more than a fraction of a second.
"""

from __future__ import annotations

import socket
import tempfile
import time

import numpy as np
import pytest
import torch
from http_server import serve
from media_factory import make_image, make_video

from vl3cli import fetch
from vl3cli.errors import MediaError, UsageError
from vl3cli.preprocess import MediaOptions, ProcessorConfig, prepare_visual

CONFIG = ProcessorConfig()


@pytest.fixture(scope="module")
def media_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("served")
    noise = d / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return {
        "cat.png": make_image(d / "cat.png", size=(80, 60)),
        "clip.mp4": make_video(d / "clip.mp4", seconds=2.0, fps=10),
        "noise.bin": noise,
    }


@pytest.fixture(scope="module")
def server(media_files):
    types = {"cat.png": "image/png", "clip.mp4": "video/mp4", "noise.bin": "application/octet-stream"}
    with serve({f"/{name}": (types[name], path.read_bytes()) for name, path in media_files.items()}) as base:
        yield base


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The folder tempfile uses, to check that downloads leave nothing behind."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.mark.parametrize("name,route", [("cat.png", "/cat.png"), ("clip.mp4", "/clip.mp4"), ("cat.png", "/redirect")])
def test_url_equals_local_file(server, media_files, temp_root, name, route):
    url = server + route
    remote = prepare_visual(url, CONFIG, MediaOptions())
    local = prepare_visual(media_files[name], CONFIG, MediaOptions())
    assert remote.path == url and remote.kind == local.kind
    assert torch.equal(remote.pixel_values, local.pixel_values)
    assert (remote.grid_thw, remote.timestamps, remote.source_width) == (
        local.grid_thw,
        local.timestamps,
        local.source_width,
    )
    assert list(temp_root.iterdir()) == []  # the temporary copy is gone


def test_url_that_is_not_media_names_the_url(server, temp_root):
    url = server + "/noise.bin"
    with pytest.raises(MediaError) as info:
        prepare_visual(url, CONFIG, MediaOptions())
    assert str(info.value).startswith(f"{url}: not an image or video") and str(temp_root) not in str(info.value)
    assert list(temp_root.iterdir()) == []  # deleted on error too


@pytest.mark.parametrize(
    "route,limits,fragment",
    [
        ("/missing", {}, "HTTP 404 Not Found"),
        ("/page", {}, "not media: the server sent a web page (text/html)"),
        # the command line's wording: its setting is VL3_MAX_DOWNLOAD_MB (the server names its own)
        ("/big", {"max_bytes": 1000}, "too large: 931.3 GiB (the limit is 1,000 bytes; raise VL3_MAX_DOWNLOAD_MB)"),
        ("/chunked", {"max_bytes": 64 * 1024}, "too large: more than 64.0 KiB (the limit is 64.0 KiB; raise VL3_MAX_DOWNLOAD_MB)"),
        ("/stall", {"timeout": 0.2}, "timed out: no data for 0.2 s"),
        ("/trickle", {"total_timeout": 0.3}, "timed out: the download took more than 0.3 s"),
        ("/short", {}, "closed the connection after 100 bytes"),
        ("/loop", {}, "too many redirects"),
        ("/to-ftp", {}, "which is not http(s)"),
        ("/to-file", {}, "redirected to file:///etc/passwd, which is not http(s)"),
        ("/to-data", {}, "redirected to data:image/png;base64,iVBORw0KGgo=, which is not http(s)"),
    ],
)  # fmt: skip
def test_download_errors_are_one_line(server, tmp_path, route, limits, fragment):
    url = server + route
    start = time.monotonic()
    with pytest.raises(MediaError) as info:
        fetch.download(url, tmp_path, **limits)
    message = str(info.value)
    assert message.startswith(f"{url}: ") and fragment in message and "\n" not in message, message
    assert time.monotonic() - start < 2  # the limits ended it, not the server nor a default timeout
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_a_cancelled_download_stops_between_reads(server, tmp_path):
    """/trickle sends 64 bytes every 20 ms for 4 s: the download ends at the first read after
    `cancelled` turns true, not at the end of the body nor at a timeout."""
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 3

    start = time.monotonic()
    with pytest.raises(fetch.DownloadCancelled, match=r"/trickle: cancelled \(\d+ bytes received\)"):
        fetch.download(server + "/trickle", tmp_path, cancelled=cancelled)
    assert time.monotonic() - start < 2 and len(asked) == 4
    assert list(tmp_path.iterdir()) == []


def test_a_non_ascii_path_is_sent_percent_encoded(media_files, tmp_path):
    data = media_files["cat.png"].read_bytes()
    with serve({"/caf%C3%A9.png": ("image/png", data)}) as base:  # what a browser requests for /café.png
        assert fetch.download(base + "/café.png", tmp_path).read_bytes() == data


def test_an_internationalised_host_name_goes_out_in_idna(media_files, tmp_path, monkeypatch):
    """例え.jp is asked for as Python's IDNA codec writes it (xn--...), both the name resolved and the
    Host header, as browsers do: the same download as its ASCII spelling."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from http_server import PROXY_VARIABLES

    data, hosts, resolved = media_files["cat.png"].read_bytes(), [], []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    real_resolve = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):  # every IDNA name is this machine
        resolved.append(host)
        return real_resolve("127.0.0.1" if host.startswith("xn--") else host, port, *args, **kwargs)

    monkeypatch.setattr(fetch.socket, "getaddrinfo", resolve)
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            for name in ("例え.jp", "bücher.example"):
                idna = name.encode("idna").decode("ascii")
                got = fetch.download(f"http://{name}:{httpd.server_port}/cat.png", tmp_path)
                assert got.read_bytes() == data and (resolved[-1], hosts[-1]) == (idna, f"{idna}:{httpd.server_port}")
                got.unlink()
        finally:
            httpd.shutdown()
    assert [n.encode("idna") for n in ("例え.jp", "bücher.example")] == [b"xn--r8jz45g.jp", b"xn--bcher-kva.example"]


def test_unreachable_host(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match=rf"^http://127\.0\.0\.1:{port}/x\.jpg: cannot connect \(.*refused"):
        fetch.download(f"http://127.0.0.1:{port}/x.jpg", tmp_path)


def test_limits_from_the_environment(server, monkeypatch, temp_root):
    monkeypatch.setenv("VL3_MAX_DOWNLOAD_MB", "0.001")  # 1 KiB: the clip is larger
    with pytest.raises(MediaError, match="too large.*VL3_MAX_DOWNLOAD_MB"):
        prepare_visual(server + "/clip.mp4", CONFIG, MediaOptions())
    assert list(temp_root.iterdir()) == []
    for bad in ("lots", "inf", "nan", "0"):
        monkeypatch.setenv("VL3_MAX_DOWNLOAD_MB", bad)
        with pytest.raises(UsageError, match="VL3_MAX_DOWNLOAD_MB must be a positive number"):
            prepare_visual(server + "/clip.mp4", CONFIG, MediaOptions())


def test_a_space_in_a_url_is_sent_percent_encoded(media_files, tmp_path):
    data = media_files["cat.png"].read_bytes()
    with serve({"/my%20cat.png": ("image/png", data)}) as base:
        assert fetch.download(base + "/my cat.png", tmp_path).read_bytes() == data
        (tmp_path / "b").mkdir()
        assert fetch.download(base + "/my%20cat.png", tmp_path / "b").read_bytes() == data  # written encoded: as is


def test_a_compressed_body_is_named_not_taken_for_the_file(server, tmp_path):
    with pytest.raises(MediaError, match=r"/gzipped: the server sent the file gzip-encoded"):
        fetch.download(server + "/gzipped", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_exit_that_does_not_wait_for_a_download_removes_its_folder(server, temp_root):
    """A reader thread still downloading when the program leaves (Ctrl-C: vl3 exits without
    joining it) does not leave its temporary folder: the exit handlers remove it."""
    import threading

    done = threading.Event()

    def reader():
        try:
            with fetch.local_copy(server + "/trickle"):
                pass
        except (MediaError, OSError):
            pass
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + 10
    while not fetch._FOLDERS:  # the folder made and registered (made an instant before)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert any(temp_root.iterdir())
    fetch._remove_folders()  # what atexit runs
    assert list(temp_root.iterdir()) == []
    assert done.wait(timeout=10)  # the reader ends on its own once the body does


@pytest.mark.parametrize(
    "text,fragment",
    [("s3://bucket/cat.jpg", "s3:// URLs are not supported"), ("ftp://host/cat.jpg", "ftp:// URLs"),
     ("https:///cat.jpg", "no host name"), ("http://host:99999/cat.jpg", "malformed URL"),
     ("http://[::1/cat.jpg", "malformed URL"), ("http://a..例え.jp/cat.jpg", r"host name 'a\.\.例え\.jp' has no IDNA form"),
     ("http://" + "é" * 64 + ".fr/cat.jpg", "has no IDNA form")],
)  # fmt: skip
def test_check_url(text, fragment):
    assert fetch.is_url(text)
    with pytest.raises(MediaError, match=fragment):
        fetch.check_url(text)


def test_is_url():
    assert fetch.is_url("https://example.com/cat.jpg") and fetch.is_url("HTTP://example.com/a.mp4")
    for path in ("cat.jpg", "/data/a:b.mp4", "C:\\videos\\a.mp4", "dir/https://x"):
        assert not fetch.is_url(path)
    fetch.check_url("https://example.com:8443/videos/cat.mp4?x=1")  # fine as it is


@pytest.mark.parametrize("ip,kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("100.64.0.1", "not a public"), ("198.18.0.1", "private"),
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])  # fmt: skip
def test_address_refusal_follows_the_special_purpose_registries(ip, kind):
    """RFC 1918 / 4193 private, RFC 3927 / 4291 link-local, 6598 shared (100.64/10), 2544 benchmarking."""
    why = fetch.address_refusal(ip)
    assert why is None if kind is None else kind in why


@pytest.fixture
def names(monkeypatch):
    """Made-up names: media.example -> 127.0.0.1, which the policy is told to take for a public
    address (the only server a test can reach), internal.example -> 10.0.0.1, a private one, and
    public.example -> 8.8.8.8 (reachable here only through a proxy). Returns the real policy."""
    real_resolve, real_refusal = socket.getaddrinfo, fetch.address_refusal
    table = {"media.example": "127.0.0.1", "internal.example": "10.0.0.1", "public.example": "8.8.8.8"}

    def resolve(host, port, *args, **kwargs):
        return real_resolve(table.get(host, host), port, *args, **kwargs)

    monkeypatch.setattr(fetch.socket, "getaddrinfo", resolve)
    monkeypatch.setattr(fetch, "address_refusal", lambda ip: None if ip == "127.0.0.1" else real_refusal(ip))
    return real_refusal


def test_public_only_never_connects_to_a_loopback_address(tmp_path):
    with socket.socket() as listener:  # a server that would see any connection attempt
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
        with pytest.raises(MediaError) as info:
            fetch.download(url, tmp_path, public_only=True)
        with pytest.raises(TimeoutError):
            listener.accept()
    message = str(info.value)
    assert message.startswith(f"{url}: not downloaded: 127.0.0.1 ") and "127.0.0.1 (a loopback address)" in message
    assert "--allow-private-urls" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_public_only_checks_every_redirect(server, names, media_files, tmp_path):
    base = server.replace("127.0.0.1", "media.example")
    got = fetch.download(base + "/redirect", tmp_path, public_only=True)  # a public host, redirected within itself
    assert got.read_bytes() == media_files["cat.png"].read_bytes()
    got.unlink()
    with pytest.raises(MediaError) as info:  # then a hop to a private address: refused before connecting
        fetch.download(base + "/to-internal", tmp_path, public_only=True, timeout=2)
    message = str(info.value)
    assert message.startswith(f"{base}/to-internal: not downloaded: internal.example ") and "10.0.0.1 (a private address)" in message
    assert list(tmp_path.iterdir()) == []


def test_public_only_through_a_proxy_checks_the_target_not_the_proxy(server, names, media_files, tmp_path, monkeypatch):
    """The test server also answers as a plain HTTP proxy (it serves the path of an absolute URL)."""
    monkeypatch.setattr(fetch, "address_refusal", names)  # the real policy: the proxy itself is loopback
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server)
    port = server.rsplit(":", 1)[1]
    got = fetch.download(f"http://public.example:{port}/cat.png", tmp_path, public_only=True)
    assert got.read_bytes() == media_files["cat.png"].read_bytes()
    got.unlink()
    with pytest.raises(MediaError, match=r"internal\.example .*10\.0\.0\.1 \(a private address\)"):
        fetch.download(f"http://internal.example:{port}/cat.png", tmp_path, public_only=True)
    assert list(tmp_path.iterdir()) == []
