"""Shared fixtures: tiny checkpoints of both formats, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

# Pin Rich/Typer output so help and error texts do not depend on the terminal running the tests.
os.environ.setdefault("COLUMNS", "100")
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("TERM", "dumb")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Same weights (seed 0) as: hf / original, tied / untied; plus sharded copies."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for fmt in ("hf", "original"):
        for tied in (True, False):
            name = f"{fmt}-{'tied' if tied else 'untied'}"
            out[name] = tiny.make_checkpoint(root / name, fmt, tied=tied)
        out[f"{fmt}-sharded"] = tiny.make_checkpoint(root / f"{fmt}-sharded", fmt, tied=False, sharded=True)
    return out


@pytest.fixture(scope="session")
def hf_checkpoint(checkpoints) -> Path:
    return checkpoints["hf-tied"]


@pytest.fixture(scope="session")
def original_checkpoint(checkpoints) -> Path:
    return checkpoints["original-tied"]


@pytest.fixture(scope="session")
def reference(hf_checkpoint):
    """transformers' model on the HF-format tiny checkpoint (the reference implementation)."""
    return tiny.hf_reference(hf_checkpoint)
