"""The `vl3` command line: describe, ask, batch.

Thin Typer commands over pipeline.py (single media) and batch.py (many files). Options shared
by the commands are defined once as `Annotated` aliases below. Importing this module imports no
torch / transformers / media / hub libraries, so `vl3 --help` and shell completion stay fast
(tests check it); those are imported inside the command bodies.

Errors: library code raises `Vl3Error`; `main()` prints one line `Error: ...` on stderr and exits
with the error's code (usage errors 2, others 1); a traceback only with `--debug` or
`VL3_DEBUG=1`. stdout carries results only.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Literal

import typer

from . import __version__
from .errors import UsageError, Vl3Error
from .hub import DEFAULT_MODEL

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
OUTPUT = "Output"

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
MinFramesOpt = Annotated[int | None, typer.Option(help="At least this many frames per video (default: the checkpoint's, 4).", rich_help_panel=MEDIA)]
MaxFramesOpt = Annotated[int | None, typer.Option(help="At most this many frames, spread evenly (default: the checkpoint's, 180).", rich_help_panel=MEDIA)]
StartOpt = Annotated[float | None, typer.Option(help="Video clip start, in seconds.", rich_help_panel=MEDIA)]
EndOpt = Annotated[float | None, typer.Option(help="Video clip end, in seconds.", rich_help_panel=MEDIA)]
MaxVisualTokensOpt = Annotated[int | None, typer.Option(help="Cap the visual tokens (frames are resized smaller to fit).", rich_help_panel=MEDIA)]
PruneOpt = Annotated[bool, typer.Option("--prune/--no-prune", help="Drop video tokens that barely change from the previous frame.", rich_help_panel=MEDIA)]
PruneThresholdOpt = Annotated[float, typer.Option(help="Pruning threshold: mean absolute change x 255 of a token.", rich_help_panel=MEDIA)]
FormatOpt = Annotated[Literal["text", "json", "jsonl"], typer.Option("--format", "-f", help="text, json (one object) or jsonl (one object per line).", rich_help_panel=OUTPUT)]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write results to this file instead of stdout.", rich_help_panel=OUTPUT)]
StreamOpt = Annotated[bool | None, typer.Option("--stream/--no-stream", help="Print text token by token (default: when stdout is a terminal).", show_default=False, rich_help_panel=OUTPUT)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Tracebacks, timings and the resolved model on stderr (also VL3_DEBUG=1).", rich_help_panel=OUTPUT)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vl3 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """Caption and question images and videos with VideoLLaMA3."""


DECODING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "ignore_eos")
MEDIA_KEYS = ("fps", "min_frames", "max_frames", "start", "end", "max_visual_tokens", "prune", "prune_threshold")


def _settings(options: dict):
    """pipeline.Settings from a command's parameters (its `locals()`)."""
    from .decoding import DecodingParams
    from .pipeline import Settings

    return Settings(
        model=options["model"], revision=options["revision"], device=options["device"], dtype=options["dtype"],
        quantize=options["quantize"],
        system=options["system"], seed=options["seed"],
        decoding=DecodingParams(**{k: options[k] for k in DECODING_KEYS}),
        media={k: options[k] for k in MEDIA_KEYS},
    )  # fmt: skip


def _env_debug() -> bool:
    return os.environ.get("VL3_DEBUG", "") not in ("", "0")


def _debug_line(debug: bool, message: str) -> None:
    if debug or _env_debug():
        print(message, file=sys.stderr)


