"""`python -m vl3cli.cli ...` is `vl3 ...`."""

from .app import run

run()
