"""`python -m vl3cli ...` is `vl3 ...`."""

from .cli import run

run()
