"""Typed errors. Library code raises these; the CLI prints `Error: <message>` and exits non-zero.

Messages say what went wrong, with the file or key involved, and what to do next.
"""

from __future__ import annotations

import re


class Vl3Error(Exception):
    """Base of every error vl3 reports to its user without a traceback."""

    exit_code = 1


class UsageError(Vl3Error):
    """The command line asks for something impossible (bad option value, missing input)."""

    exit_code = 2


class ConfigError(Vl3Error):
    """A checkpoint's config.json is missing, unreadable or not a VideoLLaMA3 model."""


class WeightsError(Vl3Error):
    """Weights are missing, unsafe (pickle), or do not match the config (missing/unexpected/shape)."""


class TokenizerError(Vl3Error):
    """The checkpoint's tokenizer files are missing or lack a token the model needs."""


class ModelNotFoundError(Vl3Error):
    """A model id or path that cannot be resolved (offline and not cached, no such repo or folder)."""


class MediaError(Vl3Error):
    """An image or video that cannot be read or used (missing, empty, corrupt, too large, bad shape)."""


class ContextError(Vl3Error):
    """A prompt and its answer need more positions than the model's context holds."""


def out_of_memory(error: BaseException) -> str | None:
    """For an allocation that failed (Python's MemoryError, PyTorch's CPU allocator, a GPU out of
    memory), a one-line message saying so; None for any other error."""
    text = str(error)
    allocator = isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    if not (allocator or isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"):
        return None
    tried = re.search(r"(?i)tried to allocate ([\d.]+ ?[KMGTP]i?B|\d+ bytes)", text)
    if tried and tried.group(1).endswith("bytes"):
        n = int(tried.group(1).split()[0])
        size = f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
    else:
        size = tried.group(1) if tried else None
    return "out of memory" + (f" (an allocation of {size} failed)" if size else "")


EMPTY_QUESTION = "an empty question: write some text (whitespace alone is not a question)"
