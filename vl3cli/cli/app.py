"""The Typer app of `vl3`, the options its commands share, and the entry point.

Options shared by the commands are defined once here as `Annotated` aliases; they are the Python
API's keyword options under the same names (`vl3cli.options.Options`). Importing this module
imports no torch / transformers / media / hub libraries, so `vl3 --help` and shell completion
stay fast (tests check it); those are imported inside the command bodies.

Errors: library code raises `Vl3Error`; `main()` prints one line `Error: ...` on stderr and exits
with the error's code (usage errors 2, others 1); a traceback only with `--debug` or
`VL3_DEBUG=1`. stdout carries results only. SIGTERM and SIGHUP stop a command as Ctrl-C does
(exit status 128 + the signal's number); a closed stdin / stdout is refused before the model
loads by the commands that need it.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from typing import Annotated, Literal

import typer

from .. import __version__
from ..errors import Vl3Error
from ..hub import DEFAULT_MODEL
from .process import (
    READER_THREADS,  # noqa: F401 -- named in pipeline.py's comment
    ClosedStream,  # noqa: F401
    Terminated,
    _interrupted,
    _must_wait_for,
    _require,  # noqa: F401 -- the commands import it from here
    _standard_streams,
    _Terminations,
)

app = typer.Typer(
    name="vl3",
    help=(
        "Caption and question images and videos with VideoLLaMA3.\n\n"
        "Examples:\n\n"
        "  vl3 describe cat.jpg\n\n"
        "  vl3 ask clip.mp4 \"What happens after the cat jumps?\"\n\n"
        "  vl3 batch videos/ --out captions.jsonl"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL = "Model"
DECODING = "Decoding"
MEDIA = "Media"
SEGMENTS = "Segments"
OUTPUT = "Output"
RAY = "Ray (--engine ray)"

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", envvar="VL3_MODEL", rich_help_panel=MODEL,
        help="Checkpoint: a local folder or a Hugging Face Hub repo id (either format).",
    ),
]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub branch, tag or commit.", rich_help_panel=MODEL)]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=MODEL)]
DtypeOpt = Annotated[
    Literal["auto", "bfloat16", "float16", "float32"],
    typer.Option(help="Weights and activations; auto = the checkpoint's dtype where the hardware computes in it "
                      "natively (bf16 checkpoints: bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32).",
                 rich_help_panel=MODEL),
]
QuantizeOpt = Annotated[
    Literal["int8", "int4"] | None,
    typer.Option(help="Quantize the language model's weights while loading: less memory, faster CPU decoding, "
                      "slightly different answers (see README).", rich_help_panel=MODEL),
]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Stop after this many generated tokens.", rich_help_panel=DECODING)]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy (deterministic); > 0 samples.", rich_help_panel=DECODING)]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this much probability.", rich_help_panel=DECODING)]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).", rich_help_panel=DECODING)]
RepetitionPenaltyOpt = Annotated[float, typer.Option(help="> 1 discourages repeating tokens already in the prompt or answer.", rich_help_panel=DECODING)]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling: the same seed repeats the same answer.", rich_help_panel=DECODING)]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at end-of-answer tokens (benchmarks).", rich_help_panel=DECODING)]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt (none by default, as in the authors' evaluation).", rich_help_panel=DECODING)]
FpsOpt = Annotated[float | None, typer.Option(help="Video frames per second to sample (default: the checkpoint's, 1).", rich_help_panel=MEDIA)]
MinFramesOpt = Annotated[int | None, typer.Option(help="At least this many frames per video (default: the checkpoint's, 4, or --max-frames if lower).", rich_help_panel=MEDIA)]
MaxFramesOpt = Annotated[int | None, typer.Option(help="At most this many frames, spread evenly (default: 180, or --min-frames if higher).", rich_help_panel=MEDIA)]
StartOpt = Annotated[float | None, typer.Option(help="Video clip start, in seconds.", rich_help_panel=MEDIA)]
EndOpt = Annotated[float | None, typer.Option(help="Video clip end, in seconds.", rich_help_panel=MEDIA)]
MaxVisualTokensOpt = Annotated[int | None, typer.Option(help="Cap the visual tokens (frames are resized smaller to fit).", rich_help_panel=MEDIA)]
PruneOpt = Annotated[bool, typer.Option("--prune/--no-prune", help="Drop video tokens that barely change from the previous frame.", rich_help_panel=MEDIA)]
PruneThresholdOpt = Annotated[float, typer.Option(help="Pruning threshold: mean absolute change x 255 of a token.", rich_help_panel=MEDIA)]
SegmentsOpt = Annotated[str | None, typer.Option(help="Cut videos into segments and answer each: SECONDS per window (at least 0.1), or 'scenes' (shot boundaries).", show_default=False, rich_help_panel=SEGMENTS)]
MinSegmentOpt = Annotated[float | None, typer.Option(help="Scenes: shorter shots merge with a neighbour (default 2 s).", show_default=False, rich_help_panel=SEGMENTS)]
MaxSegmentOpt = Annotated[float | None, typer.Option(help="Scenes: longer shots are split into equal parts (default 60 s; at least 0.1).", show_default=False, rich_help_panel=SEGMENTS)]
SceneThresholdOpt = Annotated[float, typer.Option(help="Scenes: how different two frames must be to make a cut (FFmpeg scdet score, 0-100).", rich_help_panel=SEGMENTS)]
FormatOpt = Annotated[Literal["text", "json", "jsonl", "srt", "vtt"], typer.Option("--format", "-f", help="text, json (one object; an array for several answers), jsonl (one object per line), srt or vtt (subtitles, one cue per answer).", rich_help_panel=OUTPUT)]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Write results to this file (- = stdout).", rich_help_panel=OUTPUT)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (jsonl otherwise appends to a vl3 file).", rich_help_panel=OUTPUT)]
StreamOpt = Annotated[bool | None, typer.Option("--stream/--no-stream", help="Print text token by token (default: when stdout is a terminal).", show_default=False, rich_help_panel=OUTPUT)]


def _debug_flag(value: bool) -> bool:
    """`--debug` as parsed (not the text "--debug" given as a prompt): VL3_DEBUG=1, which main()
    reads for tracebacks (and restores at the end) and the library's quiet parts (Hub retries,
    decoder logs) read too. Eager: set before any other option's check can fail."""
    if value:
        os.environ["VL3_DEBUG"] = "1"
    return value


