"""The collection directory on disk (Contract 3): manifest, atomic files, writer lock, items.sqlite.

Why this shape:

* ``manifest.json`` is the commit point. Every data file (vectors, index, projection) is
  written under a new name, fsynced, and only then does an atomic ``os.replace`` of the
  manifest make it current. A crash at any instant leaves the previous manifest and the files
  it names untouched.
* ``items.sqlite`` is one file that changes in place, so its rows are versioned instead: a row
  carries the generation that added it (``added_gen``) and, once gone, the one that removed it
  (``removed_gen``). Readers only see rows visible at the manifest's generation, so rows a
  writer has committed to SQLite but not yet to the manifest are invisible; the next writer
  rolls such orphans back (:func:`rollback_uncommitted`). WAL mode lets readers read while a
  writer writes.
* One writer at a time: an ``flock`` on ``.lock`` (released by the kernel when the process
  dies, so a killed build never leaves a stale lock behind).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "CollectionError",
    "CollectionLocked",
    "WriterLock",
    "atomic_write_bytes",
    "connect",
    "crash_point",
    "forget_removed",
    "read_manifest",
    "remove_unreferenced",
    "rollback_uncommitted",
    "write_manifest",
]

FORMAT_VERSION = 1
"""Version of Contract 3 written by this code; older ones are read, newer ones refused."""

MANIFEST = "manifest.json"
ITEMS_DB = "items.sqlite"
LOCK_FILE = ".lock"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    label TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL,          -- 'ok' (embedded and indexed) or 'skipped'
    reason TEXT,                   -- short machine reason for skipped files (ImageDecodeError.reason)
    error TEXT,                    -- readable error text for skipped files
    added_gen INTEGER NOT NULL,    -- manifest generation that made this row visible
    removed_gen INTEGER            -- generation from which it is gone (NULL: still there)
);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE INDEX IF NOT EXISTS items_gen ON items(added_gen, removed_gen);
CREATE TABLE IF NOT EXISTS thumbnails (id INTEGER PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS user_labels (path TEXT PRIMARY KEY, label TEXT NOT NULL, updated_ns INTEGER NOT NULL);
"""


class CollectionError(Exception):
    """A collection that cannot be read or written; the message is one line for the user."""


class CollectionLocked(CollectionError):
    """Another process is writing to the collection."""


class SimulatedCrash(BaseException):
    """Raised at a crash point by tests (a BaseException so no ``except Exception`` swallows it)."""


# Tests set this to a step name (or the env var INDEXER_CRASH_AT, which kills the process with
# os._exit, the closest thing to `kill -9` that is deterministic).
CRASH_AT: str | None = None


