"""The `vl3` command line: describe, ask, chat, batch, serve.

Thin Typer commands over the Python API (api.py: `load()` once, then `Model.run`), with
inputs.py (inputs), batch.py (resume, progress) and outfile.py (where results may be
written). Options shared by the commands are defined once as `Annotated` aliases below; they are
the API's keyword options under the same names (`Options`). Importing this module imports no
torch / transformers / media / hub libraries, so `vl3 --help` and shell completion stay fast
(tests check it); those are imported inside the command bodies.

Errors: library code raises `Vl3Error`; `main()` prints one line `Error: ...` on stderr and exits
with the error's code (usage errors 2, others 1); a traceback only with `--debug` or
`VL3_DEBUG=1`. stdout carries results only.

Layout: app.py (the Typer app, the shared options, helpers, `main()`), describe.py (`describe`,
`ask`), chat.py (`chat`), batch.py (`batch`), serve.py (`serve`); importing this package
registers every command.
"""

from . import batch, chat, describe, serve  # noqa: F401 -- each registers its commands on `app`
from .app import app, main, run
from .describe import _InOrder

__all__ = ["_InOrder", "app", "main", "run"]
