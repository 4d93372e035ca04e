"""Typed errors. Library code raises these; the CLI prints `Error: <message>` and exits non-zero.

Messages say what went wrong, with the file or key involved, and what to do next.
"""

from __future__ import annotations


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


EMPTY_QUESTION = "an empty question: write some text (whitespace alone is not a question)"
