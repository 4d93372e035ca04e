"""outfile.py: which files are ours, the mending of a crash's last line, refusals that leave files byte-identical."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from links import linked_file

from vl3cli.errors import UsageError, Vl3Error
from vl3cli.outfile import (
    Sink,
    Target,
    check_replaceable,
    check_writable,
    opened_on_write,
    read_records,
    rewrite_without,
    temp_name,
)
from vl3cli.output import Result


def rec(path: str, **kw) -> bytes:
    return (json.dumps(Result(path=path, text="t", **kw).to_dict()) + "\n").encode()


def test_read_records_repairs_a_truncated_last_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(rec("a") + rec("b", error="bad") + rec("c")[:25])
    assert [r["path"] for r in read_records(out)] == ["a", "b"]
    assert out.read_bytes() == rec("a") + rec("b", error="bad")


def test_a_whole_last_record_gets_its_newline(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(rec("a") + rec("b")[:-1])
    assert [r["path"] for r in read_records(out)] == ["a", "b"]
    assert out.read_bytes() == rec("a") + rec("b")


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n" + os.urandom(3000),  # an image that a shell glob made the output
        b"shopping list\nmilk\n",
        b'{"path": "a", "text": "t", "error": null}\nnot json\n',  # ours, then something else
        rec("a") + b'{"x": 1}\n',  # JSON, but not a record
        b'{"x": 1',  # a cut-short line that is not one of our records
        rec("a") + b"[1, 2]",
        b"\x00" * 100_000,  # no newline at all
        b'{"text": "t", "path": "a", "error": null}\n',  # has a record's keys, but vl3 never wrote it
        b'{"',  # a start of a record, but no record before it: nothing says the file is ours
        b'{"id": 17, "name": "my precious data", "values": [1,2,3]}',  # another program's JSON, no final newline
        b'{"path": "a", "text": "t"}',  # whole JSON that lacks a record's fields: not a cut
        b'{"id": 17, "name": "my',  # cut short, but with a key no record has
        rec("a") + b'{"id": 1, "id": 2, "pa',  # a key twice
        b'{"id": 17, "path": "x" "text"',  # not JSON's layout
    ],
)
def test_files_that_are_not_ours_are_refused_byte_identical(tmp_path, content):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(UsageError, match=r"exists and is not a vl3 results file \(use --overwrite to replace it\)"):
        read_records(out)
    assert out.read_bytes() == content


@pytest.mark.parametrize("tail", [b"{", b'{"', b'{"i', b'{"id":', b'{"pa', b"\x00" * 4096])
def test_a_cut_short_last_line_shorter_than_a_record_start_is_cut_off(tmp_path, tail):
    """A crash after a few bytes of a record (or a file system's NUL-filled tail): ours, mended."""
    out = tmp_path / "r.jsonl"
    out.write_bytes(rec("a") + tail)
    assert [r["path"] for r in read_records(out)] == ["a"]
    assert out.read_bytes() == rec("a")


def test_a_name_that_is_not_utf8_is_written_as_utf8_and_read_back_the_same(tmp_path):
    name = os.fsdecode(b"photos/\xff\xfe.png")  # what os.walk gives for such a file: lone surrogates
    out = tmp_path / "r.jsonl"
    with open(out, "w", encoding="utf-8") as f:  # strict UTF-8, as `opened` writes
        sink = Sink(f, str(out))
        sink.write_record(Result(path=name, media=[name], text="t"))
        sink.write_record(Result(path="b.png", text="t"))
    data = out.read_bytes()
    data.decode("utf-8")  # valid UTF-8 throughout
    assert b'"photos/\\udcff\\udcfe.png"' in data  # the JSON escapes of the two surrogates
    first = json.loads(data.splitlines()[0])
    assert first["path"] == name and first["media"] == [name]
    assert [r["path"] for r in read_records(out)] == [name, "b.png"]


def test_a_record_that_cannot_be_serialised_becomes_an_error_record(tmp_path):
    out = tmp_path / "r.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        sink = Sink(f, str(out))
        written = sink.write_record(Result(path="a.png", text="t", media_info=[{"x": object()}]))
        sink.write_record(Result(path="b.png", text="t"))
    assert not written.ok and written.path == "a.png"
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["path"], r["text"], r["error"] is None) for r in records] == [("a.png", None, False), ("b.png", "t", True)]
    assert records[0]["error"].startswith("cannot write this record: ")


