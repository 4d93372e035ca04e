"""cli.py: help, version, start-up imports, option defaults, one-line errors and exit codes.

Commands that need a model run in test_e2e.py; these run `main()` in a subprocess (the real
entry point) or Typer's CliRunner (help texts, with the width pinned by conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vl3cli import __version__
from vl3cli.cli import app

HEAVY = ("torch", "transformers", "av", "decord", "safetensors", "tokenizers", "huggingface_hub", "numpy", "PIL", "fastapi", "uvicorn", "ray", "pyarrow")

runner = CliRunner()


def vl3(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The real entry point (`vl3 = vl3cli.cli:run`) in a fresh interpreter."""
    code = "import sys; from vl3cli.cli import run; sys.argv = ['vl3'] + sys.argv[1:]; run()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False, timeout=120,
        env=dict(os.environ, **(env or {})), cwd=cwd,
    )  # fmt: skip


def test_import_and_help_load_no_heavy_module():
    code = (
        "import sys; from vl3cli.cli import main; sys.argv = ['vl3', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert p.stdout.strip().endswith("[]"), p.stdout[-300:]
    assert "describe" in p.stdout and "batch" in p.stdout


EXIT_PROBE = (
    "import atexit, sys, tempfile, shutil, pathlib\n"
    "folder = tempfile.mkdtemp()\n"
    "atexit.register(lambda: (shutil.rmtree(folder), sys.stderr.write('HANDLER RAN')))\n"
    "print(folder, flush=True)\n"
    "from vl3cli.cli import run\n"
    "sys.argv = ['vl3'] + sys.argv[1:]\n"
    "run()\n"
    "print('NOT REACHED')\n"
)


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["--version"], 0), (["describe"], 2),
                                        (["describe", "missing.png", "-m", "./no-model"], 1)])
def test_the_program_exits_with_its_code_after_the_exit_handlers(args, code, tmp_path):
    """`run()` leaves without the interpreter's teardown: the exit code, the exit handlers (a
    temporary folder removed) and every byte written to stdout (piped, so block-buffered) stay."""
    p = subprocess.run([sys.executable, "-c", EXIT_PROBE, *args], capture_output=True, text=True, check=False,
                       timeout=120, cwd=tmp_path)  # fmt: skip
    assert p.returncode == code, p.stderr
    folder, _, rest = p.stdout.partition("\n")
    assert not os.path.exists(folder) and p.stderr.endswith("HANDLER RAN")
    assert "NOT REACHED" not in p.stdout
    if args == ["--help"]:
        assert rest.rstrip().endswith("╯") and "describe" in rest  # the whole help box
    if code:
        assert p.stderr.count("Error: ") == 1


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"vl3 {__version__}"


@pytest.mark.parametrize("command", [[], ["describe"], ["ask"], ["batch"]])
def test_help_shows_examples(command):
    r = runner.invoke(app, [*command, "--help"])
    assert r.exit_code == 0
    assert "Examples" in r.stdout
    assert f"vl3 {command[0]} " in r.stdout if command else "vl3 describe" in r.stdout


def test_every_command_has_the_shared_options():
    import typer.main

    group = typer.main.get_command(app)
    shared = {
        "--model", "--revision", "--device", "--dtype", "--quantize", "--max-new-tokens", "--temperature", "--top-p",
        "--top-k", "--repetition-penalty", "--seed", "--ignore-eos", "--system", "--fps", "--min-frames",
        "--max-frames", "--start", "--end", "--max-visual-tokens", "--prune", "--no-prune", "--prune-threshold",
        "--out", "--overwrite", "--debug",
    }  # fmt: skip
    answering = {"--format", "--stream", "--no-stream"}
    for name in ("describe", "ask", "batch"):
        opts = {o for p in group.commands[name].params for o in (*p.opts, *p.secondary_opts)}
        assert shared <= opts, (name, shared - opts)
        # batch writes JSONL records and never streams: options that could only fail are not offered
        assert (answering <= opts) == (name != "batch"), (name, answering & opts)


def test_cli_defaults_match_the_api_defaults():
    """Every request option of every command is an `Options` field with the same default, and the
    model options are `load()`'s keyword arguments with the same defaults."""
    import inspect

    import typer.main

    from vl3cli.api import load
    from vl3cli.decoding import DecodingParams
    from vl3cli.options import Options

    load_params = inspect.signature(load).parameters
    for name in ("describe", "ask", "batch"):
        params = {p.name: p.default for p in typer.main.get_command(app).commands[name].params}
        for f in dataclasses.fields(Options):
            assert params[f.name] == f.default, (name, f.name)
        for key in ("model", "revision", "device", "dtype", "quantize"):
            assert params[key] == load_params[key].default, (name, key)
    for f in dataclasses.fields(DecodingParams):
        assert getattr(Options(), f.name) == f.default, f.name
    # fps / min / max frames default to the checkpoint's processor config
    assert Options().fps is None and Options().min_frames is None and Options().max_frames is None


