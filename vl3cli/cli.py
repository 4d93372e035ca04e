"""The `vl3` command line: describe, ask, batch.

Thin Typer commands over the Python API (api.py: `load()` once, then `Model.run`), with
batch.py (inputs, resume, progress) and outfile.py (where results may be written). Options
shared by the commands are defined once as `Annotated` aliases below; they are the API's
keyword options under the same names (`Options`). Importing this module imports no
torch / transformers / media / hub libraries, so `vl3 --help` and shell completion stay fast
(tests check it); those are imported inside the command bodies.

Errors: library code raises `Vl3Error`; `main()` prints one line `Error: ...` on stderr and exits
with the error's code (usage errors 2, others 1); a traceback only with `--debug` or
`VL3_DEBUG=1`. stdout carries results only.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Literal

import typer

from . import __version__
from .errors import UsageError, Vl3Error
from .hub import DEFAULT_MODEL, model_label

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
    typer.Option(help="Weights and activations; auto = the checkpoint's dtype where the hardware runs it natively.", rich_help_panel=MODEL),
]
QuantizeOpt = Annotated[
    Literal["int8", "int4"] | None,
    typer.Option(help="Weight-only quantization of the language model: less memory, faster decoding on CPU.", rich_help_panel=MODEL),
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
SegmentsOpt = Annotated[str | None, typer.Option(help="Cut videos into segments and answer each: SECONDS per window, or 'scenes' (shot boundaries).", show_default=False, rich_help_panel=SEGMENTS)]
MinSegmentOpt = Annotated[float | None, typer.Option(help="Scenes: shorter shots merge with a neighbour (default 2 s).", show_default=False, rich_help_panel=SEGMENTS)]
MaxSegmentOpt = Annotated[float | None, typer.Option(help="Scenes: longer shots are split into equal parts (default 60 s).", show_default=False, rich_help_panel=SEGMENTS)]
SceneThresholdOpt = Annotated[float, typer.Option(help="Scenes: how different two frames must be to make a cut (FFmpeg scdet score, 0-100).", rich_help_panel=SEGMENTS)]
FormatOpt = Annotated[Literal["text", "json", "jsonl", "srt", "vtt"], typer.Option("--format", "-f", help="text, json (one object; an array for several answers), jsonl (one object per line), srt or vtt (subtitles, one cue per answer).", rich_help_panel=OUTPUT)]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Write results to this file (- = stdout).", rich_help_panel=OUTPUT)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (jsonl otherwise appends to a vl3 file).", rich_help_panel=OUTPUT)]
StreamOpt = Annotated[bool | None, typer.Option("--stream/--no-stream", help="Print text token by token (default: when stdout is a terminal).", show_default=False, rich_help_panel=OUTPUT)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Tracebacks, timings, the resolved model and native decoder logs on stderr (also VL3_DEBUG=1).", rich_help_panel=OUTPUT)]


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


def _options(params: dict):
    """The request options (`vl3cli.options.Options`) from a command's parameters (its `locals()`)."""
    from dataclasses import fields

    from .options import Options

    return Options.from_kwargs(**{f.name: params[f.name] for f in fields(Options) if f.name in params})


def _env_debug() -> bool:
    return os.environ.get("VL3_DEBUG", "") not in ("", "0")


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
    from .api import load

    with _Spinner(f"Loading {params['model']}"):
        model = load(**{k: params[k] for k in LOAD_KEYS}, **_as_kwargs(options))
    label = model.label
    _debug_line(f"model: {label.model} -> {model.engine.path} (device {label.device}, dtype {label.dtype}, "
                f"quantize {label.quantize or 'none'})")  # fmt: skip
    return model


def _as_kwargs(options) -> dict:
    from dataclasses import asdict

    return asdict(options)