def test_a_rewrite_keeps_a_link_and_the_file_mode(tmp_path):
    real = tmp_path / "data" / "r.jsonl"
    real.parent.mkdir()
    real.write_bytes(rec("a") + rec("b", error="bad"))
    real.chmod(0o600)
    link = tmp_path / "r.jsonl"
    link.symlink_to(real)
    rewrite_without(link, lambda r: r["error"] is not None)
    assert link.is_symlink() and link.resolve() == real
    assert real.read_bytes() == rec("a") and (real.stat().st_mode & 0o777) == 0o600
    assert not list(real.parent.glob(".*vl3-tmp")) and not list(tmp_path.glob(".*vl3-tmp"))


def test_a_huge_file_is_not_read_whole(tmp_path, monkeypatch):
    """A large file with no newline is refused after one bounded read."""
    import vl3cli.outfile as outfile

    monkeypatch.setattr(outfile, "MAX_LINE", 1024)
    out = tmp_path / "video.mp4"
    out.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 50_000)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def readline(self, limit):
            line = self.f.readline(limit)
            reads.append(len(line))
            return line

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Spy(real_open(*a, **k)))
    with pytest.raises(UsageError):
        read_records(out)
    assert reads == [1024]


def test_targets(tmp_path):
    assert Target.of(None) == Target.of("-") == Target(None, False)
    assert Target.of(str(tmp_path / "new.jsonl")).regular
    assert not Target.of("/dev/null").regular and not Target.of("/dev/full").regular
    with pytest.raises(UsageError, match="is a folder"):
        Target.of(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        Target.of(str(tmp_path / "no" / "r.jsonl"))
    with pytest.raises(UsageError, match=r"^--out is empty: give a file name or -$"):  # not Path("") = "."
        Target.of("")


def test_describe_outputs_replace_only_with_overwrite(tmp_path):
    text = tmp_path / "caption.txt"
    text.write_text("my notes\n")
    for fmt in ("text", "json"):
        with pytest.raises(UsageError, match="exists"):
            check_replaceable(Target.of(str(text)), fmt, overwrite=False)
        check_replaceable(Target.of(str(text)), fmt, overwrite=True)
    with pytest.raises(UsageError, match="not a vl3 results file"):
        check_replaceable(Target.of(str(text)), "jsonl", overwrite=False)
    ours = tmp_path / "r.jsonl"
    ours.write_bytes(rec("a"))
    check_replaceable(Target.of(str(ours)), "jsonl", overwrite=False)  # appended to
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    check_replaceable(Target.of(str(empty)), "text", overwrite=False)
    assert text.read_text() == "my notes\n" and ours.read_bytes() == rec("a")


def test_a_file_opened_on_write_changes_only_once_written(tmp_path, monkeypatch):
    """describe / ask: nothing written, nothing changed (no file created, none emptied); a replaced
    file is renamed into place at the end (a link's target, its mode kept); a failed write leaves
    the old file; appending creates the file at the first write."""
    old = tmp_path / "old.txt"
    old.write_text("old answer\n")
    new = tmp_path / "new.json"
    for replace in (True, False):
        for path in (old, new):
            with opened_on_write(Target.of(str(path)), replace=replace):
                pass
    assert old.read_text() == "old answer\n" and not new.exists()
    with pytest.raises(RuntimeError), opened_on_write(Target.of(str(old)), replace=True):
        raise RuntimeError("the model failed to load")
    assert old.read_text() == "old answer\n"

    link, real = linked_file(tmp_path, "a.txt", "old answer\n", 0o640)
    with opened_on_write(Target.of(str(link)), replace=True) as f:
        f.write("first\n")
        assert real.read_text() == "old answer\n"  # replaced at the end, whole
    assert link.is_symlink() and real.read_text() == "first\n" and (real.stat().st_mode & 0o777) == 0o640

    class Full:
        def __init__(self, *a, **k):
            pass

        def write(self, text):
            raise OSError(28, "No space left on device")

        def tell(self):
            return 0

        def truncate(self, size):
            pass

        def seek(self, offset):
            pass

        def close(self):
            pass

    real_open = open
    with monkeypatch.context() as m:
        m.setattr("builtins.open", lambda *a, **k: Full() if str(a[0]).endswith("vl3-tmp") else real_open(*a, **k))
        with pytest.raises(Vl3Error, match="No space left"), opened_on_write(Target.of(str(real)), replace=True) as f:
            f.write("second\n")
    assert real.read_text() == "first\n" and sorted(p.name for p in real.parent.iterdir()) == ["a.txt"]

    with opened_on_write(Target.of(str(new)), replace=False) as f:
        f.write("x\n")
    with opened_on_write(Target.of(str(new)), replace=False) as f:
        f.write("y\n")
    assert new.read_text() == "x\ny\n"


def test_a_name_as_long_as_the_system_allows_is_replaced(tmp_path):
    """The temporary file's name stays short: a target named with NAME_MAX (255) bytes is written."""
    long = tmp_path / ("é" * 125 + ".txt")  # 254 bytes in UTF-8
    long.write_text("old\n")
    assert len(os.fsencode(temp_name(long).name)) < 100
    with opened_on_write(Target.of(str(long)), replace=True) as f:
        f.write("new\n")
    assert long.read_text() == "new\n"
    jsonl = tmp_path / ("r" * 249 + ".jsonl")
    jsonl.write_bytes(rec("a") + rec("b", error="bad"))
    rewrite_without(jsonl, lambda r: r["error"] is not None)
    assert jsonl.read_bytes() == rec("a") and sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, jsonl.name])


