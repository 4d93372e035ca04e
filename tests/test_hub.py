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
    """huggingface_hub's download functions replaced by fakes that record their calls: (folder,
    calls, plan, block): `plan` lists the (name, size) a dry run reports (size 0: cached); with `block` set the
    download hangs until the test ends."""
    import threading

    import huggingface_hub
    from huggingface_hub import DryRunFileInfo

    calls = []
    repo = tmp_path / "remote" / "snapshots" / COMMIT  # the cache's layout: a snapshot per commit
    repo.mkdir(parents=True)

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False):
        calls.append(("file", repo_id, filename, revision))
        if not (repo / filename).exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(repo / filename)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, dry_run=False,
                          tqdm_class=None):
        if dry_run:  # the plan: what a download would add (the test sets `plan`)
            calls.append(("plan", repo_id, revision, allow_patterns))
            return [DryRunFileInfo(revision, size, name, str(repo / name), size == 0, size != 0) for name, size in plan]
        calls.append(("snapshot", repo_id, revision, allow_patterns))
        if block.is_set():
            release.wait(30)
        return str(repo)

    plan: list[tuple[str, int]] = []
    block, release = threading.Event(), threading.Event()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("vl3cli.hub._reachable", lambda endpoint: True)
    yield repo, calls, plan, block
    release.set()


def test_download_checks_the_config_before_fetching_weights(fake_hub):
    repo, calls, _, _ = fake_hub
    (repo / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="acme/bert: model_type 'bert'"):
        resolve_model("acme/bert")
    assert [c[0] for c in calls] == ["file"]  # no snapshot (no weights) was fetched
    calls.clear()
    (repo / "config.json").write_text(CONFIG)
    assert resolve_model("acme/vl3", revision="v1") == repo
    # the snapshot of the commit whose config.json was checked, not whatever "v1" names a moment later
    assert calls == [("file", "acme/vl3", "config.json", "v1"), ("plan", "acme/vl3", COMMIT, ALLOW_PATTERNS),
                     ("snapshot", "acme/vl3", COMMIT, ALLOW_PATTERNS)]


def test_repo_without_config_json(fake_hub):
    with pytest.raises(ConfigError, match="acme/empty has no config.json"):
        resolve_model("acme/empty")


def test_on_config_runs_before_any_weight_is_fetched(fake_hub):
    repo, calls, _, _ = fake_hub
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

    repo, calls, _, _ = fake_hub
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


def test_a_model_over_the_size_limit_is_refused_before_any_weight(fake_hub, monkeypatch):
    """The dry run's sizes of the files to fetch (2.5 + 1.5 GB) against VL3_MAX_MODEL_GB: 3 GB is
    refused before the download starts, 5 GB lets it through."""
    repo, calls, plan, _ = fake_hub
    (repo / "config.json").write_text(CONFIG)
    plan += [("model-1.safetensors", 2_500_000_000), ("model-2.safetensors", 1_500_000_000)]
    monkeypatch.setattr("vl3cli.hub.shutil.disk_usage", lambda path: __import__("shutil")._ntuple_diskusage(0, 0, 10**13))
    monkeypatch.setenv("VL3_MAX_MODEL_GB", "3")
    with pytest.raises(ModelNotFoundError, match=r"acme/vl3 would download 4\.00 GB, more than the 3\.00 GB limit"):
        resolve_model("acme/vl3")
    assert [c[0] for c in calls] == ["file", "plan"]
    monkeypatch.setenv("VL3_MAX_MODEL_GB", "5")
    assert resolve_model("acme/vl3") == repo and calls[-1][0] == "snapshot"


def test_a_model_larger_than_the_free_disk_is_refused_before_any_weight(fake_hub, monkeypatch, tmp_path):
    repo, calls, plan, _ = fake_hub
    (repo / "config.json").write_text(CONFIG)
    plan += [("model.safetensors", 4_000_000_000), ("config.json", 900)]
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        return __import__("shutil")._ntuple_diskusage(10**12, 10**12 - 3_000_000_000, 3_000_000_000)

    monkeypatch.setattr("vl3cli.hub.shutil.disk_usage", disk_usage)
    with pytest.raises(ModelNotFoundError, match=r"acme/vl3 needs 4\.00 GB and .* has 3\.00 GB free"):
        resolve_model("acme/vl3")
    assert [c[0] for c in calls] == ["file", "plan"]
    assert seen and seen[0].exists()  # the nearest existing folder of the cache


@pytest.mark.parametrize("name, value", [("VL3_MAX_MODEL_GB", "0"), ("VL3_MAX_MODEL_GB", "lots"),
                                         ("VL3_MODEL_DOWNLOAD_TIMEOUT", "-5"), ("VL3_MODEL_DOWNLOAD_TIMEOUT", "nan")])
