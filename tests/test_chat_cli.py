"""`vl3 chat`: lines from a pipe (one question each, answers as they are done) and a real terminal
(a pty: streaming, Ctrl-C mid-answer keeps the session, /save, /reset, Ctrl-D ends)."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from media_factory import make_image

import vl3cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.make_checkpoint(tmp_path_factory.mktemp("chat-cli-ckpt") / "hf", "hf", tied=True, seed=8)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("chat-cli-media") / "a.png", size=(42, 42))


def test_questions_from_a_pipe_equal_the_api(ckpt, image):
    questions = ["What is it?", "And its colour?", "Again?"]
    p = subprocess.run(
        [sys.executable, "-m", "vl3cli", "chat", str(image), "-m", str(ckpt), "--max-new-tokens", "5", "-f", "jsonl"],
        input="\n".join(questions[:2]) + "\n\n" + questions[2] + "\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in p.stdout.splitlines()]
    chat = vl3cli.load(str(ckpt), max_new_tokens=5).chat(str(image))
    alone = [chat.ask(q) for q in questions]
    assert [(r["prompt"], r["text"], r["prompt_tokens"]) for r in recs] == [(r.prompt, r.text, r.prompt_tokens) for r in alone]
    assert recs[2]["prompt_tokens"] > recs[1]["prompt_tokens"] > recs[0]["prompt_tokens"]  # each turn sees the earlier ones


class Terminal:
    """A process on a pseudo-terminal: keys in, screen bytes out."""

    def __init__(self, args: list[str], cwd: Path, stdout: Path | None = None, env: dict | None = None):
        import pty

        env = {k: v for k, v in os.environ.items() if k != "VL3_DEBUG"} | {"TERM": "dumb", "COLUMNS": "100"} | (env or {})
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C sends SIGINT
            os.chdir(cwd)
            if stdout is not None:  # `vl3 chat ... > stdout`: the answers go there, the rest to the terminal
                os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.execvpe(sys.executable, [sys.executable, "-m", "vl3cli", *args], env)
        self.screen = b""
        self.seen = 0  # the screen is read up to here

    def read_until(self, marker: bytes, timeout: float = 60) -> bytes:
        """The screen from where the last read stopped to the end of `marker`."""
        deadline = time.monotonic() + timeout
        start = self.seen
        while marker not in self.screen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in {self.screen[start:][-500:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"the process ended before {marker!r}: {self.screen[-500:]!r}"
                self.screen += chunk
        self.seen = self.screen.index(marker, start) + len(marker)
        return self.screen[start : self.seen]

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.screen += os.read(self.fd, 4096)
            except OSError:
                pass
        raise AssertionError("the chat did not end")


def test_a_terminal_session(ckpt, image, tmp_path):
    term = Terminal(["chat", str(image), "-m", str(ckpt), "--max-new-tokens", "3500", "--ignore-eos"], tmp_path)
    term.read_until(b"Talking about")
    term.read_until(b"> ")
    term.send(b"What is it?\r")
    term.read_until(b"What is it?\r\n")  # the echo; then the answer streams
    deadline = time.monotonic() + 30
    while len(term.screen) - term.seen < 20 and time.monotonic() < deadline:
        if select.select([term.fd], [], [], 1)[0]:
            term.screen += os.read(term.fd, 4096)
    assert len(term.screen) - term.seen >= 20  # text arrives while the answer is being generated
    term.send(b"\x03")  # Ctrl-C mid-answer
    term.read_until(b"answer stopped")
    term.read_until(b"> ")
    term.send(b"/save talk.json\r")
    term.read_until(b"saved to")
    assert json.loads((tmp_path / "talk.json").read_text())["turns"] == []  # the stopped answer was not kept
    term.read_until(b"> ")
    term.send(b"/reset\r")
    term.read_until(b"starts again")
    term.read_until(b"> ")
    term.send(b"/help\r")
    term.read_until(b"/save FILE")
    term.read_until(b"> ")
    term.send(b"\x04")  # Ctrl-D
    assert term.wait() == 0


def test_a_terminal_session_with_the_answers_redirected(ckpt, image, tmp_path):
    """`vl3 chat a.png > answers.txt`: the file holds the answers only, one line each (no prompt,
    nothing for a question that failed); a line in another encoding than the terminal's is one
    error line, and the conversation goes on."""
    out = tmp_path / "answers.txt"
    term = Terminal(["chat", str(image), "-m", str(ckpt), "--max-new-tokens", "5"], tmp_path, stdout=out,
                    env={"PYTHONIOENCODING": "utf-8:strict"})  # fmt: skip
    term.read_until(b"Talking about")
    term.read_until(b"> ")
    for keys, then in [(b"What is it?\r", b""), (b"caf\xe9?\r", b"Error: the line is not utf-8 text"),
                       (b"w " * 2100 + b"\r", b"Error: the conversation no longer fits"), (b"And its colour?\r", b"")]:  # fmt: skip
        term.send(keys)
        term.read_until(then)
        term.read_until(b"> ")
    term.send(b"\x04")
    assert term.wait() == 0
    assert b"Traceback" not in term.screen
    chat = vl3cli.load(str(ckpt), max_new_tokens=5).chat(str(image))
    assert out.read_text() == "".join(chat.ask(q).text + "\n" for q in ["What is it?", "And its colour?"])


def test_piped_answers_on_a_terminal_lose_their_control_characters(ckpt, image, monkeypatch, capsys):
    """`vl3 chat a.png < questions.txt` with stdout a terminal: an answer's escape sequences and bells
    are not sent to it (as in the interactive loop and `vl3 describe`)."""
    from vl3cli.chat import Chat
    from vl3cli.cli import main
    from vl3cli.output import Result

    class Screen(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Screen()
    monkeypatch.setattr(Chat, "ask", lambda self, q, on_text=None: Result(prompt=q, text="red\x1b[31m!\x07"))
    monkeypatch.setattr(sys, "argv", ["vl3", "chat", str(image), "-m", str(ckpt)])
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n"))
    monkeypatch.setattr(sys, "stdout", screen)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert screen.getvalue() == "Q: What is it?\nred[31m!\n"


def test_unreadable_media_is_one_error_line(ckpt, image, tmp_path, capsys, monkeypatch):
    """Media FFmpeg demuxes but cannot decode (SVG), and any decoder's own exception, end the chat
    with one `Error:` line naming the media, as `describe` does: no traceback."""
    from vl3cli import preprocess
    from vl3cli.cli import main

    def vl3(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["vl3", *map(str, args)])
        monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n"))
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, capsys.readouterr().err

    svg = tmp_path / "logo.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="9" height="9"/></svg>\n')
    assert vl3("chat", svg, "-m", ckpt) == (1, f"Error: {svg}: not an image or video vl3 can read\n")

    def broken(path):
        raise ValueError("31 is not a valid Type")

    monkeypatch.setattr(preprocess.media, "detect_kind", broken)
    assert vl3("chat", image, "-m", ckpt) == (1, f"Error: {image}: cannot read (ValueError: 31 is not a valid Type)\n")


def test_a_piped_question_that_fails_is_named_by_its_line_not_repeated_whole(ckpt, image):
    """A 40,000-word line beyond the context: one short error line, and the next question is answered."""
    from typer.testing import CliRunner

    from vl3cli.cli import app

    huge = "w " * 40_000
    r = CliRunner().invoke(app, ["chat", str(image), "-m", str(ckpt), "--max-new-tokens", "3", "-f", "jsonl"],
                           input=f"{huge}\nWhat is it?\n")  # fmt: skip
    assert r.exit_code == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith("Error: line 1 ('w w w") and "…'" in line and len(line) < 400, line[:500]
    (rec,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert rec["prompt"] == "What is it?" and rec["text"] is not None


def test_piped_lines_take_the_terminals_commands(ckpt, image, tmp_path):
    """A replayed session: /reset starts again (the next question is answered as a first one),
    /save writes the conversation so far, //text asks "/text", an unknown command is an error line
    naming its line (exit code 1, the rest goes on), /exit ends before the lines after it."""
    lines = ["What is it?", "And its colour?", "/reset", "What is it?", "//etc/passwd?", "/save talk.json",
             "/bogus", "/exit", "Never asked?"]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-m", "vl3cli", "chat", str(image), "-m", str(ckpt), "--max-new-tokens", "5", "-f", "jsonl"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 1, p.stderr
    recs = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["prompt"] for r in recs] == ["What is it?", "And its colour?", "What is it?", "/etc/passwd?"]
    first, again = recs[0], recs[2]
    assert (again["text"], again["prompt_tokens"]) == (first["text"], first["prompt_tokens"])  # nothing before it
    assert recs[3]["prompt_tokens"] > again["prompt_tokens"]
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert [t["question"] for t in saved["turns"]] == ["What is it?", "/etc/passwd?"]
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: line 7: unknown command /bogus (/help lists them; //bogus asks it as a question)"]


def test_resume_continues_a_saved_conversation_from_the_command_line(ckpt, image, tmp_path):
    """`/save` in one session, `vl3 chat --resume FILE` in the next (media and system prompt from
    the file): its answers are those of the unbroken conversation (the API's); a file that is
    not a saved chat is one line, before the model loads."""
    args = [sys.executable, "-m", "vl3cli", "chat", "-m", str(ckpt), "--max-new-tokens", "5", "-f", "jsonl"]
    first = subprocess.run([*args[:4], str(image), *args[4:]], input="What is it?\n/save talk.json\n",
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    later = subprocess.run([*args, "--resume", "talk.json"], input="And its colour?\nAgain?\n", capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert "(continuing talk.json: 1 questions and answers)" in later.stderr
    chat = vl3cli.load(str(ckpt), max_new_tokens=5).chat(str(image))
    unbroken = [chat.ask(q) for q in ["What is it?", "And its colour?", "Again?"]]
    recs = [json.loads(x) for x in later.stdout.splitlines()]
    assert [(r["prompt"], r["text"], r["prompt_tokens"]) for r in recs] == [(r.prompt, r.text, r.prompt_tokens) for r in unbroken[1:]]
    (tmp_path / "notes.json").write_text("{}")
    bad = subprocess.run([*args, "--resume", "notes.json"], input="", capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "Error: notes.json is not a conversation saved by vl3 (/save FILE writes one)"], bad.stderr