def test_a_folder_that_allows_no_new_file_gets_its_files_rewritten_in_place(tmp_path, monkeypatch):
    """A writable file in a read-only folder: text, JSON and JSONL are rewritten in place; a new
    file there, or Parquet (always replaced by a temporary file), is refused before any work."""
    answers, jsonl = tmp_path / "a.txt", tmp_path / "r.jsonl"
    answers.write_text("old answer\n")
    jsonl.write_bytes(rec("a") + rec("b", error="bad"))
    real_open = os.open

    def refusing(path, *a, **k):  # the folder refuses new files (creating the temporary file)
        if str(path).endswith("vl3-tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", refusing)
    with opened_on_write(Target.of(str(answers)), replace=True) as f:
        f.write("new answer\n")
    assert answers.read_text() == "new answer\n"
    rewrite_without(jsonl, lambda r: r["error"] is not None)
    assert jsonl.read_bytes() == rec("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "r.jsonl"]

    folder_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else folder_access(p, mode))
    check_writable(Target.of(str(answers)))  # the file itself may be written
    (tmp_path / "old.parquet").write_bytes(b"")
    for name, why in [("new.txt", "does not allow creating files"), ("old.parquet", "Parquet is written to a temporary file")]:
        with pytest.raises(Vl3Error, match=why):
            check_writable(Target.of(str(tmp_path / name)))
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(Vl3Error, match="cannot write to .*a.txt: Permission denied"):
        check_writable(Target.of(str(answers)))


FILE_SIZE_LIMIT = """
import resource, sys
from vl3cli.outfile import Target, opened
from vl3cli.output import Result
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # `ulimit -f`: writes past 2000 bytes fail (EFBIG)
with opened(Target.of(sys.argv[1]), replace=False) as sink:
    for i in range(100):
        sink.write_record(Result(path=f"{i}.png", text="x" * 150))
"""