class _InOrder:
    """describe / ask output: answers in question order, each written as soon as it and every
    earlier one are done; with `stream` the current answer's text goes out as it grows (later
    answers decoding alongside are held until their turn)."""

    def __init__(self, writer, prompts: list[str | None], stream: bool):
        self.writer, self.prompts, self.stream = writer, prompts, stream
        self.next = 0
        self.finished: dict[int, object] = {}
        self.held: dict[int, str] = {}
        self.midline = False  # streamed text without its final newline yet
        self.headed = False  # the current answer's header is out

    def _out(self, text: str) -> None:
        if text:
            self.writer.out.write(text)
            self.writer.out.flush()
            self.midline = not text.endswith("\n")

    def _head(self) -> None:
        if not self.headed:
            self._out(self.writer.header(self.prompts[self.next % len(self.prompts)]))
            self.headed = True

    def piece(self, key, piece: str) -> None:
        i = key[1]
        if i != self.next:
            self.held[i] = self.held.get(i, "") + piece
            return
        self._head()
        self._out(self.writer.clean(piece))

    def done(self, i: int, result) -> None:
        self.finished[i] = result
        while self.next in self.finished:
            result = self.finished.pop(self.next)
            if self.stream:
                self._head()
                self._out("\n")
                self.writer.write(result, streamed=True)
            else:
                self.writer.write(result)
            self.next += 1
            self.headed = False
            if self.stream and self.next < len(self.prompts) and self.next in self.held:
                self._head()
                self._out(self.writer.clean(self.held.pop(self.next)))

    def close(self) -> None:
        if self.midline:  # Ctrl-C in the middle of a streamed answer: end its line
            self._out("\n")
        self.writer.close()


def _answer(media: list[str], prompts: list[str | None], params: dict) -> None:
    """describe / ask: some media (or none), one or more prompts, results to stdout or --out."""
    from .outfile import Target, check_replaceable, opened
    from .output import Writer
    from .pipeline import Item

    fmt, stream, overwrite = params["format"], params["stream"], params["overwrite"]
    target = Target.of(params["out"])
    if stream and (fmt != "text" or target.path is not None):
        raise UsageError("--stream prints text to the terminal; it cannot be combined with --format json/jsonl/srt/vtt or --out")
    options = _options(params)
    if stream and options.segments is not None:
        raise UsageError("--stream shows one answer as it grows; with --segments each segment's line is printed when it is done")
    check_replaceable(target, fmt, overwrite)
    _check_media(media)  # before loading the model
    with opened(target, replace=overwrite or fmt != "jsonl") as f:
        model = _load(params, options)
        terminal = f.isatty()
        if stream is None:
            stream = fmt == "text" and terminal and options.segments is None
        many = len(prompts) > 1 or options.segments is not None
        printer = _InOrder(Writer(fmt, f, many=many, terminal=terminal, questions=len(prompts) > 1), prompts, stream)
        spinner = _Spinner(f"Reading {', '.join(media)} and answering" if media else "Answering")
        try:
            on_text = (lambda key, piece: (spinner.stop(), printer.piece(key, piece))) if stream else None
            for (_, i), result in model.run([Item(tuple(media), tuple(prompts))], on_text=on_text):
                spinner.stop()
                result.raise_error()
                if i % len(prompts) == 0:
                    _warn(result.warnings)
                if fmt in ("srt", "vtt") and result.kind != "video":
                    raise UsageError(f"--format {fmt} writes subtitles for a video; {result.path or 'this prompt'} is not one")
                printer.done(i, result)
                _debug_line(f"timings: {_timings(result)} tokens={result.generated_tokens} ({result.finish_reason})")
        finally:
            spinner.stop()
            printer.close()


def _check_media(media: list[str]) -> None:
    """Local files must exist and be readable, URLs be well formed, before the model loads."""
    from .media import check_input

    for path in media:
        check_input(path)


def _split_media(args: list[str], questions: list[str]) -> tuple[list[str], list[str]]:
    """`vl3 ask` arguments -> (media, questions): existing files and URLs are media, the rest questions
    (then those given with -q). A word that looks like a media file name but is missing is an error."""
    import os

    from .batch import DEFAULT_EXTS
    from .errors import MediaError
    from .fetch import is_url

    media, asked = [], []
    for arg in args:
        if is_url(arg) or os.path.exists(arg):
            media.append(arg)
        elif not any(c.isspace() for c in arg) and arg.rpartition(".")[2].lower() in DEFAULT_EXTS:
            raise MediaError(f"{arg}: no such file")
        else:
            asked.append(arg)
    return media, asked + questions


