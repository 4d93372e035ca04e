"""Model id or local path -> local checkpoint folder.

A local folder is used as is. Anything else is a Hugging Face Hub repo id, fetched with
`huggingface_hub.snapshot_download` into the ordinary Hub cache (`HF_HOME` / `HF_HUB_CACHE`),
downloading only what vl3 reads: JSON configs, safetensors weights and tokenizer / template
files. Remote code (`*.py`) and pickle weights (`*.bin`, `*.pt`, ...) are never fetched.
`HF_HUB_OFFLINE=1` resolves from the cache only; `HF_TOKEN` authenticates; `revision` picks a
branch, tag or commit. huggingface_hub shows its download progress bars on stderr.

Either way the folder's config.json must describe a VideoLLaMA3 model (`ModelConfig.from_dir`,
else ConfigError); for a Hub repo it is fetched and checked before anything else.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelConfig
from .errors import ConfigError, ModelNotFoundError

DEFAULT_MODEL = "DAMO-NLP-SG/VideoLLaMA3-2B"  # the CLI lets VL3_MODEL override it
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


_REPO_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


def _checked(folder: Path, model: str) -> Path:
    """`folder` when its config.json describes a VideoLLaMA3 model, else ConfigError naming `model`."""
    try:
        ModelConfig.from_dir(folder)
    except ConfigError as e:
        raise ConfigError(f"{model}: {e}") from e
    return folder


def resolve_model(model: str, revision: str | None = None) -> Path:
    """The local folder holding checkpoint `model` (a folder path or a Hub repo id)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return _checked(local, model)
    if local.exists():
        raise ModelNotFoundError(f"{model} is a file; --model takes a checkpoint folder or a Hub repo id")
    if not _REPO_ID.match(model):
        raise ModelNotFoundError(f"no such folder: {model}")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download, snapshot_download
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

    rev = f" (revision {revision})" if revision else ""
    try:
        # config.json first: a repo that is not a VideoLLaMA3 model is refused before any weight is fetched.
        _checked(Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent, repo_id)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
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
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(
                f"{repo_id}{rev} is not in the Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                "download it once online, or pass a local folder with --model"
            ) from e
        raise ModelNotFoundError(f"cannot download {repo_id}{rev}: the Hub is unreachable and it is not cached ({e})") from e
    except EntryNotFoundError as e:  # after LocalEntryNotFoundError, its subclass
        raise ConfigError(f"{repo_id}{rev} has no config.json: not a VideoLLaMA3 checkpoint") from e
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"cannot download {repo_id}{rev}: {e}") from e