def _status(message: str, show: bool = True):
    """A transient spinner on stderr while a slow stage runs, when stderr is a terminal."""
    if not (show and sys.stderr.isatty()):
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(f"{message}...", spinner="dots")


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _answer(media: str, questions: list[str | None], settings, fmt: str, out: Path | None, stream: bool | None, debug: bool) -> None:
    """describe / ask: one media file, one or more questions, results to stdout or --out."""
    from .media import check_file
    from .output import write_results
    from .pipeline import Pipeline

    if stream and (fmt != "text" or out is not None):
        raise UsageError("--stream prints text to the terminal; it cannot be combined with --format json/jsonl or --out")
    if stream is None:
        stream = fmt == "text" and out is None and sys.stdout.isatty()
    check_file(media)  # before loading the model
    with _status(f"Loading {settings.model}"):
        pipeline = Pipeline(settings).load()
    _debug_line(debug, f"model: {settings.model} -> {pipeline.engine.path} ({pipeline.engine.device}, {pipeline.engine.dtype}, quantize={pipeline.engine.quantize})")
    with _status(f"Reading {media}"):
        encoded = pipeline.encode(media)
    results = []
    for i, question in enumerate(questions):
        if stream and len(questions) > 1:  # the same layout as output.write_text
            _print(("\n" if i else "") + f"Q: {question}\n")
        with _status("Generating", show=not stream):
            results.append(pipeline.answer(encoded, question, on_text=_print if stream else None))
        if stream:
            _print("\n")
    if not stream:
        write_results(results, fmt, out, sys.stdout)
    for r in results:
        timings = " ".join(f"{k}={v:.3f}" for k, v in r.to_dict()["timings"].items())
        _debug_line(debug, f"timings: {timings} tokens={r.generated_tokens} ({r.finish_reason})")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 describe photo.jpg\n\n"
        "  vl3 describe clip.mp4 --fps 2 --max-frames 64 --format json\n\n"
        "  vl3 describe clip.mp4 --prompt \"Summarise this video in one sentence.\" -m DAMO-NLP-SG/VideoLLaMA3-7B"
    )
)
def describe(
    media: Annotated[str, typer.Argument(help="Image or video file.", show_default=False)],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Instead of \"Describe this image/video in detail.\"")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    system: SystemOpt = None,
    fps: FpsOpt = None,
    min_frames: MinFramesOpt = None,
    max_frames: MaxFramesOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    max_visual_tokens: MaxVisualTokensOpt = None,
    prune: PruneOpt = True,
    prune_threshold: PruneThresholdOpt = 0.1,
    format: FormatOpt = "text",
    out: OutOpt = None,
    stream: StreamOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Caption an image or a video."""
    settings = _settings(locals())
    _answer(media, [prompt], settings, format, out, stream, debug)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 ask photo.jpg \"How many people are in the picture?\"\n\n"
        "  vl3 ask clip.mp4 \"What happens first?\" \"What happens last?\" --format jsonl\n\n"
        "  vl3 ask clip.mp4 \"Where is the ball?\" --start 10 --end 20 --fps 4"
    )
)
def ask(
    media: Annotated[str, typer.Argument(help="Image or video file.", show_default=False)],
    questions: Annotated[list[str], typer.Argument(help="One or more questions; the media is encoded once for all.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    system: SystemOpt = None,
    fps: FpsOpt = None,
    min_frames: MinFramesOpt = None,
    max_frames: MaxFramesOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    max_visual_tokens: MaxVisualTokensOpt = None,
    prune: PruneOpt = True,
    prune_threshold: PruneThresholdOpt = 0.1,
    format: FormatOpt = "text",
    out: OutOpt = None,
    stream: StreamOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Answer questions about an image or a video."""
    settings = _settings(locals())
    _answer(media, list(questions), settings, format, out, stream, debug)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 batch videos/ photos/*.jpg --out captions.jsonl\n\n"
        "  find /data -name '*.mp4' | vl3 batch --files-from - --out captions.jsonl --question \"Is anyone cooking?\"\n\n"
        "  vl3 batch /data --ext mp4,mkv --shard $SLURM_ARRAY_TASK_ID/16 --out part-$SLURM_ARRAY_TASK_ID.jsonl\n\n"
        "Re-running the same command resumes: items already in --out are skipped. "
        "Exit codes: 0 all done, 1 some items failed, 2 usage error, 130 interrupted."
    )
)
def batch(
    inputs: Annotated[list[str] | None, typer.Argument(help="Folders (recursive), files or glob patterns.", show_default=False)] = None,
    files_from: Annotated[str | None, typer.Option(help="Read more paths from this file, one per line (- = stdin).")] = None,
    ext: Annotated[list[str] | None, typer.Option(help="Extensions to pick in folders and globs, e.g. mp4,mov (default: common image and video types).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "--question", "-p", help="The prompt for every file (default: describe the image/video).")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: process only shard K (0-based) of N; each file lands in exactly one shard.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip items already in --out (the default).")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also redo items whose record in --out is an error.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start --out afresh.")] = False,
    batch_size: Annotated[int, typer.Option(help="Answers generated together in one forward pass (1 = one file at a time).")] = 8,
    workers: Annotated[int, typer.Option(help="Threads decoding the next files while the model works.")] = 2,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    system: SystemOpt = None,
    fps: FpsOpt = None,
    min_frames: MinFramesOpt = None,
    max_frames: MaxFramesOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    max_visual_tokens: MaxVisualTokensOpt = None,
    prune: PruneOpt = True,
    prune_threshold: PruneThresholdOpt = 0.1,
    format: FormatOpt = "jsonl",
    out: OutOpt = None,
    stream: StreamOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Caption or question many files into a JSONL file, resumably."""
    from . import batch as b

    if resume + retry_failed + overwrite > 1:
        raise UsageError("choose one of --resume, --retry-failed, --overwrite")
    if format != "jsonl":
        raise UsageError("batch writes JSONL (one record per file); --format text/json are for describe and ask")
    if stream:
        raise UsageError("batch does not stream text; its records go to --out (or stdout) as JSONL")
    if not inputs and files_from is None:
        raise UsageError("give folders, files or globs to process, or --files-from FILE")
    mode = "retry-failed" if retry_failed else "overwrite" if overwrite else "resume"
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    shard_kn = b.parse_shard(shard)
    settings = _settings(locals())
    items = [p for p in b.expand_inputs(inputs or [], files_from, b.parse_exts(ext)) if b.in_shard(p, shard_kn)]
    plan = b.plan(items, out, mode)
    summary = b.Summary(total=len(items), done_before=plan.done, failed_before=plan.failed_before)
    if plan.todo:
        summary = _run_batch(plan, settings, prompt, out, summary, debug, batch_size, workers)
    print(summary.line(), file=sys.stderr)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _run_batch(plan, settings, prompt: str | None, out: Path | None, summary, debug: bool, batch_size: int, workers: int):
    from . import batch as b
    from .pipeline import Pipeline

    pipeline = Pipeline(settings).load()
    _debug_line(debug, f"model: {settings.model} -> {pipeline.engine.path} ({pipeline.engine.device}, {pipeline.engine.dtype}, quantize={pipeline.engine.quantize})")
    progress, task = b.progress_bar(summary.total, summary.done_before + summary.failed_before)

    def on_item(path: str, result) -> None:
        if not result.ok:
            progress.console.print(f"warning: {result.error}", markup=False, highlight=False, soft_wrap=True)
        progress.update(task, advance=1, ok=summary.ok, failed=summary.failed)

    sink = open(out, "a", encoding="utf-8") if out is not None else nullcontext(sys.stdout)  # noqa: SIM115
    with sink as f, b.StopSignal() as stop, progress:
        results = pipeline.run_many(plan.todo, prompt, check=stop.check, slots=batch_size, workers=workers)
        b.write_results(results, f, summary, stop, on_item)
    return summary


def main() -> None:
    """Console entry point: one-line errors, exit codes, tracebacks only when debugging."""
    debug = "--debug" in sys.argv[1:] or _env_debug()
    try:
        code = app(prog_name="vl3", standalone_mode=False)
    except Vl3Error as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # the command line itself is wrong (unknown option, bad value)
        ctx = getattr(e, "ctx", None)
        print(f"Error: {e.format_message()} (see '{ctx.command_path if ctx else 'vl3'} --help')", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `vl3 ... | head`
        sys.stderr.close()
        sys.exit(1)
    except OSError as e:  # e.g. --out in a folder that does not exist
        if debug:
            import traceback

            traceback.print_exc()
        print(f"Error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