def _warn(lines, console=None) -> None:
    """`warning: ...` lines on stderr (through the progress bar's console while it shows)."""
    for line in lines:
        if console is None:
            print(f"warning: {line}", file=sys.stderr)
        else:
            console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


def _timings(result) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in result.to_dict()["timings"].items())


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 describe photo.jpg\n\n"
        "  vl3 describe clip.mp4 --fps 2 --max-frames 64 --format json\n\n"
        "  vl3 describe clip.mp4 --prompt \"Summarise this video in one sentence.\" -m DAMO-NLP-SG/VideoLLaMA3-7B"
    )
)
def describe(
    media: Annotated[str, typer.Argument(help="Image or video file, or an http(s) URL.", show_default=False)],
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
    segments: SegmentsOpt = None,
    min_segment: MinSegmentOpt = None,
    max_segment: MaxSegmentOpt = None,
    scene_threshold: SceneThresholdOpt = 10.0,
    format: FormatOpt = "text",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    stream: StreamOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Caption an image or a video."""
    _answer([media], [prompt], locals())


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 ask photo.jpg \"How many people are in the picture?\"\n\n"
        "  vl3 ask clip.mp4 \"What happens first?\" \"What happens last?\" --format jsonl\n\n"
        "  vl3 ask before.jpg after.jpg -q \"What changed?\"\n\n"
        "  vl3 ask -q \"What colour is a banana?\"\n\n"
        "  vl3 ask clip.mp4 \"Where is the ball?\" --start 10 --end 20 --fps 4"
    )
)
def ask(
    args: Annotated[list[str] | None, typer.Argument(metavar="[MEDIA]... [QUESTION]...", help="Images, videos or URLs (existing files and URLs are media), then questions.", show_default=False)] = None,
    question: Annotated[list[str] | None, typer.Option("--question", "-q", help="A question (repeatable); the media is read and encoded once for all.")] = None,
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
    segments: SegmentsOpt = None,
    min_segment: MinSegmentOpt = None,
    max_segment: MaxSegmentOpt = None,
    scene_threshold: SceneThresholdOpt = 10.0,
    format: FormatOpt = "text",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    stream: StreamOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Answer questions about images and videos (or none: a text-only prompt); each answer is written as soon as it is done."""
    media, questions = _split_media(args or [], question or [])
    if not questions:
        raise UsageError("give a question (after the media, or with -q); to caption media use `vl3 describe`")
    _answer(media, questions, locals())


CHAT_HELP = """Commands: /reset (forget the questions, keep the media), /save FILE (the conversation as JSON),
/help, /exit. Ctrl-C stops an answer (the conversation goes on); Ctrl-D or /exit ends it."""


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 chat clip.mp4\n\n"
        "  vl3 chat before.jpg after.jpg --system \"Answer in one sentence.\"\n\n"
        "  vl3 chat clip.mp4 < questions.txt --format jsonl\n\n"
        "In a terminal: /reset, /save FILE, /help, /exit; Ctrl-C stops an answer, Ctrl-D ends. "
        "With stdin not a terminal, each line is a question and each answer is written when done."
    )
)
def chat(
    media: Annotated[list[str] | None, typer.Argument(help="Images, videos or URLs to talk about (none: text only).", show_default=False)] = None,
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
    format: Annotated[Literal["text", "jsonl"], typer.Option("--format", "-f", help="When stdin is not a terminal: text or jsonl (one record per answer).", rich_help_panel=OUTPUT)] = "text",
    debug: DebugOpt = False,
) -> None:
    """Talk about images and videos: follow-up questions see the earlier answers; the media is read once."""
    media = list(media or [])
    options = _options(locals())
    _check_media(media)
    model_ = _load(locals() | {"model": model}, options)
    conversation = model_.chat(media, **_as_kwargs(options))
    if media:
        with _Spinner(f"Reading {', '.join(media)}"):
            conversation.read()
    if sys.stdin.isatty():
        _chat_terminal(conversation)
    else:
        _chat_lines(conversation, format)