DebugOpt = Annotated[bool, typer.Option("--debug", callback=_debug_flag, is_eager=True, help="Tracebacks, timings, the resolved model and native decoder logs on stderr (also VL3_DEBUG=1).", rich_help_panel=OUTPUT)]

# The option groups commands share, as (parameter, annotation, default); `with_options` adds them.
OPTION_GROUPS = {
    "model": [("model", ModelOpt, DEFAULT_MODEL), ("revision", RevisionOpt, None), ("device", DeviceOpt, "auto"),
              ("dtype", DtypeOpt, "auto"), ("quantize", QuantizeOpt, None)],
    "decoding": [("max_new_tokens", MaxNewTokensOpt, 512), ("temperature", TemperatureOpt, 0.0), ("top_p", TopPOpt, 1.0),
                 ("top_k", TopKOpt, 0), ("repetition_penalty", RepetitionPenaltyOpt, 1.0), ("seed", SeedOpt, None),
                 ("ignore_eos", IgnoreEosOpt, False), ("system", SystemOpt, None)],
    "media": [("fps", FpsOpt, None), ("min_frames", MinFramesOpt, None), ("max_frames", MaxFramesOpt, None),
              ("start", StartOpt, None), ("end", EndOpt, None), ("max_visual_tokens", MaxVisualTokensOpt, None),
              ("prune", PruneOpt, True), ("prune_threshold", PruneThresholdOpt, 0.1)],
    "segments": [("segments", SegmentsOpt, None), ("min_segment", MinSegmentOpt, None), ("max_segment", MaxSegmentOpt, None),
                 ("scene_threshold", SceneThresholdOpt, 10.0)],
    "debug": [("debug", DebugOpt, False)],
}  # fmt: skip


def with_options(*groups: str):
    """Give a command the shared options of `groups` (after its own parameters); Typer reads them
    from the signature, and the command receives them in its `**options`."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # own annotations as objects, as Typer needs them
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                  for group in groups for name, annotation, default in OPTION_GROUPS[group]]  # fmt: skip
        command.__signature__ = signature.replace(parameters=own + shared)
        return command

    return decorate


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vl3 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """Caption and question images and videos with VideoLLaMA3."""



LOAD_KEYS = ("model", "revision", "device", "dtype", "quantize")


def _params(local: dict) -> dict:
    """A command's parameters as one dict: its own (its `locals()`) and the shared ones `with_options` gave it."""
    return {k: v for k, v in local.items() if k != "options"} | local.get("options", {})


def _options(params: dict):
    """The request options (`vl3cli.options.Options`) from a command's parameters (`_params`)."""
    from dataclasses import fields

    from ..fetch import default_limits
    from ..options import Options

    default_limits()  # VL3_MAX_DOWNLOAD_MB / VL3_DOWNLOAD_TIMEOUT checked once, before the model loads
    return Options.from_kwargs(**{f.name: params[f.name] for f in fields(Options) if f.name in params})


