"""hub.py: local folders, the offline Hub cache, revisions, download filters and errors."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

from vl3cli.errors import ConfigError, ModelNotFoundError
from vl3cli.hub import ALLOW_PATTERNS, resolve_model

CONFIG = (Path(__file__).parent / "data" / "VideoLLaMA3-2B-Image-HF.config.json").read_text()
MAIN = "a" * 40
V1 = "b" * 40


def cached_repo(cache: Path, repo: str, refs: dict[str, str], config: str = CONFIG) -> dict[str, Path]:
    """A Hub cache entry laid out as huggingface_hub writes it (refs/, snapshots/<commit>/)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snaps = {}
    for ref, commit in refs.items():
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text(config)
        snaps[ref] = snap
    return snaps


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_cache_resolves_branch_and_revision(offline):
    snaps = cached_repo(offline, "acme/tiny-vl3", {"main": MAIN, "v1": V1})
    assert resolve_model("acme/tiny-vl3") == snaps["main"]
    assert resolve_model("acme/tiny-vl3", revision="v1") == snaps["v1"]
    assert resolve_model("acme/tiny-vl3", revision=V1) == snaps["v1"]


def test_offline_and_not_cached(offline):
    with pytest.raises(ModelNotFoundError, match=r"acme/absent is not in the Hub cache .* HF_HUB_OFFLINE"):
        resolve_model("acme/absent")
    cached_repo(offline, "acme/tiny-vl3", {"main": MAIN})
    with pytest.raises(ModelNotFoundError, match="revision v2"):
        resolve_model("acme/tiny-vl3", revision="v2")


def test_cached_repo_that_is_not_videollama3_is_a_config_error(offline):
    cached_repo(offline, "acme/llama", {"main": MAIN}, config='{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="acme/llama: model_type 'llama' is not a VideoLLaMA3 checkpoint"):
        resolve_model("acme/llama")


def test_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(CONFIG)
    assert resolve_model("ckpt") == Path("ckpt")
    assert resolve_model(str(tmp_path / "ckpt")) == tmp_path / "ckpt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: .*no config.json"):
        resolve_model("empty")
    (tmp_path / "file.safetensors").write_text("")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model("file.safetensors")
    for path in ("./missing", "/no/such/dir", "a/b/c", "~/nope-vl3"):
        with pytest.raises(ModelNotFoundError, match="no such folder"):
            resolve_model(path)


def test_download_filter_takes_only_what_vl3_reads():
    def wanted(name):
        return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)

    for name in ("config.json", "model.safetensors", "model-00001-of-00004.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "special_tokens_map.json", "generation_config.json", "preprocessor_config.json", "chat_template.jinja"):  # fmt: skip
        assert wanted(name), name
    for name in ("modeling_videollama3.py", "pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt", "README.md", ".gitattributes"):
        assert not wanted(name), name


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub's download functions replaced by fakes that record their calls."""
    import huggingface_hub

    calls = []
    repo = tmp_path / "remote" / "snapshots" / COMMIT  # the cache's layout: a snapshot per commit
    repo.mkdir(parents=True)

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False):
        calls.append(("file", repo_id, filename, revision))
        if not (repo / filename).exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(repo / filename)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append(("snapshot", repo_id, revision, allow_patterns))
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("vl3cli.hub._reachable", lambda endpoint: True)
    return repo, calls


def test_download_checks_the_config_before_fetching_weights(fake_hub):
    repo, calls = fake_hub
    (repo / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="acme/bert: model_type 'bert'"):
        resolve_model("acme/bert")
    assert [c[0] for c in calls] == ["file"]  # no snapshot (no weights) was fetched
    calls.clear()
    (repo / "config.json").write_text(CONFIG)
    assert resolve_model("acme/vl3", revision="v1") == repo
    # the snapshot of the commit whose config.json was checked, not whatever "v1" names a moment later
    assert calls == [("file", "acme/vl3", "config.json", "v1"), ("snapshot", "acme/vl3", COMMIT, ALLOW_PATTERNS)]


def test_repo_without_config_json(fake_hub):
    with pytest.raises(ConfigError, match="acme/empty has no config.json"):
        resolve_model("acme/empty")


def test_on_config_runs_before_any_weight_is_fetched(fake_hub):
    repo, calls = fake_hub
    (repo / "config.json").write_text(CONFIG)

    def refuse(folder):
        assert [c[0] for c in calls] == ["file"]
        raise ConfigError("no")

    with pytest.raises(ConfigError):
        resolve_model("acme/vl3", on_config=refuse)
    assert [c[0] for c in calls] == ["file"]