def _chat_terminal(conversation) -> None:
    """The interactive loop: readline editing and history, streamed answers, slash commands."""
    import readline  # noqa: F401 -- line editing and history for input()

    from .errors import ContextError

    about = ", ".join(conversation.media) or "nothing (text only)"
    print(f"Talking about {about} with {conversation.model.name}. /help for commands, Ctrl-D to end.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line:
            continue
        if line.startswith("/"):
            if _chat_command(conversation, line):
                return
            continue
        printer = _StreamedLine()
        try:
            conversation.ask(line, on_text=printer.write)
            printer.end()
        except KeyboardInterrupt:
            printer.end()
            print("(answer stopped; ask again or go on)", file=sys.stderr)
        except ContextError as e:
            printer.end()
            print(f"Error: the conversation no longer fits the model's context ({e}); /reset starts again with the same media",
                  file=sys.stderr)  # fmt: skip
        except Vl3Error as e:
            printer.end()
            print(f"Error: {e}", file=sys.stderr)


class _StreamedLine:
    """An answer streamed to the terminal (control characters removed), ended with one newline."""

    def __init__(self):
        self.started = False

    def write(self, piece: str) -> None:
        from .output import terminal_safe

        sys.stdout.write(terminal_safe(piece))
        sys.stdout.flush()
        self.started = True

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _chat_command(conversation, line: str) -> bool:
    """Run a /command; True when the conversation ends."""
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        conversation.reset()
        print("(the conversation starts again; the media stays)", file=sys.stderr)
    elif name == "/save":
        if not arg.strip():
            print("Error: /save needs a file name, e.g. /save talk.json", file=sys.stderr)
        else:
            try:
                path = conversation.save(arg.strip())
                print(f"(saved to {path})", file=sys.stderr)
            except Vl3Error as e:
                print(f"Error: {e}", file=sys.stderr)
    elif name == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        print(f"Error: unknown command {name} (/help lists them)", file=sys.stderr)
    return False


def _chat_lines(conversation, fmt: str) -> None:
    """stdin is not a terminal: each line is a question; each answer is written as soon as it is done."""
    from .output import Writer

    writer = Writer(fmt, sys.stdout, many=True)
    failed = False
    for line in sys.stdin:
        question = line.strip()
        if not question:
            continue
        try:
            result = conversation.ask(question)
        except Vl3Error as e:
            failed = True
            print(f"Error: {question!r}: {e}", file=sys.stderr)
            continue
        writer.write(result)
    writer.close()
    if failed:
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 serve\n\n"
        "  vl3 serve -m DAMO-NLP-SG/VideoLLaMA3-7B --port 8080 --api-key $VL3_API_KEY --max-batch 16\n\n"
        "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
        "-d '{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", "
        "\"image_url\": {\"url\": \"https://example.com/cat.jpg\"}}, {\"type\": \"text\", \"text\": \"What is this?\"}]}]}'\n\n"
        "The options below set the defaults of every request; a request's own fields override them."
    )
)
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="VL3_API_KEY", help="Require 'Authorization: Bearer KEY' on every /v1 request.", show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Answers generated together in one forward pass.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a free row; beyond, the server answers 503.")] = 64,
    workers: Annotated[int, typer.Option(help="Threads reading media (downloads, decoding) off the event loop.")] = 2,
    allow_local_files: Annotated[bool, typer.Option("--allow-local-files", help="Accept file:// media URLs (files this machine can read).")] = False,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body, in MB (413 above).")] = 64,
    max_download_mb: Annotated[int, typer.Option(help="Largest media download for an http(s) URL, in MB (413 above).")] = 1024,
    max_video_seconds: Annotated[float, typer.Option(help="Longest video a request may send, in seconds (400 above).")] = 3600.0,
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
    debug: DebugOpt = False,
) -> None:
    """Serve the model over HTTP with OpenAI's chat-completions API (images and videos in messages)."""
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--workers", workers),
                        ("--max-body-mb", max_body_mb), ("--max-download-mb", max_download_mb), ("--max-video-seconds", max_video_seconds)):  # fmt: skip
        if value < (0 if name == "--max-queue" else 1):
            raise UsageError(f"{name} must be at least {0 if name == '--max-queue' else 1} (got {value})")
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535 (got {port})")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("vl3 serve needs FastAPI and uvicorn: pip install 'vl3cli[serve]'") from None
    from .server import Limits
    from .server import serve as run_server

    options = _options(locals())
    loaded = _load(locals() | {"model": model}, options)
    loaded.runner.max_duration = max_video_seconds
    loaded.runner.max_download_bytes = max_download_mb * 1024 * 1024
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model", file=sys.stderr)
    limits = Limits(max_body_bytes=max_body_mb * 1024 * 1024, max_batch=max_batch, max_queue=max_queue, allow_local_files=allow_local_files)
    print(f"Serving {loaded.name} on http://{host}:{port}/v1 (OpenAI chat completions); Ctrl-C stops.", file=sys.stderr)
    run_server(loaded, host, port, limits, api_key, workers, log_level="info" if _env_debug() else "warning")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 batch videos/ photos/*.jpg --out captions.jsonl\n\n"
        "  find /data -name '*.mp4' | vl3 batch --files-from - --out captions.jsonl --question \"Is anyone cooking?\"\n\n"
        "  vl3 batch /data --ext mp4,mkv --shard $SLURM_ARRAY_TASK_ID/16 --out part-$SLURM_ARRAY_TASK_ID.jsonl\n\n"
        "  vl3 batch --manifest items.jsonl --out results.jsonl\n\n"
        "  vl3 batch /data --engine ray --actors 8 --out captions.parquet\n\n"
        "Re-running the same command resumes: items already in --out with the same prompt, options and model "
        "are skipped. Exit codes: 0 all done, 1 some items failed, 2 usage error, 130 interrupted."
    )
)
def batch(
    inputs: Annotated[list[str] | None, typer.Argument(help="Folders (recursive), files, glob patterns or URLs.", show_default=False)] = None,
    files_from: Annotated[str | None, typer.Option(help="Read more paths or URLs from this file, one per line (- = stdin).")] = None,
    manifest: Annotated[str | None, typer.Option(help="A JSONL file of items instead of INPUTS: {\"id\": ..., \"media\": [...], \"prompt\": ...} per line (- = stdin).")] = None,
    ext: Annotated[list[str] | None, typer.Option(help="Extensions to pick in folders and globs, e.g. mp4,mov (default: common image and video types).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "--question", "-p", help="The prompt for every file (default: describe the image/video).")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: process only shard K (0-based) of N; each file lands in exactly one shard.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip items already in --out (the default).")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also redo items whose record in --out is an error.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start --out afresh (also replaces a file that is not a vl3 results file).")] = False,
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
    segments: SegmentsOpt = None,
    min_segment: MinSegmentOpt = None,
    max_segment: MaxSegmentOpt = None,
    scene_threshold: SceneThresholdOpt = 10.0,
    out: Annotated[str | None, typer.Option("--out", "-o", help="The JSONL file to append to and resume from, or a .parquet file (default and - : stdout, no resume).", rich_help_panel=OUTPUT)] = None,
    debug: DebugOpt = False,
    engine: Annotated[Literal["local", "ray"], typer.Option(help="local: this process; ray: a Ray cluster, files read in CPU tasks, answered by --actors model replicas (pip install 'vl3cli\\[ray]').", rich_help_panel=RAY)] = "local",
    actors: Annotated[int, typer.Option(help="Model replicas (Ray actors), e.g. one per GPU.", rich_help_panel=RAY)] = 1,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (default: 1 when the cluster has GPUs and --device is not cpu, else 0).", show_default=False, rich_help_panel=RAY)] = None,
    ray_address: Annotated[str | None, typer.Option(help="The Ray cluster to join: auto, ray://HEAD:10001, ... (default: start or join a local Ray).", show_default=False, rich_help_panel=RAY)] = None,
) -> None:
    """Caption or question many files into a JSONL (or Parquet) file, resumably."""
    from . import batch as b
    from .outfile import Target, create_empty

    if resume + retry_failed + overwrite > 1:
        raise UsageError("choose one of --resume, --retry-failed, --overwrite")
    if manifest is not None and (inputs or files_from is not None):
        raise UsageError("--manifest lists every item: give it without INPUTS or --files-from")
    if not inputs and files_from is None and manifest is None:
        raise UsageError("give folders, files or globs to process, --files-from FILE or --manifest FILE")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    ray_settings = None
    if engine == "ray":
        from .distributed import RaySettings

        ray_settings = RaySettings(ray_address, actors, gpus_per_actor, batch_size, debug or _env_debug())
    else:
        ray_only = {"--actors": actors != 1, "--gpus-per-actor": gpus_per_actor is not None, "--ray-address": ray_address is not None}
        if given := [name for name, used in ray_only.items() if used]:
            raise UsageError(f"{given[0]} is for --engine ray")
    mode = "retry-failed" if retry_failed else "overwrite" if overwrite else "resume"
    options = _options(locals())
    target = Target.of(out)
    shard_kn = b.parse_shard(shard)
    if manifest is not None:
        entries = b.read_manifest(manifest, prompt)
    else:
        entries = [b.Entry((p,), prompt) for p in b.expand_inputs(inputs or [], files_from, b.parse_exts(ext))]
    entries = [e for e in entries if b.in_shard(e.shard_key, shard_kn)]
    base = {"system": system, "model": model_label(model, revision), "quantize": quantize}
    keys = {b.record_key({"id": e.id, "media": list(e.media), "options": options.record(e.prompt), **base}): e for e in entries}
    segmented = options.segments is not None
    plan = b.plan_segments(keys, target, mode) if segmented else b.plan(keys, target, mode)
    if not segmented:
        plan.todo = [(e, frozenset()) for e in plan.todo]
    summary = b.Summary(total=len(entries), done_before=plan.done, failed_before=plan.failed_before, segments=segmented)
    create_empty(target)  # an empty shard still leaves its (empty) file
    if plan.todo:
        _run_batch(plan.todo, options, locals(), target, mode, summary)
    print(summary.line(), file=sys.stderr)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _run_batch(todo: list[tuple], options, params: dict, target, mode: str, summary) -> None:
    from . import batch as b
    from .outfile import opened

    with _engine(params, options) as results:
        total = None if summary.segments else summary.total  # segments: how many is known file by file
        progress, task = b.progress_bar(total, summary.done_before + summary.failed_before)

        def on_item(result) -> None:
            _warn(result.warnings if result.ok else [result.error], progress.console)
            progress.update(task, advance=1, ok=summary.ok, failed=summary.failed)

        with opened(target, replace=mode == "overwrite") as f, b.StopSignal() as stop, progress:
            b.write_results(results(todo, stop), f, summary, stop, on_item)


@contextmanager
def _engine(params: dict, options):
    """What answers a batch: `results(todo, stop)` -> Results (one per (batch.Entry, segments to skip) pair, or one
    per segment when segmenting), from the model loaded in this
    process (`--engine local`) or from actors on a Ray cluster (`--engine ray`, distributed.py)."""
    if params["ray_settings"] is not None:
        from .distributed import RayEngine

        with _Spinner("Starting Ray"):
            engine = RayEngine.start(**{k: params[k] for k in LOAD_KEYS}, options=options, settings=params["ray_settings"])
        with engine:
            yield engine.results
        return
    from .pipeline import Item

    model = _load(params, options)

    def results(todo: list, stop):
        items = (Item(e.media, (e.prompt,), e.id, skip=skip, prepared=UsageError(e.error) if e.error else None)
                 for e, skip in todo)  # fmt: skip
        for _, result in model.run(items, batch_size=params["batch_size"], workers=params["workers"], check=stop.check):
            yield result

    yield results


def main() -> None:
    """Console entry point: one-line errors, exit codes, tracebacks only when debugging."""
    debug = "--debug" in sys.argv[1:] or _env_debug()
    before = os.environ.get("VL3_DEBUG")
    if debug:
        os.environ["VL3_DEBUG"] = "1"  # the library's quiet-by-default parts (Hub retries, decoder logs) read it
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
    except OSError as e:  # e.g. --out on a full disk, or /dev/full
        if debug:
            import traceback

            traceback.print_exc()
        print(f"Error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if before is None:
            os.environ.pop("VL3_DEBUG", None)
        else:
            os.environ["VL3_DEBUG"] = before
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