def _env_debug() -> bool:
    return os.environ.get("VL3_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _debug_line(message: str) -> None:
    if _env_debug():
        print(message, file=sys.stderr)


class _Spinner:
    """A transient status line on stderr while slow stages run, only when stderr is a terminal."""

    def __init__(self, message: str):
        self.status = None
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(f"{message}...", spinner="dots")
            self.status.start()

    def stop(self, *_) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _load(params: dict, options):
    """The model, loaded once for the whole command."""
    from ..api import load
    from ..heap import keep_freed_memory

    with _Spinner(f"Loading {params['model']}"):
        model = load(**{k: params[k] for k in LOAD_KEYS}, **_as_kwargs(options))
    keep_freed_memory()  # this process is vl3's: activations reuse freed heap (after loading, whose buffers are gone)
    label = model.label
    wide = model.engine.float32_products
    _debug_line(f"model: {label.model} -> {model.engine.path} (device {label.device}, dtype {label.dtype}, "
                f"quantize {label.quantize or 'none'}"
                + (f", float32 products of many rows: {wide}" if wide else "") + ")")  # fmt: skip
    return model


def _as_kwargs(options) -> dict:
    from dataclasses import asdict

    return asdict(options)


def _check_media(media: list[str]) -> None:
    """Local files must exist and be readable, URLs be well formed, before the model loads."""
    from ..media import check_input

    for path in media:
        check_input(path)


def _warn(lines, console=None) -> None:
    """`warning: ...` lines on stderr (through the progress bar's console while it shows)."""
    for line in lines:
        if console is None:
            print(f"warning: {line}", file=sys.stderr)
        else:
            console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


def _timings(result) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in result.to_dict()["timings"].items())


def main() -> None:
    """Console entry point: one-line errors, exit codes, tracebacks only when debugging."""
    _standard_streams()
    before = os.environ.get("VL3_DEBUG")  # --debug sets it while parsing (`_debug_flag`)
    try:
        with _Terminations() as terminations:
            code = app(prog_name="vl3", standalone_mode=False)
        if code == 130 and terminations.received:  # Typer's status for a KeyboardInterrupt (here: `Terminated`)
            code = _interrupted(Terminated(terminations.received))
    except Vl3Error as e:
        _traceback()
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # the command line itself is wrong (unknown option, bad value)
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `vl3`: the help is out already; exit 2 as Typer does
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        print(f"Error: {e.format_message()} (see '{ctx.command_path if ctx else 'vl3'} --help')", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt as e:
        sys.exit(_interrupted(e))
    except BrokenPipeError:  # `vl3 ... | head`
        sys.stderr.close()
        sys.exit(1)
    except OSError as e:  # e.g. --out on a full disk, or /dev/full
        _traceback()
        print(f"Error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:  # a low `ulimit -v`: importing torch, or loading the model
        print("Error: out of memory (a memory limit such as `ulimit -v` may be too low for the model)", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # PyTorch's allocators: one line; any other error stays a traceback (a bug)
        from ..errors import out_of_memory

        if not (memory := out_of_memory(e)):
            raise
        _traceback()
        print(f"Error: {memory}: try fewer frames, a smaller --batch-size, --quantize, or another --device",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
    except ImportError as e:  # a broken install, or too little memory to map a library
        _traceback()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"Error: cannot load a library ({e.name or 'import'}: {first}): too little memory (`ulimit -v`) or a broken install",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
    finally:
        if before is None:
            os.environ.pop("VL3_DEBUG", None)
        else:
            os.environ["VL3_DEBUG"] = before
    sys.exit(code if isinstance(code, int) else 0)


def _traceback() -> None:
    """The traceback of the error being handled, when debugging (`--debug` or VL3_DEBUG)."""
    if _env_debug():
        import traceback

        traceback.print_exc()


def run() -> None:
    """The `vl3` program: `main()`, then an exit without the interpreter's teardown.

    Freeing a loaded model object by object and unloading PyTorch's modules takes about half a
    second with a 2B model (2-core Xeon VM); the system reclaims the memory at exit anyway. What
    Python does at exit that matters still happens: the exit handlers (`atexit`: temporary folders
    removed, logging flushed, Ray shut down), and stdout and stderr are flushed; every output file
    was closed (or renamed into place) by the command before `main()` returned. Media reader
    threads still decoding (after Ctrl-C) are not waited for; where another thread still runs,
    the exit is the usual one, which waits for it. `main()` itself returns by `SystemExit`, for
    callers that embed it.
    """
    import atexit

    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    if any(_must_wait_for(t) for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe (`vl3 ... | head`), or a stream closed already
            code = code or 1
    os._exit(code)
