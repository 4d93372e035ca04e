"""`vl3 chat`: a conversation about some media, in a terminal (readline, streaming, slash
commands) or one question per line of stdin."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer

from ..errors import Vl3Error
from .app import (
    OUTPUT,
    Terminated,
    _as_kwargs,
    _check_media,
    _load,
    _options,
    _params,
    _require,
    _Spinner,
    app,
    with_options,
)

CHAT_HELP = """Commands: /reset (forget the questions, keep the media), /save FILE (the conversation as JSON),
/help, /exit. A question that starts with / is written with two (//). Ctrl-C stops an answer
(the conversation goes on); Ctrl-D or /exit ends it."""


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 chat clip.mp4\n\n"
        "  vl3 chat before.jpg after.jpg --system \"Answer in one sentence.\"\n\n"
        "  vl3 chat clip.mp4 < questions.txt --format jsonl\n\n"
        "  vl3 chat --resume talk.json\n\n"
        "Commands: /reset, /save FILE, /help, /exit (//text asks \"/text\"); in a terminal Ctrl-C stops an answer, "
        "Ctrl-D ends. With stdin not a terminal, each line is a question or a command and each answer is "
        "written when done."
    )
)
@with_options("model", "decoding", "media", "debug")
def chat(
    media: Annotated[list[str] | None, typer.Argument(help="Images, videos or URLs to talk about (none: text only).", show_default=False)] = None,
    format: Annotated[Literal["text", "jsonl"], typer.Option("--format", "-f", help="When stdin is not a terminal: text or jsonl (one record per answer).", rich_help_panel=OUTPUT)] = "text",
    resume: Annotated[str | None, typer.Option("--resume", help="Continue a conversation saved with /save FILE (its media and system prompt unless given).", show_default=False)] = None,
    **options,
) -> None:
    """Talk about images and videos: follow-up questions see the earlier answers; the media is read once."""
    from ..api import media_paths
    from ..chat import saved_chat

    params = _params(locals())
    media = list(media_paths(media or []))  # no empty path
    if resume is not None:
        saved = saved_chat(resume)  # before the model loads: a wrong file costs nothing
        media = media or saved["media"]
        if params.get("system") is None:
            params["system"] = saved["system"]
    request = _options(params)
    _require("stdin")  # the questions
    _require("stdout")  # the answers
    _check_media(media)
    conversation = _load(params, request).chat(media, **_as_kwargs(request))
    if media:
        with _Spinner(f"Reading {', '.join(media)}"):
            conversation.read()
    if resume is not None:
        conversation.resume(resume)
        print(f"(continuing {resume}: {len(conversation.restored)} questions and answers)", file=sys.stderr)
    if sys.stdin.isatty():
        _chat_terminal(conversation)
    else:
        _chat_lines(conversation, format)


def _chat_terminal(conversation) -> None:
    """The interactive loop: readline editing and history, streamed answers, slash commands."""
    import readline  # noqa: F401 -- line editing and history for input()

    from ..errors import ContextError

    about = ", ".join(conversation.media) or "nothing (text only)"
    print(f"Talking about {about} with {conversation.model.name}. /help for commands, Ctrl-D to end.", file=sys.stderr)
    # input() writes its prompt to stdout, the answers' stream; readline needs it there only on a terminal
    prompt = "> " if sys.stdout.isatty() else ""
    while True:
        try:
            if not prompt:
                print("> ", end="", file=sys.stderr, flush=True)
            line = input(prompt).strip()
        except EOFError:
            print(file=sys.stderr)
            return
        except Terminated:  # SIGTERM / SIGHUP end the conversation; Ctrl-C only clears the line
            raise
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError as e:  # a terminal that sends another encoding than the one set
            print(f"Error: the line is not {e.encoding} text ({e.reason}); set the terminal to {e.encoding}",
                  file=sys.stderr)  # fmt: skip
            continue
        if not line:
            continue
        if _is_command(line):
            if _chat_command(conversation, line):
                return
            continue
        line = _question(line)
        printer = _StreamedLine()
        try:
            conversation.ask(line, on_text=printer.write)
            printer.end(answered=True)
        except Terminated:
            printer.end()
            raise
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
    """An answer streamed to stdout (on a terminal, control characters removed), ended with one newline."""

    def __init__(self):
        from ..outfile import Sink

        self.out = Sink(sys.stdout, "stdout")  # a terminal that cannot show a character gets its escape
        self.terminal = sys.stdout.isatty()  # a file gets the answer as generated
        self.started = False

    def write(self, piece: str) -> None:
        from ..output import terminal_safe

        self.out.write(terminal_safe(piece) if self.terminal else piece)
        self.out.flush()
        self.started = True

    def end(self, answered: bool = False) -> None:
        """End the answer's line: an answer (even an empty one) is one line; a question that failed
        or was stopped before any text leaves nothing on stdout."""
        if answered or self.started:
            self.out.write("\n")
            self.out.flush()


def _is_command(line: str) -> bool:
    return line.startswith("/") and not line.startswith("//")


def _question(line: str) -> str:
    """The question a line asks: `//etc` asks `/etc`."""
    return line[1:] if line.startswith("//") else line


def _chat_command(conversation, line: str, where: str = "") -> bool:
    """Run a /command (`where`: "line N: " for a piped one, before its errors); True when the
    conversation ends. Raises Vl3Error for a command that failed (printed here in a terminal)."""
    try:
        return _run_command(conversation, line)
    except Vl3Error as e:
        if where:
            raise Vl3Error(f"{where}{e}") from e
        print(f"Error: {e}", file=sys.stderr)
        return False


def _run_command(conversation, line: str) -> bool:
    name, _, arg = line.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        conversation.reset()
        print("(the conversation starts again; the media stays)", file=sys.stderr)
    elif name == "/save":
        if not arg.strip():
            raise Vl3Error("/save needs a file name, e.g. /save talk.json")
        path = conversation.save(arg.strip())
        print(f"(saved to {path})", file=sys.stderr)
    elif name == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        raise Vl3Error(f"unknown command {name} (/help lists them; //{name[1:]} asks it as a question)")
    return False


def _chat_lines(conversation, fmt: str) -> None:
    """stdin is not a terminal: each line is a question; each answer is written as soon as it is done."""
    from ..outfile import Sink
    from ..output import Writer

    # on a terminal, the answers' control characters are dropped (as in the interactive loop)
    writer = Writer(fmt, Sink(sys.stdout, "stdout"), many=True, terminal=sys.stdout.isatty())
    failed = False
    for number, line in _lines(sys.stdin):
        question = line.strip()
        if not question:
            continue
        if _is_command(question):  # as typed in a terminal: a replayed session does the same
            try:
                if _chat_command(conversation, question, where=f"line {number}: "):
                    break
            except Vl3Error as e:
                failed = True
                print(f"Error: {e}", file=sys.stderr)
            continue
        question = _question(question)
        try:
            result = conversation.ask(question)
        except Vl3Error as e:
            failed = True
            print(f"Error: line {number} ({_abbreviated(question)!r}): {e}", file=sys.stderr)
            continue
        writer.write(result)
    writer.close()
    if failed:
        raise typer.Exit(1)


def _lines(stdin):
    """(number, line) of stdin, read line by line: a line its encoding cannot read (UTF-8 under
    PYTHONIOENCODING=ascii) ends the conversation with one error line, after the answers before it."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream only (tests)
        yield from enumerate(stdin, 1)
        return
    for number, line in enumerate(raw, 1):
        try:
            yield number, line.decode(stdin.encoding)
        except UnicodeDecodeError as e:
            raise Vl3Error(f"line {number} of standard input is not {stdin.encoding} text ({e.reason})") from None


def _abbreviated(text: str, width: int = 60) -> str:
    """The start of a question for an error line (a piped line may be megabytes long)."""
    return text if len(text) <= width else text[:width] + "…"
