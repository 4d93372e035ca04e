"""A results file reached through a link, for the tests that a replaced file keeps its link and mode."""

from __future__ import annotations

from pathlib import Path


def linked_file(folder: Path, name: str, text: str, mode: int) -> tuple[Path, Path]:
    """`folder/data/name` holding `text` with permission bits `mode`, and the link `folder/name` to it."""
    real = folder / "data" / name
    real.parent.mkdir()
    real.write_text(text)
    real.chmod(mode)
    link = folder / name
    link.symlink_to(real)
    return link, real
