"""`vl3 describe` and `vl3 ask`: answers about some media (or none), in question order.

Each answer is written as soon as it and every earlier one are done (`_InOrder`); with
`--stream` the current one goes out token by token; with `--segments` one line (or cue) per
segment of a long video, in time order.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..output import charge_shared_work
from .app import (
    FormatOpt,
    OutOpt,
    OverwriteOpt,
    StreamOpt,
    _check_media,
    _debug_line,
    _load,
    _options,
    _params,
    _require,
    _Spinner,
    _timings,
    _warn,
    app,
    with_options,
)


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
            charge_shared_work(self.finished[self.next], list(self.finished.values()))
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

    def close(self, complete: bool = True) -> None:
        """End the output. A run that failed before any answer was written writes nothing: not an
        empty JSON array or a bare WEBVTT header that would read as a run without answers (and so,
        with --out, no file is created or replaced: outfile.opened_on_write). An interrupted run
        that wrote answers closes its document (a JSON array gets its `]`)."""
        if self.midline:  # Ctrl-C in the middle of a streamed answer: end its line
            self._out("\n")
        if complete or self.writer.count:
            self.writer.close()


def _answer(media: list[str], prompts: list[str | None], params: dict) -> None:
    """describe / ask: some media (or none), one or more prompts, results to stdout or --out."""
    from ..api import check_segmentable, media_paths, question_list, refuse_unsegmented
    from ..outfile import Target, check_replaceable, check_writable, opened_on_write
    from ..output import Writer
    from ..pipeline import Item

    media, prompts = list(media_paths(media)), list(question_list(prompts, "question"))  # no empty path or question
    fmt, stream, overwrite = params["format"], params["stream"], params["overwrite"]
    target = Target.of(params["out"])
    if stream and (fmt != "text" or target.path is not None):
        raise UsageError("--stream prints text to the terminal; it cannot be combined with --format json/jsonl/srt/vtt or --out")
    options = _options(params)
    if stream and options.segments is not None:
        raise UsageError("--stream shows one answer as it grows; with --segments each segment's line is printed when it is done")
    check_replaceable(target, fmt, overwrite)
    check_writable(target)
    if target.path is None:
        _require("stdout")
    _check_media(media)  # before loading the model
    if options.segments is not None and len(media) != 1:
        raise UsageError(f"--segments cuts one video into segments (got {len(media)} media)")
    if options.segments is not None:
        check_segmentable(media[0])  # an image has no segments (batch, unlike describe, takes it as one)
    if fmt in ("srt", "vtt"):
        _check_subtitled(media, fmt)  # before the model loads
    # The file is created, appended to or replaced only once the first answer is written: a run that
    # fails before (bad options, model or media) leaves it as it was. describe / ask raise on an
    # error rather than write an error record, so an error-only run writes no file in any format.
    with opened_on_write(target, replace=overwrite or fmt != "jsonl") as f:
        model = _load(params, options)
        terminal = f.isatty()
        if stream is None:
            stream = fmt == "text" and terminal and options.segments is None
        many = len(prompts) > 1 or options.segments is not None
        printer = _InOrder(Writer(fmt, f, many=many, terminal=terminal, questions=len(prompts) > 1), prompts, stream)
        spinner = _Spinner(f"Reading {', '.join(media)} and answering" if media else "Answering")
        complete = False
        try:
            on_text = (lambda key, piece: (spinner.stop(), printer.piece(key, piece))) if stream else None
            for (_, i), result in model.run([Item(tuple(media), tuple(prompts))], on_text=on_text):
                spinner.stop()
                result.raise_error()
                if options.segments is not None:
                    refuse_unsegmented(result)  # a URL that turned out to be an image
                if i % len(prompts) == 0:
                    _warn(result.warnings)
                if fmt in ("srt", "vtt") and result.kind != "video":
                    raise UsageError(f"--format {fmt} writes subtitles for a video; {result.path or 'this prompt'} is not one")
                printer.done(i, result)
                _debug_line(f"timings: {_timings(result)} tokens={result.generated_tokens} ({result.finish_reason})")
            complete = True
        finally:
            spinner.stop()
            printer.close(complete)


def _check_subtitled(media: list[str], fmt: str) -> None:
    """Subtitles are for one video; a local file is judged now (a URL once it is fetched)."""
    from ..fetch import is_url
    from ..media import detect_kind

    if len(media) != 1 or (not is_url(media[0]) and detect_kind(media[0]) != "video"):
        what = media[0] if len(media) == 1 else f"{len(media)} media" if media else "a text-only prompt"
        raise UsageError(f"--format {fmt} writes subtitles for one video; {what} is not one")


def _split_media(args: list[str], questions: list[str]) -> tuple[list[str], list[str]]:
    """`vl3 ask` arguments -> (media, questions): existing files and URLs are media, the rest questions
    (then those given with -q). A folder is a word ("why"); a FIFO or a device is media, refused as
    one (not a regular file). A word that looks like a media file name but is no file is an error."""
    import os

    from ..errors import MediaError
    from ..fetch import is_url
    from ..inputs import DEFAULT_EXTS

    media, asked = [], []
    for arg in args:
        if is_url(arg) or (os.path.exists(arg) and not os.path.isdir(arg)):
            media.append(arg)
        elif not any(c.isspace() for c in arg) and arg.rpartition(".")[2].lower() in DEFAULT_EXTS:
            raise MediaError(f"{arg}: {'not a regular file' if os.path.isdir(arg) else 'no such file'}")
        else:
            asked.append(arg)
    return media, asked + questions


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 describe photo.jpg\n\n"
        "  vl3 describe clip.mp4 --fps 2 --max-frames 64 --format json\n\n"
        "  vl3 describe clip.mp4 --prompt \"Summarise this video in one sentence.\" -m DAMO-NLP-SG/VideoLLaMA3-7B"
    )
)
@with_options("model", "decoding", "media", "segments", "debug")
def describe(
    media: Annotated[str, typer.Argument(help="Image or video file, or an http(s) URL.", show_default=False)],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Instead of \"Describe this image/video in detail.\"")] = None,
    format: FormatOpt = "text",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    stream: StreamOpt = None,
    **options,
) -> None:
    """Caption an image or a video."""
    _answer([media], [prompt], _params(locals()))


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
@with_options("model", "decoding", "media", "segments", "debug")
def ask(
    args: Annotated[list[str] | None, typer.Argument(metavar="[MEDIA]... [QUESTION]...", help="Images, videos or URLs (existing files and URLs are media), then questions.", show_default=False)] = None,
    question: Annotated[list[str] | None, typer.Option("--question", "-q", help="A question (repeatable); the media is read and encoded once for all.")] = None,
    format: FormatOpt = "text",
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    stream: StreamOpt = None,
    **options,
) -> None:
    """Answer questions about images and videos (or none: a text-only prompt); each answer is written as soon as it is done."""
    media, questions = _split_media(args or [], question or [])
    if not questions:
        raise UsageError("give a question (after the media, or with -q); to caption media use `vl3 describe`")
    _answer(media, questions, _params(locals()))
