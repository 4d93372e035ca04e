"""Conversations: follow-up questions about the same media, each answer kept as it was generated.

    chat = model.chat("clip.mp4")            # `Model.chat` (api.py); the media is read on the first question
    r = chat.ask("What happens first?")      # -> Result
    r = chat.ask("And then?")                # sees the earlier question and answer
    chat.reset()                             # back to just the media
    chat.save("talk.json")                   # the conversation as JSON

Turn k's prompt is turn k-1's prompt, its answer's ids as generated (never re-tokenised), then
the next user turn (`prompt.follow_up_ids`). Each question is one item of the model's run
(`Model.run`): the conversation so far is the item's history, and its media is read once, on the
first question, and kept. The KV of everything said is kept too (`Item.keep_kv`), so a new
question prefills only its own tokens, never the video again. A question that cannot fit in the model's context is refused with the
advice to `/reset`; the conversation stays as it was. So does a question whose answer is
interrupted (Ctrl-C): nothing of it is kept.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .errors import MediaError, UsageError, Vl3Error
from .options import Options
from .output import Result
from .pipeline import Item
from .prompt import Turn

SAVE_FORMAT = "vl3-chat/1"


class Chat:
    def __init__(self, model, media: tuple[str, ...], options: Options):
        self.model, self.media, self.options = model, tuple(media), options
        self.history: list[Turn] = []
        self.results: list[Result] = []
        self.visuals = None  # the media as read for the first question, kept for the conversation
        self.prefix = None  # the KV of everything said so far (engine.Prefix): a new turn prefills only itself
        self._read_s = 0.0  # reading time not yet on a record

    def read(self) -> None:
        """Read the media now rather than on the first question (errors come early). A decoder's
        own exception becomes a MediaError naming the media, as `describe` reports it."""
        if self.visuals is None and self.media:
            try:
                self.visuals, self._read_s = self.model.runner.prepare(Item(media=self.media), self.options)
            except Vl3Error:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder's failure is one error line
                raise MediaError(f"{', '.join(self.media)}: cannot read ({type(e).__name__}: {e})") from e

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Result:
        """The answer to `question`, given everything said so far."""
        from .api import check_callable, checked_question  # api.py imports this module

        question = checked_question(question, "question", none=False)
        check_callable(on_text, "on_text")
        if self.history:
            item = Item(prompts=(question,), history=tuple(self.history), options=self.options, prefix=self.prefix, keep_kv=True)
        else:  # the media's turn: read once and kept, so a first question that fails is not a second read
            self.read()
            prepared = None if self.visuals is None else (self.visuals, self._read_s)
            item = Item(media=self.media, prompts=(question,), options=self.options, prepared=prepared, keep_kv=True)
        stream = (lambda key, piece: on_text(piece)) if on_text else None
        ((_, result),) = list(self.model.run([item], on_text=stream))
        result.raise_error()
        answer = result.state
        if not self.history:
            self.visuals, self._read_s = answer.visuals, 0.0
        visuals = self.visuals if not self.history else ()
        self.history += [Turn("user", question, visuals=tuple(visuals)), Turn("assistant", ids=tuple(answer.ids))]
        self.prefix = answer.prefix
        # the KV lives on in self.prefix only: the Results kept per turn hold no copy of it
        answer.prefix, answer.item = None, replace(answer.item, prefix=None)
        self.results.append(result)
        return result

    def reset(self) -> None:
        """Forget the questions and answers; the media (already read) stays."""
        self.history = []
        self.results = []
        self.prefix = None

    @property
    def prompt_tokens(self) -> int:
        """Tokens the conversation holds (the last prompt and its answer)."""
        if not self.results:
            return 0
        last = self.results[-1]
        return (last.prompt_tokens or 0) + (last.generated_tokens or 0)

    def to_dict(self) -> dict:
        return {
            "format": SAVE_FORMAT,
            "model": self.model.name,
            "media": list(self.media),
            "system": self.options.system,
            "turns": [{"question": r.prompt, "answer": r.text, "record": r.to_dict()} for r in self.results],
        }

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON; an existing file is replaced only if it is a saved vl3 chat."""
        from .outfile import claim, escaped, replace_file, temp_name

        path = Path(path).expanduser()
        if path.exists() and not _saved_chat(path):
            raise UsageError(f"{path} exists and is not a saved vl3 chat; choose another file name")
        # a media name that is not UTF-8 (surrogateescape) is kept as its JSON escape, which reads back as it was
        data = escaped(json.dumps(self.to_dict(), ensure_ascii=False, indent=2), "utf-8").encode("utf-8") + b"\n"
        real = Path(os.path.realpath(path))  # a link to a saved chat stays a link
        try:
            if real.exists() and not os.access(real, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            # written next to it and renamed over it: an earlier save survives a full disk or a Ctrl-C
            tmp = claim(temp_name(real))
            try:
                with tmp.open("wb") as f:
                    f.write(data)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            replace_file(tmp, real)
        except OSError as e:
            raise Vl3Error(f"cannot write {path}: {e.strerror or e}") from e
        return path


def _saved_chat(path: Path) -> bool:
    """Whether `path` is a regular file that `Chat.save` wrote: its first bytes, never the whole file
    (a device or a FIFO is not opened at all)."""
    if not path.is_file():
        return False
    start = '{\n  "format": ' + json.dumps(SAVE_FORMAT) + ","
    try:
        with path.open("rb") as f:
            return f.read(len(start.encode())) == start.encode()
    except OSError:
        return False
