"""A local stand-in for the Hugging Face Hub: what `huggingface_hub` asks of it to download a repo.

    with serve_repo("acme/tiny-vl3", folder) as hub:    # hub.endpoint = "http://127.0.0.1:PORT"
        os.environ["HF_ENDPOINT"] = hub.endpoint         # then vl3 -m acme/tiny-vl3 downloads it

One repo at one commit (`hub.commit`), its files those of `folder`, answered as the Hub answers:
the endpoint's root (reachability), `/api/models/<repo>/revision/<rev>` and `.../tree/<commit>`
(the listing, with LFS sizes and sha256 for safetensors), and `/<repo>/resolve/<rev>/<file>` (HEAD
with the commit, ETag and size; GET with ranges). `hub.stall` makes every weight file stop half
way until the server closes (a download in progress, for interrupting it); `hub.corrupt` serves
weight files with one byte changed (the listing and ETag still those of the right content).
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "c0ffee" + "0" * 34


class FakeHub:
    def __init__(self, repo: str, folder: Path):
        self.repo, self.commit = repo, COMMIT
        self.files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        self.stall = False
        self.corrupt = False
        self.stalled = threading.Event()  # set once a stalled body has started
        self.closing = threading.Event()
        self.endpoint = ""

    def entry(self, name: str) -> dict:
        data = self.files[name]
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry = {"type": "file", "oid": git, "size": len(data), "path": name}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def _json(self, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", self.hub.commit)
        self.end_headers()
        self.wfile.write(body)

    def _missing(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        api = f"/api/models/{hub.repo}/"
        if path == "/":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith(api + "revision/"):
            self._json({"id": hub.repo, "sha": hub.commit, "siblings": [{"rfilename": n} for n in hub.files]})
        elif path.startswith(api + "tree/"):
            self._json([hub.entry(n) for n in hub.files])
        elif path.startswith(f"/{hub.repo}/resolve/"):
            name = path.split("/", 5)[-1]
            if name not in hub.files:
                self._missing()
                return
            self._file(name, body)
        else:
            self._missing()

    def _file(self, name: str, body: bool) -> None:
        hub, data = self.hub, self.hub.files[name]
        entry = hub.entry(name)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("X-Repo-Commit", hub.commit)
        self.send_header("ETag", f'"{etag}"')
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if not body:
            return
        if hub.corrupt and name.endswith(".safetensors"):
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
        if hub.stall and name.endswith(".safetensors"):
            self.wfile.write(data[start : start + len(data) // 2])
            self.wfile.flush()
            hub.stalled.set()
            hub.closing.wait()  # the rest never comes while the test runs
            return
        self.wfile.write(data[start:])


@contextmanager
def serve_repo(repo: str, folder: Path):
    hub = FakeHub(repo, folder)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.closing.set()
        server.shutdown()
        server.server_close()
