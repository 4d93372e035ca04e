"""`python -m vl3cli ...` is `vl3 ...`."""

from .cli import main

main()