def test_a_write_that_fails_part_way_leaves_no_half_record(tmp_path):
    out = tmp_path / "r.jsonl"
    p = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(out)], capture_output=True, text=True, check=False, timeout=60)
    assert "cannot write to" in p.stderr and "File too large" in p.stderr
    data = out.read_bytes()
    assert 0 < len(data) <= 2000 and data.endswith(b"\n")
    assert [r["path"] for r in read_records(out)] == [f"{i}.png" for i in range(data.count(b"\n"))]
    assert out.read_bytes() == data  # nothing to mend


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_stream_that_cannot_encode_a_character_gets_its_json_escape(encoding):
    """JSON stays valid and lossless (PYTHONIOENCODING=ascii); text gets readable escapes."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding)
    sink = Sink(stream, "stdout")
    result = Result(path="café ü.png", text="Ein Bär 中文 😀", prompt="Qué?")
    sink.write_record(result)
    sink.write("中\n")
    sink.flush()
    first, second = raw.getvalue().decode(encoding).splitlines()
    assert json.loads(first) == result.to_dict()
    assert second == "\\u4e2d"


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path):
    """The temporary file is created anew, never through what stands at its name: a link planted
    there to send the write to another file leaves that file untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("not vl3's\n")
    out = tmp_path / "answers.json"
    out.write_text("old\n")
    temp_name(out).symlink_to(victim)
    with opened_on_write(Target.of(str(out)), replace=True) as f:
        f.write("new\n")
    assert victim.read_text() == "not vl3's\n" and out.read_text() == "new\n" and not out.is_symlink()


def test_a_block_device_is_never_an_output(tmp_path):
    import stat

    disk = next((p for p in ("/dev/loop0", "/dev/sda", "/dev/vda", "/dev/nvme0n1") if os.path.exists(p)
                 and stat.S_ISBLK(os.stat(p).st_mode)), None)  # fmt: skip
    if disk is None:
        pytest.skip("no block device to name here")
    with pytest.raises(UsageError, match="is a block device"):
        Target.of(disk)


def test_a_record_cut_anywhere_is_cut_off_even_as_the_only_line(tmp_path):
    """A crash during the first record leaves its start alone in the file: cut wherever it stops
    (inside a key, a value, a multi-byte character), and the empty file resumes."""
    line = rec("clip.mp4", prompt="Qu'est-ce qui se passe ? \u00e9\u4e2d", error=None)
    for cut in range(8, len(line) - 1):
        out = tmp_path / f"{cut}.jsonl"
        out.write_bytes(line[:cut])
        assert read_records(out) == [], cut
        assert out.read_bytes() == b""


def test_records_longer_than_the_first_line_limit_read_back_once_the_file_is_ours(tmp_path, monkeypatch):
    """A record longer than MAX_LINE after a record (a huge prompt's error record): still ours,
    so the run resumes; the same line first in the file is refused without being read whole."""
    import vl3cli.outfile as outfile

    monkeypatch.setattr(outfile, "MAX_LINE", 1024)
    out = tmp_path / "r.jsonl"
    long = rec("b", prompt="word " * 2000, error="too long")
    assert len(long) > 1024
    out.write_bytes(rec("a") + long + rec("c"))
    assert [r["path"] for r in read_records(out)] == ["a", "b", "c"]
    first = tmp_path / "first.jsonl"
    first.write_bytes(long)
    with pytest.raises(UsageError, match="not a vl3 results file"):
        read_records(first)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    """`exclusive`: a second holder of the same file (by any name: a link) is refused with one
    line naming the first run's process; once the first ends, the file is free and no lock file
    is left."""
    from vl3cli.outfile import exclusive

    out = tmp_path / "r.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    before = set(os.listdir(tmp_path))
    with exclusive(Target.of(out)):
        for name in (out, link):
            with pytest.raises(Vl3Error, match=rf"is being written by another vl3 run \(process {os.getpid()}\)"):
                with exclusive(Target.of(name)):
                    pass
        other = tmp_path / "other.jsonl"
        with exclusive(Target.of(other)):  # another file is another lock
            pass
    with exclusive(Target.of(link)):
        pass
    assert set(os.listdir(tmp_path)) == before  # no lock file left, nothing created