@pytest.fixture
def counting_server():
    """A TCP server on 127.0.0.1 that counts connections and closes each at once (a broken network)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    count = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            count.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", count
    server.close()


def test_unreachable_hub_fails_at_once_without_retries(counting_server, tmp_path):
    """One request finds the Hub unreachable; then the cache decides: no retry loop, one line."""
    import subprocess
    import sys

    endpoint, count = counting_server
    env = {**__import__("os").environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    env.pop("VL3_DEBUG", None)
    (tmp_path / "a.png").write_bytes(b"x")
    p = subprocess.run([sys.executable, "-m", "vl3cli", "describe", "a.png", "-m", "acme/notcached"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"Error: cannot reach {endpoint} and acme/notcached is not in the Hub cache")
    assert len(count) <= 2  # one request (its client may reconnect once on a reset); the retry loop would make 6


def test_unreachable_hub_uses_the_cache(counting_server, tmp_path, monkeypatch):
    from huggingface_hub import constants

    endpoint, count = counting_server
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snaps = cached_repo(tmp_path, "acme/tiny-vl3", {"main": MAIN})
    assert resolve_model("acme/tiny-vl3") == snaps["main"]
    assert len(count) <= 2


@pytest.mark.parametrize(
    "raised, fragment",
    [
        (TimeoutError("timed out"), "cannot download acme/vl3: TimeoutError: timed out"),  # the HTTP client's own errors
        (ValueError("Invalid filename '../x.json'"), "cannot download acme/vl3: ValueError: Invalid filename"),
        ("missing", "cannot download acme/vl3: model.safetensors not in acme/vl3"),  # not "has no config.json"
        ("http 500", "cannot download acme/vl3: 500 Server Error"),  # not "cannot reach": the Hub answered
    ],
)
def test_a_failing_snapshot_is_one_line_naming_what_failed(fake_hub, monkeypatch, raised, fragment):
    """config.json came and was checked; the snapshot then fails: one ModelNotFoundError line
    that says what happened, whatever huggingface_hub or its HTTP client raised."""
    import huggingface_hub
    import requests

    repo, calls = fake_hub
    (repo / "config.json").write_text(CONFIG)

    def snapshot_download(*args, **kwargs):
        if raised == "missing":
            raise huggingface_hub.errors.EntryNotFoundError("model.safetensors not in acme/vl3")
        if raised == "http 500":
            response = requests.Response()
            response.status_code = 500
            try:
                raise huggingface_hub.errors.HfHubHTTPError("500 Server Error: Internal Server Error", response=response)
            except huggingface_hub.errors.HfHubHTTPError as e:
                raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the cache") from e
        raise raised

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("acme/vl3")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_retry_warnings_stay_quiet_once_the_hub_library_is_imported():
    """huggingface_hub sets its logger's level when first imported (a fresh interpreter: here it
    would be imported already); the quiet level must hold while vl3 downloads."""
    import subprocess
    import sys

    code = ("import logging\nfrom vl3cli.hub import _quiet_hub\nwith _quiet_hub():\n"
            "    import huggingface_hub.file_download\n"
            "    print(logging.getLogger('huggingface_hub').getEffectiveLevel())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VL3_DEBUG"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0 and int(p.stdout) >= 40, (p.stdout, p.stderr)  # logging.ERROR


def test_ctrl_c_during_a_model_download_exits_at_once_and_the_next_run_downloads_it(checkpoints, tmp_path):
    """A model fetched from a Hub (a local stand-in speaking its protocol to the real
    huggingface_hub): Ctrl-C while the weight files are coming ends vl3 at once (the download's
    pool would otherwise finish every file first: here, never); the next run downloads the model
    and answers as the same checkpoint read from its folder does."""
    import signal
    import subprocess
    import sys
    import time

    from fake_hub import serve_repo
    from media_factory import make_image

    folder = checkpoints["hf-sharded"]
    image = make_image(tmp_path / "a.png", size=(32, 32))
    args = [sys.executable, "-m", "vl3cli", "describe", str(image), "--max-new-tokens", "4", "-m"]
    with serve_repo("acme/tiny-vl3", folder) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        hub.stall = True
        p = subprocess.Popen([*args, "acme/tiny-vl3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert hub.stalled.wait(120), "no weight file was requested"
            start = time.monotonic()
            p.send_signal(signal.SIGINT)
            _, stderr = p.communicate(timeout=30)
        finally:
            p.kill()
        assert p.returncode == 130 and time.monotonic() - start < 5, stderr
        assert "Traceback" not in stderr
        hub.stall = False
        downloaded = subprocess.run([*args, "acme/tiny-vl3"], env=env, capture_output=True, text=True, timeout=120)
    assert downloaded.returncode == 0, downloaded.stderr
    local = subprocess.run([*args, str(folder)], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0 and downloaded.stdout == local.stdout != ""


def test_a_corrupt_download_is_refused_removed_and_fetched_again(checkpoints, tmp_path):
    """A weight file whose bytes do not match the sha256 the Hub lists (right length, one byte
    changed in transfer): one error line, nothing corrupt left in the cache (huggingface_hub checks
    only the length); the next run downloads it again and answers."""
    import subprocess
    import sys

    from fake_hub import serve_repo
    from media_factory import make_image

    image = make_image(tmp_path / "a.png", size=(32, 32))
    args = [sys.executable, "-m", "vl3cli", "describe", str(image), "--max-new-tokens", "4", "-m", "acme/tiny-vl3"]
    with serve_repo("acme/tiny-vl3", checkpoints["hf-sharded"]) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        hub.corrupt = True
        bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        blobs = tmp_path / "hf" / "hub" / "models--acme--tiny-vl3" / "blobs"
        left = {p.name: p.read_bytes() for p in blobs.iterdir()}
        hub.corrupt = False
        good = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    error = bad.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: the download of acme/tiny-vl3's model-0000") and "corrupt" in error, bad.stderr
    assert "Traceback" not in bad.stderr
    import hashlib

    for name, data in left.items():  # whatever stays in the cache is what its name says
        if len(name) == 64:
            assert hashlib.sha256(data).hexdigest() == name
    assert good.returncode == 0 and good.stdout.strip() != "", good.stderr