def crash_point(step: str) -> None:
    """Mark a step between two writes; a test may stop the writer here to check crash safety."""
    if CRASH_AT == step:
        raise SimulatedCrash(step)
    if os.environ.get("INDEXER_CRASH_AT") == step:
        os._exit(137)


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a file written by a library (FAISS, numpy) before the manifest names it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; refuse newer formats with a clear message."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CollectionError(f"{directory} is not a collection (no {MANIFEST}); make one with "
                              f"'python -m indexer build IMAGE_DIR --out {directory}'") from None
    except (OSError, ValueError) as exc:
        raise CollectionError(f"cannot read {path}: {exc}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CollectionError(f"{path} has no format_version; it was not written by this indexer")
    if version > FORMAT_VERSION:
        raise CollectionError(f"{directory} uses collection format {version}, newer than this indexer "
                              f"({FORMAT_VERSION}); upgrade the indexer to read it")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """The commit: atomically replace the manifest (keeping the previous one as manifest.prev.json)."""
    current = directory / MANIFEST
    if current.exists():
        # The previous manifest stays readable: its files are kept until the next commit, so a
        # reader that loaded it a moment ago can still open them.
        atomic_write_bytes(directory / "manifest.prev.json", current.read_bytes())
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write_bytes(current, data)


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Every data file name a manifest points at."""
    names = {MANIFEST, ITEMS_DB, "manifest.prev.json", LOCK_FILE}
    if manifest.get("model_file"):
        names.add(manifest["model_file"])
    for part in manifest.get("vectors", []):
        names.update((part["file"], part["ids"]))
    for key in ("index", "projection"):
        entry = manifest.get(key) or {}
        if entry.get("file"):
            names.add(entry["file"])
    return names


def remove_unreferenced(directory: Path, *manifests: dict[str, Any]) -> None:
    """Delete data files that none of ``manifests`` (the new and the previous one) names."""
    keep: set[str] = set()
    for manifest in manifests:
        keep |= referenced_files(manifest)
    for entry in directory.iterdir():
        name = entry.name
        if name in keep or name.startswith(ITEMS_DB) or not entry.is_file():
            continue  # items.sqlite-wal / -shm belong to SQLite
        with contextlib.suppress(OSError):
            entry.unlink()


# --------------------------------------------------------------------------------------------
# Writer lock
# --------------------------------------------------------------------------------------------


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``COLLECTION/.lock``.

    Refuses at once (no waiting) with the holder's pid, because a user who starts a second
    build by mistake wants to know, not to hang. The kernel drops the lock when the holder
    dies, so a crash never leaves the collection locked.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fh: Any = None

    def acquire(self) -> WriterLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self.directory / LOCK_FILE, "a+")  # noqa: SIM115 - kept open while locked
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise CollectionLocked(f"{self.directory} is being written by {holder}; wait for it to finish "
                                   "(readers keep working meanwhile)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.truncate(0)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# items.sqlite
# --------------------------------------------------------------------------------------------


def connect(directory: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open items.sqlite (WAL: readers never block the writer nor the other way round)."""
    path = directory / ITEMS_DB
    if readonly:
        if not path.exists():
            raise CollectionError(f"{path} is missing; the collection is damaged, rebuild it with --rebuild")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=30)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
    conn.row_factory = sqlite3.Row
    return conn


def visible(gen_param: str = ":gen") -> str:
    """SQL condition for the rows visible at a manifest generation."""
    return f"added_gen <= {gen_param} AND (removed_gen IS NULL OR removed_gen > {gen_param})"


def insert_items(conn: sqlite3.Connection, rows: list[tuple], thumbnails: list[tuple[int, bytes]]) -> None:
    """Add item rows and their thumbnails in one transaction. A row is (id, path, size, mtime_ns,
    sha256, label, width, height, status, reason, error, added_gen): the one place that column
    order is written down, for builds, updates and merges alike."""
    with conn:
        conn.executemany("INSERT INTO items (id, path, size, mtime_ns, sha256, label, width, height, "
                         "status, reason, error, added_gen) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.executemany("INSERT OR REPLACE INTO thumbnails (id, jpeg) VALUES (?, ?)", thumbnails)


def rollback_uncommitted(conn: sqlite3.Connection, generation: int) -> int:
    """Undo SQLite changes of a writer that died before committing its manifest.

    Rows added by a later generation are deleted (with their thumbnails); removals marked by a
    later generation are cleared. Returns how many rows were touched.
    """
    with conn:
        gone = conn.execute("SELECT id FROM items WHERE added_gen > ?", (generation,)).fetchall()
        conn.executemany("DELETE FROM thumbnails WHERE id = ?", [(r[0],) for r in gone])
        conn.execute("DELETE FROM items WHERE added_gen > ?", (generation,))
        cleared = conn.execute("UPDATE items SET removed_gen = NULL WHERE removed_gen > ?", (generation,)).rowcount
    return len(gone) + cleared


def forget_removed(directory: Path, generation: int) -> None:
    """Delete rows (and thumbnails) removed at or before ``generation``.

    Called after a commit with the previous generation: such rows are invisible to both the
    new manifest and the previous one, the only two whose readers are supported.
    """
    conn = connect(directory)
    try:
        with conn:
            conn.execute("DELETE FROM thumbnails WHERE id IN (SELECT id FROM items WHERE removed_gen <= ?)",
                         (generation,))
            conn.execute("DELETE FROM items WHERE removed_gen <= ?", (generation,))
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``with transaction(conn):`` commits on success, rolls back on any exception."""
    with conn:
        yield conn
