"""Model id or local path -> local checkpoint folder.

A local folder is used as is. Anything else is a Hugging Face Hub repo id, fetched with
`huggingface_hub.snapshot_download` into the ordinary Hub cache (`HF_HOME` / `HF_HUB_CACHE`),
downloading only what vl3 reads: JSON configs, safetensors weights and tokenizer / template
files. Remote code (`*.py`) and pickle weights (`*.bin`, `*.pt`, ...) are never fetched.
`HF_HUB_OFFLINE=1` resolves from the cache only; `HF_TOKEN` authenticates; `revision` picks a
branch, tag or commit. huggingface_hub shows its download progress bars on stderr; its retry
warnings only with `VL3_DEBUG=1`. When the Hub does not answer a first request within
`PROBE_TIMEOUT_S`, the cache is used as if offline, so a machine without network fails (or
starts from the cache) in about a second instead of retrying for half a minute.

Limits: before any weight is fetched, the files the download would add are listed (a dry run)
and refused when they come to more than `VL3_MAX_MODEL_GB` (default 64) or more than the
cache's disk has free. The whole download must finish within `VL3_MODEL_DOWNLOAD_TIMEOUT`
seconds (default: 10 minutes plus a second per MB to fetch, that is 1 MB/s at least), on top of
huggingface_hub's own limit on a stalled read (`HF_HUB_DOWNLOAD_TIMEOUT`). A download stopped by
a limit or by Ctrl-C goes on in huggingface_hub's threads until the process ends (`ABANDONED`).

Either way the folder's config.json must describe a VideoLLaMA3 model (`ModelConfig.from_dir`,
else ConfigError); for a Hub repo it is fetched and checked before anything else.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .config import ModelConfig
from .errors import ConfigError, ModelNotFoundError, Vl3Error

DEFAULT_MODEL = "DAMO-NLP-SG/VideoLLaMA3-2B"  # the CLI lets VL3_MODEL override it
PROBE_TIMEOUT_S = 2.0  # no answer from the Hub in this time: use the cache, or fail at once
MAX_MODEL_GB = 64.0  # the most a model download may add to the cache (VL3_MAX_MODEL_GB); a 7B model is 16-17 GB
MIN_RATE = 1e6  # bytes/s: the slowest download the default time limit lets finish
BASE_TIMEOUT_S = 600.0  # ... plus this (VL3_MODEL_DOWNLOAD_TIMEOUT replaces the sum)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# Set once Ctrl-C (or SIGTERM) stopped a download: its files go on in huggingface_hub's threads,
# which the command's exit does not wait for (they would finish the files first).
ABANDONED = threading.Event()


_REPO_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


def _checked(folder: Path, model: str) -> Path:
    """`folder` when its config.json describes a VideoLLaMA3 model, else ConfigError naming `model`."""
    try:
        ModelConfig.from_dir(folder)
    except ConfigError as e:
        raise ConfigError(f"{model}: {e}") from e
    return folder


def model_label(model: str, revision: str | None) -> str:
    """How records name a model: a local folder as given, tidied (`./ckpt/` -> `ckpt`; not made
    absolute, so records do not carry this machine's folders); a Hub id with `@revision` for a revision."""
    if Path(model).expanduser().is_dir():
        return os.path.normpath(model)
    return f"{model}@{revision}" if revision else model


def resolve_model(model: str, revision: str | None = None, on_config: Callable[[Path], None] | None = None) -> Path:
    """The local folder holding checkpoint `model` (a folder path or a Hub repo id).

    `on_config(folder)` runs once config.json is there and checked, before any weight is
    downloaded: a caller's checks against the config cost no download.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        folder = _checked(local, model)
        if on_config:
            on_config(folder)
        return folder
    if local.exists():
        raise ModelNotFoundError(f"{model} is a file; --model takes a checkpoint folder or a Hub repo id")
    if not _REPO_ID.match(model):
        raise ModelNotFoundError(f"no such folder: {model}")
    with _quiet_hub():
        return _download(model, revision, on_config)


@contextmanager
def _quiet_hub():
    """huggingface_hub logs a warning per retry: keep them off the terminal unless debugging. (It
    sets its logger's level when first imported: imported first, so that the level set here holds.)"""
    import huggingface_hub.file_download  # noqa: F401

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    if os.environ.get("VL3_DEBUG", "").strip().lower() in ("", "0", "false", "no", "off"):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub answers at all (one request, no retries; proxies from the environment apply)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, proxy, TLS: all mean "not now"
        return False
    return True


def _download(repo_id: str, revision: str | None, on_config: Callable[[Path], None] | None) -> Path:
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .fetch import env_number

    max_bytes = env_number("VL3_MAX_MODEL_GB", MAX_MODEL_GB) * 1e9  # checked before any request
    timeout = env_number("VL3_MODEL_DOWNLOAD_TIMEOUT", math.inf)
    rev = f" (revision {revision})" if revision else ""
    offline = constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT)
    config = None
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    before = _names(blobs)
    try:
        # config.json first: a repo that is not a VideoLLaMA3 model is refused before any weight is fetched.
        config = _waited(hf_hub_download, repo_id, "config.json", revision=revision, local_files_only=offline)
        folder = _checked(Path(config).parent, repo_id)
        if on_config:
            on_config(folder)
        # The snapshot of the very commit whose config.json was checked (a branch may move meanwhile):
        # the cache keeps a file under snapshots/<commit>/.
        commit = Path(config).parent.name
        pinned = commit if _COMMIT.fullmatch(commit) else revision
        limit, needed, cached = None, 0, offline
        if not offline:
            plan = _waited(snapshot_download, repo_id, revision=pinned, allow_patterns=ALLOW_PATTERNS,
                           dry_run=True, tqdm_class=_bars(None))
            needed = sum(f.file_size or 0 for f in plan if f.will_download)
            _check_room(repo_id, needed, max_bytes, blobs.parent.parent)
            limit = timeout if math.isfinite(timeout) else BASE_TIMEOUT_S + needed / MIN_RATE
            cached = not any(f.will_download for f in plan)  # then the snapshot asks the Hub nothing more
        shown: list = []
        try:
            snapshot = Path(_waited(snapshot_download, repo_id, revision=pinned, allow_patterns=ALLOW_PATTERNS,
                                    local_files_only=cached, timeout=limit, tqdm_class=_bars(shown)))
        except BaseException as e:
            for bar in shown:  # end the progress lines (and their updates from the abandoned threads)
                bar.close()
            if not isinstance(e, _Overdue):
                raise
            got = sum(_size_of(blobs / name) for name in _names(blobs) - before)
            raise ModelNotFoundError(
                f"the download of {repo_id}{rev} did not finish within {_seconds(limit)} s ({_gb(got)} of "
                f"{_gb(needed)} written; VL3_MODEL_DOWNLOAD_TIMEOUT sets the limit): run again to fetch it afresh"
            ) from e
        _verify_new(blobs, before, snapshot, repo_id)
        return snapshot
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither a folder nor a Hub repo id ({e})") from e
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN (or run `hf auth login`)"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"no folder and no Hub repo named {repo_id} (a private repo needs HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from e
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as e:
        answered = e.__cause__ if isinstance(e.__cause__, HfHubHTTPError) else None
        if answered is not None and not offline:  # the Hub answered, with an error
            raise ModelNotFoundError(f"cannot download {repo_id}{rev}: {_first_line(answered)}") from e
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(
                f"{repo_id}{rev} is not in the Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                "download it once online, or pass a local folder with --model"
            ) from e
        raise ModelNotFoundError(
            f"cannot reach {constants.ENDPOINT} and {repo_id}{rev} is not in the Hub cache ({constants.HF_HUB_CACHE}): "
            "connect to the internet (or set HTTPS_PROXY), or pass a local folder with --model"
        ) from e
    except EntryNotFoundError as e:  # after LocalEntryNotFoundError, its subclass
        if config is not None:  # config.json came: another file of the snapshot is missing
            raise ModelNotFoundError(f"cannot download {repo_id}{rev}: {_first_line(e)}") from e
        raise ConfigError(f"{repo_id}{rev} has no config.json: not a VideoLLaMA3 checkpoint") from e
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"cannot download {repo_id}{rev}: {e}") from e
    except Vl3Error:
        raise
    except Exception as e:  # noqa: BLE001 -- the HTTP client's own errors (timeouts, cut bodies), bad listings
        raise ModelNotFoundError(f"cannot download {repo_id}{rev}: {type(e).__name__}: {_first_line(e)}") from e


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _bars(shown: list | None):
    """huggingface_hub's progress bar class, either silent (`shown` None: a dry run's "Fetching N
    files" fetches nothing) or keeping each bar in `shown`, so that a download given up can end them."""
    from huggingface_hub.utils import tqdm

    class Bars(tqdm):
        def __init__(self, *args, **kwargs):
            if shown is None:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if shown is not None:
                shown.append(self)

    return Bars


def _seconds(t: float) -> str:
    return f"{t:,.0f}" if t >= 10 else f"{t:g}"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e7 else f"{n / 1e6:,.2f} MB"


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_room(repo_id: str, needed: int, max_bytes: float, cache: Path) -> None:
    """ModelNotFoundError when the `needed` bytes a download would add are over the limit, or over
    what the disk holding the Hub cache has free (huggingface_hub would only warn, then fail midway)."""
    if needed > max_bytes:
        raise ModelNotFoundError(
            f"{repo_id} would download {_gb(needed)}, more than the {_gb(max_bytes)} limit "
            "(VL3_MAX_MODEL_GB raises it)"
        )
    probe = cache
    while not probe.exists() and probe != probe.parent:  # the cache folder may not exist yet
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if needed > free:
        raise ModelNotFoundError(
            f"{repo_id} needs {_gb(needed)} and {cache} has {_gb(free)} free: free some space, "
            "or set HF_HUB_CACHE to a disk with room"
        )


def _names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _verify_new(blobs: Path, before: set[str], snapshot: Path, repo_id: str) -> None:
    """Check the files this download added to the cache against the names the Hub gave them: a
    weight file's blob is named by its sha256, any other file's by its git blob hash.
    huggingface_hub itself checks only their length, and a corrupt blob would stay cached, read by
    every later run. A mismatch removes the blob (and the snapshot's link to it) and is a
    ModelNotFoundError; the next run downloads the file again. A 2B model takes a few seconds, once."""
    corrupt = []
    for name in sorted(_names(blobs) - before):
        path = blobs / name
        if len(name) == 64:
            digest = hashlib.sha256()
        elif len(name) == 40:
            digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
        else:
            continue  # a partial download (`.incomplete`) or a name of another kind
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() == name:
            continue
        links = [p for p in snapshot.rglob("*") if p.is_symlink() and os.path.realpath(p) == os.path.realpath(path)]
        for link in links:
            link.unlink()
        path.unlink()
        corrupt.append(links[0].relative_to(snapshot).as_posix() if links else name)
    if corrupt:
        more = f" (and {len(corrupt) - 1} more)" if len(corrupt) > 1 else ""
        raise ModelNotFoundError(
            f"the download of {repo_id}'s {corrupt[0]}{more} is corrupt (its content does not match the Hub's hash); "
            "removed: run again to download it afresh"
        )


class _Overdue(Exception):
    """A wait that `_waited` gave up (not the HTTP client's own TimeoutError)."""


def _waited(call: Callable, *args, timeout: float | None = None, **kwargs):
    """call(*args, **kwargs) in a thread of its own, waited for here, so that Ctrl-C stops the wait
    at once. (Called directly, snapshot_download lets an interrupt through only after its pool has
    finished every file in progress: minutes into a large model, forever on a stalled connection.)
    After `timeout` seconds the wait ends with `_Overdue`. An interrupted download goes on in the
    background (`ABANDONED`); huggingface_hub names its partial files per process, so the next run
    fetches those files again."""
    outcome: dict = {}
    deadline = None if timeout is None else time.monotonic() + timeout

    def target() -> None:
        try:
            outcome["value"] = call(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread, raised there
            outcome["error"] = e

    thread = threading.Thread(target=target, name="vl3-model-download", daemon=True)
    thread.start()
    try:
        while thread.is_alive():  # in short waits: a signal handled by another thread is seen at the next one
            thread.join(0.1)
            if deadline is not None and thread.is_alive() and time.monotonic() > deadline:
                raise _Overdue(f"not done in {timeout} s")
    except BaseException:
        ABANDONED.set()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
