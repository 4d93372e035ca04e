"""Regenerate the shell completion scripts in this folder from the vl3 Typer app.

    python completions/generate.py [FOLDER]

The scripts call `vl3` itself for candidates (Typer's dynamic completion, env var
`_VL3_COMPLETE`), so they follow the installed version's commands and options; the CLI module
imports no torch, which keeps each TAB fast. tests/test_completions.py fails when the committed
scripts differ from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer.completion import get_completion_script

from vl3cli.cli import app

FILES = {"bash": "vl3.bash", "zsh": "_vl3", "fish": "vl3.fish"}


def scripts() -> dict[str, str]:
    prog = app.info.name
    complete_var = f"_{prog.replace('-', '_').upper()}_COMPLETE"
    return {
        name: get_completion_script(prog_name=prog, complete_var=complete_var, shell=shell) + "\n"
        for shell, name in FILES.items()
    }


def write(folder: Path) -> None:
    for name, text in scripts().items():
        (folder / name).write_text(text)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
