"""completions/: the committed scripts are what completions/generate.py writes now, and
completion requests are answered without importing torch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    """completions/generate.py, loaded by path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("vl3_completions_generate", ROOT / "completions" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def test_committed_scripts_are_fresh(tmp_path):
    generate.write(tmp_path)
    for name in generate.FILES.values():
        fresh = (tmp_path / name).read_text()
        committed = ROOT / "completions" / name
        assert committed.exists(), f"completions/{name} missing: run python completions/generate.py"
        assert committed.read_text() == fresh, f"completions/{name} is stale: run python completions/generate.py"


PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO-TORCH'))\n"
    "from vl3cli.cli import main\n"
    "sys.argv = ['vl3'] + sys.argv[1:]\n"
    "main()\n"
)


def run_probe(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=False, env=env, timeout=60)


def test_bash_completion_lists_commands_without_torch():
    p = run_probe({"_VL3_COMPLETE": "complete_bash", "COMP_WORDS": "vl3 de", "COMP_CWORD": "1"})
    assert p.returncode == 0
    assert "describe" in p.stdout.split()
    assert p.stderr.endswith("NO-TORCH")


def test_fish_completion_offers_dtype_choices():
    p = run_probe(
        {"_VL3_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": "vl3 ask --dtype ", "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    )
    assert p.stdout.split() == ["auto", "bfloat16", "float16", "float32"]
    assert p.stderr.endswith("NO-TORCH")
