"""write_atomic: files are replaced whole; pipes, terminals and devices are written to as they are."""

import os
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from sktransfer._outputs import write_atomic

from conftest import fresh_env

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/fd are POSIX")

CSV = b"path,prediction\na.jpg,glass\n"


def _read_in_a_thread(path):
    """Start reading ``path`` whole in a thread (a FIFO's writer waits for its reader); returns
    the thread and the list that gets what it read."""
    got = []
    reader = threading.Thread(target=lambda: got.append(open(path, "rb").read()), daemon=True)
    reader.start()
    return reader, got


def test_a_fifo_is_written_to_not_replaced(tmp_path):
    # As `-o >(gzip > x.gz)` or `mkfifo out; ... -o out`: the reader gets the bytes, the FIFO stays.
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    reader, got = _read_in_a_thread(fifo)
    write_atomic(fifo, CSV)
    reader.join(timeout=30)
    assert got == [CSV] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # Named by a link, as any output: the link stays a link to the FIFO.
    link = tmp_path / "link.csv"
    link.symlink_to(fifo)
    reader, got = _read_in_a_thread(fifo)
    write_atomic(link, CSV)
    reader.join(timeout=30)
    assert got == [CSV] and link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "out.csv"]  # no temporary file left


def test_standard_output_and_an_open_descriptor_are_written_to(tmp_path):
    # `-o /dev/stdout | cat` and `-o >(...)` (bash passes /dev/fd/63): /dev/stdout is a link to
    # /proc/self/fd/1, whose target, "pipe:[...]", is no file to rename anything over.
    read_end, write_end = os.pipe()
    code = textwrap.dedent(f"""
        from sktransfer._outputs import write_atomic
        write_atomic("/dev/stdout", {CSV!r})
        write_atomic("/dev/fd/{write_end}", b"through a descriptor")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=fresh_env(), cwd=tmp_path, capture_output=True,
                              pass_fds=(write_end,))
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            passed = pipe.read()
    finally:
        for fd in (read_end, write_end):
            try:
                os.close(fd)
            except OSError:
                pass
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == CSV and passed == b"through a descriptor"
    assert os.listdir(tmp_path) == []


def test_a_regular_file_is_still_replaced_whole(tmp_path):
    target = tmp_path / "out.csv"
    target.write_bytes(b"old")
    before = os.stat(target).st_ino
    write_atomic(target, CSV)
    assert target.read_bytes() == CSV and os.stat(target).st_ino != before  # a new file renamed over the old one


def test_a_write_that_fails_names_the_path_given_not_its_temporary_file(tmp_path):
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_atomic(str(tmp_path / "a-folder"), CSV)
    assert caught.value.filename == str(tmp_path / "a-folder") and ".tmp-" not in str(caught.value)
    with pytest.raises(FileNotFoundError) as caught:
        write_atomic(str(tmp_path / "missing" / "f.csv"), CSV)
    assert caught.value.filename == str(tmp_path / "missing" / "f.csv") and ".tmp-" not in str(caught.value)
    write_atomic(str(tmp_path / "made" / "f.csv"), CSV, makedirs=True)
    assert (tmp_path / "made" / "f.csv").read_bytes() == CSV
    assert sorted(os.listdir(tmp_path)) == ["a-folder", "made"]  # no temporary file left
