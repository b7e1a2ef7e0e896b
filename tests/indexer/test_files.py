"""indexer.files: the one atomic writer (permissions, crash safety, stale temp files), fsync, sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from indexer.files import (
    NotRegularFile,
    atomic_write,
    atomic_write_bytes,
    fsync_dir,
    fsync_file,
    open_regular,
    remove_stale_temp_files,
    sha256_file,
)

ROOT = Path(__file__).parents[2]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_and_replaced_files_get_0666_less_the_umask(tmp_path, umask):
    """Like any file its user creates: not the 0600 of a private temp file, nor a fixed 0644."""
    fresh, replaced = tmp_path / "fresh.bin", tmp_path / "replaced.bin"
    replaced.write_bytes(b"old")
    replaced.chmod(0o600)
    previous = os.umask(umask)
    try:
        atomic_write_bytes(fresh, b"new")
        atomic_write(replaced, lambda handle: handle.write(b"new"))
    finally:
        os.umask(previous)
    assert mode(fresh) == mode(replaced) == 0o666 & ~umask
    assert fresh.read_bytes() == replaced.read_bytes() == b"new"


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old contents")

    def half_then_fail(handle):
        handle.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failed_replace_leaves_no_temp_file(tmp_path):
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "taken", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (tmp_path / "taken").is_dir()


def test_the_temp_file_lives_beside_the_target_until_the_replace(tmp_path):
    """Same folder (so os.replace is a rename on one file system), hidden, named after the target."""
    seen: list[str] = []

    def look(handle):
        seen.extend(p.name for p in tmp_path.iterdir())
        handle.write(b"x")

    atomic_write(tmp_path / "index.npz", look)
    assert len(seen) == 1 and seen[0].startswith(".index.npz.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]


def test_concurrent_writers_each_leave_a_whole_file(tmp_path):
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_bytes, args=(target, data)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


KILLED_WRITE = """
import os, sys
from indexer.files import atomic_write

def write(handle):
    handle.write(b"torn")
    handle.flush()
    os._exit(137)  # killed mid-write: nothing cleans up

atomic_write(sys.argv[1], write)
"""


def test_a_killed_write_leaves_a_temp_file_that_the_cleanup_removes(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 137
    assert target.read_bytes() == b"previous"
    left = [p for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].read_bytes() == b"torn"
    assert remove_stale_temp_files(tmp_path, ["other.json"]) == []  # another file's temp files only
    assert remove_stale_temp_files(tmp_path, ["checkpoint.pt"]) == left
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_the_cleanup_touches_nothing_but_plain_temp_files_of_the_names_given(tmp_path):
    ours = [".metrics.jsonl.0a1b2c3d.tmp", ".metrics.jsonl.x_9kq2zz.tmp"]  # ours, and mkstemp's
    others = [".metrics.jsonl.abc.tmp", ".metrics.jsonl.0a1b2c3d.tmp.keep", "metrics.jsonl.0a1b2c3d.tmp",
              ".notes.txt.0a1b2c3d.tmp", ".metrics.jsonl.ABCDEFGH.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".metrics.jsonl.aaaaaaaa.tmp").mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    os.symlink(outside, tmp_path / ".metrics.jsonl.bbbbbbbb.tmp")
    removed = remove_stale_temp_files(tmp_path, ["metrics.jsonl"])
    assert [p.name for p in removed] == sorted(ours)
    left = {p.name for p in tmp_path.iterdir()}
    assert set(others) | {".metrics.jsonl.aaaaaaaa.tmp", ".metrics.jsonl.bbbbbbbb.tmp", "outside.txt"} == left
    assert outside.read_bytes() == b"keep me"


def test_fsync_helpers(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    fsync_file(path)
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing")


@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 17])  # empty, tiny, more than one read chunk
def test_sha256_file_is_the_hash_of_the_bytes(tmp_path, size):
    path = tmp_path / "f.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(NotRegularFile, match="not a file: a FIFO"):
        sha256_file(fifo)
    with pytest.raises(NotRegularFile, match="not a file: a folder"):
        open_regular(tmp_path)
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "dangling.png")
    error = pytest.raises(OSError, sha256_file, fifo).value  # an OSError for callers that catch those
    assert error.filename == str(fifo) and "FIFO" in (error.strerror or "")
