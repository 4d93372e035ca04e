"""Conversations: follow-up questions about the same media, each answer kept as it was generated.

    chat = model.chat("clip.mp4")            # `Model.chat` (api.py); the media is read on the first question
    r = chat.ask("What happens first?")      # -> Result
    r = chat.ask("And then?")                # sees the earlier question and answer
    chat.reset()                             # back to just the media
    chat.save("talk.json")                   # the conversation as JSON
    chat = model.chat(**saved_chat("talk.json"))   # later: the same media and system prompt...
    chat.resume("talk.json")                 # ... and the questions and answers saved

Turn k's prompt is turn k-1's prompt, its answer's ids as generated (never re-tokenised), then
the next user turn (`prompt.follow_up_ids`). Each question is one item of the model's run
(`Model.run`): the conversation so far is the item's history, and its media is read once, on the
first question, and kept. The KV of everything said is kept too (`Item.keep_kv`), so a new
question prefills only its own tokens, never the video again. A question that cannot fit in the model's context is refused with the
advice to `/reset`; the conversation stays as it was. So does a question whose answer is
interrupted (Ctrl-C): nothing of it is kept.

A saved conversation holds each answer's ids besides its text: `resume` continues it with the
answers as they were generated (by another model, as their text), the first question then
prefilling the media and everything said (its KV is kept from there on, as usual).
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
        self.restored: list[dict] = []  # turns of a saved conversation continued here (`resume`), as saved
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
        elif self.visuals is None and self.media:  # a resumed conversation's media, read for this question: kept
            self.visuals = answer.visuals[: len(self.media)]
            self.history[0] = replace(self.history[0], visuals=tuple(self.visuals))
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
        self.restored = []
        self.prefix = None

    def resume(self, path: str | Path) -> None:
        """Continue the conversation `save` wrote to `path` (this chat must be new, about the same
        media with the same system prompt: `model.chat(**saved_chat(path))`). The answers are taken
        as the ids they were generated as when the same model saved them, else as their text."""
        data = _load_saved(path)
        if self.history:
            raise UsageError("resume a saved conversation in a new chat (this one has questions already)")
        if tuple(data["media"]) != self.media:
            raise UsageError(f"{path} is a conversation about {_names(data['media'])}, not {_names(self.media)}")
        if data["system"] != self.options.system:
            raise UsageError(f"{path} was held with another system prompt: {data['system']!r}")
        vocab = self.model.engine.config.text.vocab_size
        same_model = data["model"] == self.model.name
        history = []
        for number, turn in enumerate(data["turns"]):
            visuals = (tuple(self.visuals) if self.visuals is not None else self.media) if number == 0 else ()
            ids = turn.get("ids")
            exact = same_model and isinstance(ids, list) and all(type(i) is int and 0 <= i < vocab for i in ids)
            answer = Turn("assistant", ids=tuple(ids)) if exact else Turn("assistant", turn["answer"])
            history += [Turn("user", turn["question"], visuals=visuals), answer]
        self.history, self.restored, self.prefix = history, list(data["turns"]), None

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
            "turns": self.restored + [
                {"question": r.prompt, "answer": r.text, "ids": list(t.ids or ()), "record": r.to_dict()}
                for r, t in zip(self.results, self.history[2 * len(self.restored) + 1 :: 2])
            ],
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


def saved_chat(path: str | Path) -> dict:
    """The media and system prompt of the conversation saved in `path`, as `Model.chat` takes them."""
    data = _load_saved(path)
    return {"media": list(data["media"]), "system": data["system"]}


def _names(media) -> str:
    return ", ".join(media) if media else "no media"


def _load_saved(path: str | Path) -> dict:
    """A saved conversation, checked: UsageError naming the file for one that is not."""
    path = Path(path).expanduser()
    if not _saved_chat(path):
        if not path.exists():
            raise UsageError(f"no such file: {path}")
        raise UsageError(f"{path} is not a conversation saved by vl3 (/save FILE writes one)")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the conversation saved in {path}: {e}") from e
    turns, media = data.get("turns"), data.get("media")
    ok = (isinstance(media, list) and all(isinstance(m, str) and m for m in media)
          and (data.get("system") is None or isinstance(data.get("system"), str)) and isinstance(turns, list)
          and all(isinstance(t, dict) and isinstance(t.get("question"), str) and isinstance(t.get("answer"), str)
                  for t in turns))  # fmt: skip
    if not ok:
        raise UsageError(f"{path}: the saved conversation is damaged (media, system or turns are not as /save writes them)")
    return {"media": media, "system": data.get("system"), "model": data.get("model"), "turns": turns}


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
