"""The heap settings of vl3's own processes: freed blocks are kept for the next forward pass, and
the command applies them once the model is loaded (never before: loading's buffers go back)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest
import tiny
from media_factory import make_image
from typer.testing import CliRunner

import vl3cli.api
import vl3cli.heap
from vl3cli.cli import app

GLIBC = hasattr(ctypes.CDLL(None), "mallinfo2")

# Three 20 MB blocks allocated then freed, with glibc's own counters read back: `arena` is the
# heap's size (mapped blocks aside), `keepcost` the free memory at its top.
PROBE = """
import ctypes, json, sys
import vl3cli.heap
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
took = vl3cli.heap.keep_freed_memory() if sys.argv[1] == "keep" else None
blocks = [libc.malloc(20 << 20) for _ in range(3)]
for b in blocks:
    libc.free(b)
info = libc.mallinfo2()
print(json.dumps({"took": took, "arena": info.arena, "keepcost": info.keepcost}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator (mallinfo2)")
def test_freed_blocks_stay_in_the_heap_for_reuse():
    default, kept = probe("default"), probe("keep")
    # glibc's defaults: each 20 MB block is mapped on its own and unmapped when freed
    assert default["keepcost"] < 4 << 20 and default["arena"] < 8 << 20
    # kept: the blocks came from the heap and their 60 MB stay at its top, for the next pass
    assert kept["took"] is True
    assert kept["keepcost"] >= 60 << 20 and kept["arena"] >= 60 << 20


def test_the_command_keeps_freed_memory_once_the_model_is_loaded(tmp_path, monkeypatch):
    ckpt = tiny.make_checkpoint(tmp_path / "ckpt", "hf", seed=5)
    image = make_image(tmp_path / "a.png", size=(28, 28))
    calls = []
    load = vl3cli.api.load
    monkeypatch.setattr(vl3cli.api, "load", lambda *a, **k: calls.append("load") or load(*a, **k))
    monkeypatch.setattr(vl3cli.heap, "keep_freed_memory", lambda: calls.append("keep"))
    r = CliRunner().invoke(app, ["describe", str(image), "-m", str(ckpt), "--max-new-tokens", "2", "-f", "jsonl"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["error"] is None
    assert calls == ["load", "keep"]