def test_bad_model_download_limits_are_usage_errors(fake_hub, monkeypatch, name, value):
    from vl3cli.errors import UsageError

    repo, calls, _, _ = fake_hub
    (repo / "config.json").write_text(CONFIG)
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=f"{name} must be a positive number"):
        resolve_model("acme/vl3")
    assert calls == []  # nothing was asked of the Hub


def test_a_download_past_its_time_limit_ends_with_one_line(fake_hub, monkeypatch):
    """A download that never finishes (a fake that blocks) ends after VL3_MODEL_DOWNLOAD_TIMEOUT."""
    import time

    from vl3cli import hub

    repo, calls, plan, block = fake_hub
    (repo / "config.json").write_text(CONFIG)
    plan.append(("model.safetensors", 1000))
    block.set()
    monkeypatch.setenv("VL3_MODEL_DOWNLOAD_TIMEOUT", "0.5")
    monkeypatch.setattr(hub, "ABANDONED", __import__("threading").Event())  # not the process's own flag
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=r"the download of acme/vl3 did not finish within 0.5 s") as e:
        resolve_model("acme/vl3")
    assert 0.5 <= time.monotonic() - start < 5 and "\n" not in str(e.value)
    assert "VL3_MODEL_DOWNLOAD_TIMEOUT" in str(e.value) and hub.ABANDONED.is_set()


def test_the_default_time_limit_grows_with_the_download(fake_hub, monkeypatch):
    """No VL3_MODEL_DOWNLOAD_TIMEOUT: 600 s plus a second per MB to fetch (1 MB/s at least)."""
    from vl3cli import hub

    repo, calls, plan, _ = fake_hub
    (repo / "config.json").write_text(CONFIG)
    plan += [("model.safetensors", 3_000_000_000), ("tokenizer.json", 7_000_000)]
    limits = []
    waited = hub._waited

    def spy(call, *args, timeout=None, **kwargs):
        limits.append(timeout)
        return waited(call, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(hub, "_waited", spy)
    monkeypatch.setattr("vl3cli.hub.shutil.disk_usage", lambda path: __import__("shutil")._ntuple_diskusage(0, 0, 10**13))
    resolve_model("acme/vl3")
    assert limits == [None, None, 600 + 3007]  # config.json, the plan, the download


def test_model_download_limits_end_to_end(checkpoints, tmp_path):
    """The real huggingface_hub against a local Hub: a model over VL3_MAX_MODEL_GB is refused and
    no weight file reaches the cache; a download that stalls ends at VL3_MODEL_DOWNLOAD_TIMEOUT
    with one error line (huggingface_hub's own read timeout is 10 s, longer than this limit)."""
    import subprocess
    import sys
    import time

    from fake_hub import serve_repo
    from media_factory import make_image

    image = make_image(tmp_path / "a.png", size=(32, 32))
    args = [sys.executable, "-m", "vl3cli", "describe", str(image), "--max-new-tokens", "4", "-m", "acme/tiny-vl3"]
    folder = checkpoints["hf-sharded"]
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    with serve_repo("acme/tiny-vl3", folder) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        big = subprocess.run(args, env={**env, "VL3_MAX_MODEL_GB": str(weights / 2 / 1e9)},
                             capture_output=True, text=True, timeout=120)
        blobs = tmp_path / "hf" / "hub" / "models--acme--tiny-vl3" / "blobs"
        sizes = sorted(p.stat().st_size for p in blobs.iterdir())
        hub.stall = True
        start = time.monotonic()
        slow = subprocess.run(args, env={**env, "VL3_MODEL_DOWNLOAD_TIMEOUT": "2"}, capture_output=True, text=True,
                              timeout=120)
        took = time.monotonic() - start
    assert big.returncode == 1 and big.stdout == "" and "Traceback" not in big.stderr
    error = big.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: acme/tiny-vl3 would download ") and "VL3_MAX_MODEL_GB" in error, big.stderr
    assert sizes == [(folder / "config.json").stat().st_size]  # only config.json came
    assert slow.returncode == 1 and slow.stdout == "" and "Traceback" not in slow.stderr and took < 30
    error = slow.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: the download of acme/tiny-vl3 did not finish within 2 s"), slow.stderr


def test_a_model_the_cache_holds_whole_costs_one_listing(fake_hub, monkeypatch):
    """Online, with every file cached (the dry run would download nothing): the snapshot is taken
    from the cache (local_files_only), not listed a second time on the Hub; with one file to
    fetch, it downloads."""
    from vl3cli import hub

    repo, calls, plan, _ = fake_hub
    (repo / "config.json").write_text(CONFIG)
    local = []
    waited = hub._waited

    def spy(call, *args, **kwargs):
        if not kwargs.get("dry_run") and "allow_patterns" in kwargs:
            local.append(kwargs["local_files_only"])
        return waited(call, *args, **kwargs)

    monkeypatch.setattr(hub, "_waited", spy)
    plan += [("model.safetensors", 0), ("config.json", 0)]
    resolve_model("acme/vl3")
    plan.append(("tokenizer.json", 5000))
    resolve_model("acme/vl3")
    assert local == [True, False]
