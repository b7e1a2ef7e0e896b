"""Files that survive a crash and can be shared: the one atomic writer, fsync, sha256.

Every part of the pipeline writes files another part (or another user) reads later: checkpoints
and metrics (``moco``), models (``exports``), collections (``indexer``). They all write through
:func:`atomic_write`, so each file is either the old one or the new one after a crash at any
instant, never a torn one, and each comes out with mode 0666 less the umask, like any file its
user creates (a collection made by one account must be readable by an app run by another).

Standard library only: ``moco`` and ``exports`` import this module (the torch-free base of
``indexer``), and it must never pull in FAISS, ONNX Runtime or Pillow.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "NotRegularFile",
    "atomic_write",
    "atomic_write_bytes",
    "fsync_dir",
    "fsync_file",
    "open_regular",
    "remove_stale_temp_files",
    "sha256_file",
    "sha256_handle",
]

HASH_CHUNK = 1 << 20
"""Bytes read per step while hashing: constant memory whatever the file's size."""

# Temp files of atomic_write: `.NAME.` + 8 characters + `.tmp`. The 8 characters are hex here;
# older versions used tempfile.mkstemp, whose names use [a-z0-9_], so both match and
# remove_stale_temp_files clears what either left.
_TEMP_INFIX = r"\.[a-z0-9_]{8}\.tmp"


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temp file beside ``path``, created exclusively and never through a symlink.

    Created with mode 0666, so the kernel applies the umask (and any default ACL) exactly as for
    any other new file: no umask is read, so no other thread's file creation races with it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2**32 names: a clash is rare, but never overwrite one
            continue


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)``: a temp file in the same folder, fsync,
    ``os.replace``, fsync of the folder.

    A crash at any instant leaves either the old file or the new one, and once this returns the
    new one is on disk. On an exception (from ``write`` or a full disk) the temp file is removed
    and the old file is untouched. A kill can leave the temp file behind;
    :func:`remove_stale_temp_files` clears those when the writer starts again.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`atomic_write` of bytes already in memory."""
    atomic_write(path, lambda handle: handle.write(data))


def remove_stale_temp_files(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temp files :func:`atomic_write` left in ``folder`` for the files ``names`` when
    a kill interrupted a write; return them, sorted.

    Call it only while no other process writes there (at the start of a run): only plain files
    of exactly that naming pattern are touched, never a folder, a symlink or any other file."""
    patterns = [re.compile(rf"\.{re.escape(name)}{_TEMP_INFIX}") for name in names]
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and any(p.fullmatch(entry.name) for p in patterns):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return sorted(removed)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file written by a library (FAISS, numpy) to disk before anything names it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``directory`` durable: the folder's entries must reach the
    disk too, not only the file's bytes."""
    fsync_file(directory)


class NotRegularFile(OSError):
    """A path that names a FIFO, socket, device or folder where a regular file was expected.

    ``kind`` says which, in words (e.g. ``"a FIFO (named pipe), not opened"``); the message is
    ``NAME: not a file: KIND``."""

    def __init__(self, kind: str, filename: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.strerror = kind
        self.filename = filename

    def __str__(self) -> str:
        return f"{self.filename}: not a file: {self.kind}"


def _require_regular(mode: int, name: str) -> None:
    """Raise :class:`NotRegularFile` saying what ``mode`` is, unless it is a regular file."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        kind = "a folder"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO (named pipe), not opened"
    elif stat.S_ISSOCK(mode):
        kind = "a socket, not opened"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device, not opened"
    else:
        kind = "not a regular file"
    raise NotRegularFile(kind, name)


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading; refuse anything else without ever blocking on it.

    Why: opening a FIFO named like a picture blocks until some writer appears (forever, in a
    build), opening a device can have side effects, and a folder named ``x.jpg`` is not a file.
    The name is ``stat``-ed first, so nothing but a regular file is opened; it is then opened
    with ``O_NONBLOCK`` and checked again with ``fstat``, so a file swapped for a FIFO between
    the two calls is refused too instead of hanging. Raises :class:`NotRegularFile` for those,
    and the ``OSError`` of ``stat``/``open`` (missing, permission denied, a link loop) as is.
    """
    name = os.fspath(path)
    _require_regular(os.stat(name).st_mode, name)  # follows symlinks: a dangling link fails here
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(name, flags)
    try:
        _require_regular(os.fstat(fd).st_mode, name)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")  # O_NONBLOCK has no effect on reads of regular files


def sha256_handle(handle: BinaryIO) -> str:
    """sha256 of a whole open file, read from its start in 1 MB chunks (constant memory)."""
    digest = hashlib.sha256()
    handle.seek(0)
    for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Content hash of a file: a checkpoint's or a model's identity, an image's when its size or
    mtime changed. Opened with :func:`open_regular`, so a file replaced by a FIFO of the same name
    is an ``OSError`` instead of a hang."""
    with open_regular(path) as handle:
        return sha256_handle(handle)