def one_line_error(p: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert p.stdout == ""


def test_missing_model_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    one_line_error(vl3("describe", "a.png", "-m", "./no-such-model", cwd=tmp_path), 1, "no such folder", "no-such-model")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    one_line_error(vl3("ask", "a.png", "q", "-m", "empty", cwd=tmp_path), 1, "config.json")


def test_missing_media_fails_before_loading_anything(tmp_path):
    one_line_error(vl3("describe", "nope.mp4", "-m", "./no-such-model", cwd=tmp_path), 1, "nope.mp4", "no such file")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["describe"], "Missing argument"),
        (["describe", "a.png", "--dtype", "float8"], "--dtype"),
        (["describe", "a.png", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["ask", "a.png"], "give a question"),
        (["describe", "a.png", "--bogus"], "--bogus"),
        (["describe", "a.png", "--stream", "--format", "json"], "--stream"),
        (["batch", "--out", "r.jsonl"], "--files-from"),
        (["batch", ".", "--shard", "4/4"], "--shard"),
        (["batch", ".", "--prompt", "  "], "--prompt: an empty question"),
        (["batch", ".", "--resume", "--overwrite"], "--overwrite"),
        (["batch", "no-such-folder"], "no-such-folder"),
        (["batch", ".", "--format", "text"], "--format"),
        (["batch", ".", "--stream"], "--stream"),
        (["batch", ".", "--batch-size", "0"], "--batch-size"),
        (["batch", ".", "--workers", "0"], "--workers"),
        (["batch", ".", "--actors", "2"], "--actors is for --engine ray"),
        (["batch", ".", "--gpus-per-actor", "1"], "--gpus-per-actor is for --engine ray"),
        (["batch", ".", "--ray-address", "auto"], "--ray-address is for --engine ray"),
        (["batch", ".", "--engine", "ray", "--actors", "0"], "--actors must be at least 1"),
        (["batch", ".", "--engine", "ray", "--gpus-per-actor", "-1"], "--gpus-per-actor must be 0 or more"),
        (["batch", ".", "--engine", "spark"], "--engine"),
        (["describe", "a.png", "--out", "r.parquet"], "Parquet output is for `vl3 batch`"),
        (["describe", "a.png", "--system", "caf\udce9"], "--system: the text is not valid UTF-8"),
        (["ask", "a.png", "Why?", "--fps", "1e30"], "--fps must be at most 1e+06"),
        (["serve", "--max-video-seconds", "nan"], "--max-video-seconds must be at least 1 and finite"),
        (["serve", "--max-video-seconds", "inf"], "--max-video-seconds must be at least 1 and finite"),
        (["serve", "--api-key", ""], "--api-key is empty"),
        (["serve", "--api-key", "key "], "--api-key is empty or starts or ends with spaces"),
        (["describe", "a.png", "--segments", "scenes", "--max-segment", "0.05"], "--max-segment must be at least 0.1 seconds (got 0.05)"),
        (["batch", "a.png", "--segments", "scenes", "--max-segment", "0.05"], "--max-segment must be at least 0.1 seconds (got 0.05)"),
        (["batch", "a.png", "--scene-threshold", "50"], "--scene-threshold is for --segments scenes"),
        (["describe", "a.png", "--segments", "2", "--scene-threshold", "50"], "--scene-threshold is for --segments scenes"),
        (["describe", "a.png", "-o", ""], "--out is empty: give a file name or -"),
        (["ask", "a.png", "Why?", "--out", ""], "--out is empty: give a file name or -"),
        (["batch", "a.png", "-o", ""], "--out is empty: give a file name or -"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, args, fragment):
    (tmp_path / "a.png").write_bytes(b"x")
    one_line_error(vl3(*args, cwd=tmp_path), 2, fragment)


def test_engine_ray_without_ray_installed_is_one_line(tmp_path):
    """Before any model or Ray work: the extra to install, exit 1."""
    (tmp_path / "a.png").write_bytes(b"x")
    code = ("import sys; sys.modules['ray'] = None; from vl3cli.cli import main; "
            "sys.argv = ['vl3', 'batch', 'a.png', '--engine', 'ray', '-m', './no-model']; main()")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    one_line_error(p, 1, "--engine ray needs Ray: pip install 'vl3cli[ray]'")


def test_decoding_option_errors_exit_2(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    one_line_error(vl3("describe", "a.png", "--temperature", "-1", cwd=tmp_path), 2, "--temperature")


@pytest.mark.parametrize("command", ["describe", "batch"])
def test_a_bad_download_variable_fails_once_before_the_model(tmp_path, command):
    """Not an error record per item after the model loaded: one line, exit 2 (the model named
    here does not exist, so reaching it would be another error)."""
    (tmp_path / "a.png").write_bytes(b"x")
    p = vl3(command, "a.png", "-m", "./no-model", env={"VL3_MAX_DOWNLOAD_MB": "abc"}, cwd=tmp_path)
    one_line_error(p, 2, "VL3_MAX_DOWNLOAD_MB must be a positive number")


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    p = vl3("describe", "a.png", "-m", "./nope", "--debug", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr and p.stderr.strip().endswith("Error: no such folder: ./nope")
    p = vl3("describe", "a.png", "-m", "./nope", cwd=tmp_path, env={"VL3_DEBUG": "1"})
    assert "Traceback" in p.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["describe", "nope.png", "-p", "--debug"],
        ["describe", "nope.png", "--system", "--debug"],
        ["ask", "nope.png", "-q", "--debug"],
        ["ask", "nope.png", "--", "--debug"],
    ],
)
def test_the_text_debug_given_as_a_value_is_not_the_flag(tmp_path, args):
    """A prompt, system prompt or question that reads "--debug" is text: the error stays one line."""
    p = vl3(args[0], "-m", "./nope", *args[1:], cwd=tmp_path, env={"VL3_DEBUG": "0"})
    one_line_error(p, 1, "nope.png: no such file")


def test_debug_before_a_value_that_is_refused_shows_the_traceback(tmp_path):
    """The real flag, wherever it stands, for an error raised while the options are checked."""
    (tmp_path / "a.png").write_bytes(b"x")
    for args in (["--debug", "--temperature", "-1"], ["--temperature", "-1", "--debug"]):
        p = vl3("describe", "a.png", *args, "-m", "./nope", cwd=tmp_path, env={"VL3_DEBUG": "0"})
        assert p.returncode == 2 and "Traceback" in p.stderr and p.stderr.splitlines()[-1].startswith("Error: --temperature")


def test_vl3_alone_prints_the_help_without_an_error_line():
    """Like Typer's and click's own `no_args_is_help` (and git with no arguments): the help, and a
    non-zero status, 2 as for a usage error; no empty `Error:` line."""
    p = vl3()
    assert p.returncode == 2 and p.stderr == "", p.stderr
    assert "Usage: vl3 [OPTIONS] COMMAND [ARGS]..." in p.stdout and "batch" in p.stdout


def vl3_closed(*args: str, close: int, cwd=None) -> subprocess.CompletedProcess:
    """`vl3 ARGS` started with stdin (`close=0`, `<&-`) or stdout (`close=1`, `>&-`) closed."""
    code = "import sys; from vl3cli.cli import run; sys.argv = ['vl3'] + sys.argv[1:]; run()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL if close else None,
        stdout=None if close == 1 else subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False, timeout=120,
        cwd=cwd, preexec_fn=lambda: os.close(close),
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, close, stream",
    [
        (["describe", "a.png", "-m", "./no-model"], 1, "standard output"),
        (["ask", "a.png", "what?", "-f", "json", "-m", "./no-model"], 1, "standard output"),
        (["batch", "a.png", "-m", "./no-model"], 1, "standard output"),
        (["chat", "a.png", "-m", "./no-model"], 1, "standard output"),
        (["chat", "a.png", "-m", "./no-model"], 0, "standard input"),
        (["batch", "--files-from", "-", "--out", "r.jsonl", "-m", "./no-model"], 0, "standard input"),
        (["batch", "--manifest", "-", "--out", "r.jsonl", "-m", "./no-model"], 0, "standard input"),
        (["--version"], 1, "standard output"),
        (["--help"], 1, "standard output"),
    ],
)
def test_a_closed_stream_that_is_needed_is_one_line_before_loading(tmp_path, args, close, stream):
    """One line, before the model (./no-model: it would be the error otherwise) is loaded."""
    (tmp_path / "a.png").write_bytes(b"x")
    p = vl3_closed(*args, close=close, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr == f"Error: {stream} is closed\n", p.stderr
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("value, on", [("false", False), ("No", False), ("OFF", False), ("0", False), ("1", True), ("yes", True)])
def test_vl3_debug_false_spellings_are_off(tmp_path, value, on):
    (tmp_path / "a.png").write_bytes(b"x")
    p = vl3("describe", "a.png", "-m", "./nope", cwd=tmp_path, env={"VL3_DEBUG": value})
    assert p.returncode == 1 and ("Traceback" in p.stderr) == on, p.stderr


BLOCKED_TORCH = (
    "import sys\n"
    "class Refuse:\n"
    "    def find_spec(self, name, *args):\n"
    "        if name == 'torch':\n"
    "            raise {error}\n"
    "sys.meta_path.insert(0, Refuse())\n"
    "from vl3cli.cli import main\n"
    "sys.argv = ['vl3', 'describe', 'a.png', '-m', './no-model']\n"
    "main()\n"
)


@pytest.mark.parametrize("error, fragment", [("MemoryError", "Error: out of memory"),
                                              ("ImportError('libtorch_cpu.so: failed to map segment', name='torch')",
                                               "Error: cannot load a library (torch: libtorch_cpu.so: failed to map segment)")])
def test_a_library_that_cannot_load_is_one_line(tmp_path, error, fragment):
    """A low `ulimit -v` makes importing torch fail with MemoryError or ImportError."""
    (tmp_path / "a.png").write_bytes(b"x")
    p = subprocess.run([sys.executable, "-c", BLOCKED_TORCH.format(error=error)], capture_output=True, text=True,
                       check=False, timeout=60, cwd=tmp_path)  # fmt: skip
    one_line_error(p, 1, fragment)


LINGERING_THREAD = (
    "import sys, threading, time, pathlib\n"
    "def work():\n"
    "    time.sleep({seconds})\n"
    "    pathlib.Path('finished').touch()\n"
    "threading.Thread(target=work, name={name!r}).start()\n"
    "from vl3cli.cli import run\n"
    "sys.argv = ['vl3', '--version']\n"
    "run()\n"
)


def test_the_exit_does_not_wait_for_media_readers_but_for_other_threads(tmp_path):
    """After Ctrl-C a media reader may still be decoding a long video: the exit does not wait for
    it (nor tear the interpreter down under it); another thread is waited for."""
    p = subprocess.run([sys.executable, "-c", LINGERING_THREAD.format(seconds=300, name="vl3-media_0")],
                       capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0 and p.stdout == f"vl3 {__version__}\n" and p.stderr == ""
    p = subprocess.run([sys.executable, "-c", LINGERING_THREAD.format(seconds=0.5, name="writer")],
                       capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0 and (tmp_path / "finished").exists()


def test_a_question_that_is_not_utf8_is_one_error_line(tmp_path):
    """Bytes that are not UTF-8 in a command-line question (a Latin-1 terminal): one error line
    naming the cause, before any model loads."""
    import subprocess
    import sys

    from media_factory import make_image

    image = make_image(tmp_path / "a.png", size=(32, 32))
    p = subprocess.run([sys.executable.encode(), b"-m", b"vl3cli", b"ask", str(image).encode(), b"caf\xe9?",
                        b"-m", b"/nonexistent-model"], capture_output=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.decode().strip() == "Error: question: the text is not valid UTF-8 (set the terminal to UTF-8, or retype it)"


ALLOCATION_FAILS = (
    "import sys, torch\n"
    "import vl3cli.{module} as m\n"
    "def huge(*args, **kwargs):\n"
    "    return torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: PyTorch's CPU allocator refuses it\n"
    "setattr(m.{owner}, {name!r}, huge)\n"
    "from vl3cli.cli import main\n"
    "sys.argv = ['vl3', 'describe', 'a.png', '--max-new-tokens', '2', '-m', {model!r}]\n"
    "main()\n"
)


@pytest.mark.parametrize("module, owner, name", [("engine", "Engine", "prefill"), ("api", "Model", "__init__")])
def test_running_out_of_memory_is_one_line(tmp_path, hf_checkpoint, module, owner, name):
    """A real allocation PyTorch cannot make, in a prompt's prefill (the answer's error) or while
    the model loads (the command's): one line saying out of memory and how much, no traceback."""
    from media_factory import make_image

    make_image(tmp_path / "a.png", size=(32, 32))
    script = ALLOCATION_FAILS.format(module=module, owner=owner, name=name, model=str(hf_checkpoint))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120,
                       cwd=tmp_path)  # fmt: skip
    one_line_error(p, 1, "out of memory (an allocation of 1,048,576.00 GiB failed)")


def test_a_batch_size_far_above_the_items_costs_nothing(tmp_path, hf_checkpoint):
    """--batch-size is an upper bound: the per-row buffers grow with the answers running, so a
    huge value with one file answers as --batch-size 1 does (it used to allocate its rows up front)."""
    from media_factory import make_image

    make_image(tmp_path / "a.png", size=(32, 32))
    outs = []
    for size in ("1", str(10**9)):
        p = vl3("batch", "a.png", "--out", f"{size}.jsonl", "--batch-size", size, "--max-new-tokens", "4",
                "-m", str(hf_checkpoint), cwd=tmp_path)  # fmt: skip
        assert p.returncode == 0, p.stderr
        outs.append(json.loads((tmp_path / f"{size}.jsonl").read_text())["text"])
    assert outs[0] == outs[1] != ""
