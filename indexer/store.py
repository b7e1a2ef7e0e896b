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
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from indexer.files import atomic_write_bytes
from indexer.scores import check_entry as check_neighbour_stats

__all__ = [
    "FORMAT_VERSION",
    "CollectionError",
    "CollectionLocked",
    "WriterLock",
    "begin_snapshot",
    "connect",
    "damaged",
    "crash_point",
    "forget_removed",
    "read_manifest",
    "remove_unreferenced",
    "rollback_uncommitted",
    "validate_manifest",
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
# Errors (files are written through indexer.files.atomic_write_bytes)
# --------------------------------------------------------------------------------------------


def one_line(text: object, limit: int = 1000) -> str:
    """The first non-empty line of an error text (FAISS and SQLite messages can span many)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else type(text).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


REBUILD_HINT = "build it again with 'python -m indexer build IMAGE_DIR --out NEW_DIR'"
DATA_HINT = "re-embed it with 'python -m indexer update {dir} --rebuild'"
"""For damaged vectors, index or map files: a rebuild reads none of them, only the manifest and rows."""


def damaged(path: Path, problem: object, hint: str = REBUILD_HINT) -> CollectionError:
    """The one wording for a collection file that is missing, unreadable or inconsistent: the
    file, what is wrong with it, what to do; always one line."""
    return CollectionError(f"{path}: {one_line(problem)}; the collection is damaged, "
                           f"{hint.format(dir=path.parent)}")


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; refuse newer formats and damaged manifests with a clear message."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CollectionError(f"{directory} is not a collection (no {MANIFEST}); make one with "
                              f"'python -m indexer build IMAGE_DIR --out {directory}'") from None
    except (OSError, ValueError) as exc:
        raise CollectionError(f"cannot read {path}: {one_line(exc)}") from None
    return validate_manifest(manifest, path)


# --------------------------------------------------------------------------------------------
# Manifest schema: checked once, on every read, so no command meets a wrong type later
# --------------------------------------------------------------------------------------------

_MISSING = object()
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
VECTOR_DTYPES = ("float32",)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and value == value  # noqa: PLR0124 - NaN check


_CHECKS: dict[str, tuple[str, Any]] = {
    # kind -> (what the message says is expected, predicate)
    "positive": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    "count": ("a whole number >= 0", lambda v: _is_int(v) and v >= 0),
    "text": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "name": ("a plain file name inside the collection", lambda v: isinstance(v, str) and _FILE_NAME.fullmatch(v)),
    "object": ("an object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "sha256": ("64 hex digits", lambda v: isinstance(v, str) and _SHA256.fullmatch(v)),
    "number": ("a number or null", lambda v: v is None or _is_number(v)),
    "dtype": (f"one of {', '.join(VECTOR_DTYPES)}", lambda v: v in VECTOR_DTYPES),
}


def _field(obj: dict[str, Any], key: str, kind: str, path: Path, where: str = "", *, optional: bool = False) -> Any:
    """``obj[key]`` checked against ``kind``; a missing or mistyped value names the key and the file."""
    name = f"{where}.{key}" if where else key
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if optional:
            return None
        raise damaged(path, f"the key '{name}' is missing" if value is _MISSING else f"'{name}' is null")
    want, ok = _CHECKS[kind]
    if not ok(value):
        raise damaged(path, f"'{name}' must be {want}, found {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check every field a reader or writer uses (presence, type, range) in one place.

    Why here: a manifest is the one file every command reads first, so a damaged or hand-edited
    one is refused on open with a message that names the key and the file, instead of failing
    later, somewhere, with a ``TypeError``. File names must be plain names, so a manifest can
    never point a reader (or the writer's clean-up) at a file outside the collection.
    """
    if not isinstance(manifest, dict):
        raise damaged(path, f"holds a JSON {type(manifest).__name__.replace('NoneType', 'null')}, not an object")
    version = manifest.get("format_version", _MISSING)
    if version is _MISSING:
        raise CollectionError(f"{path} has no format_version; it was not written by this indexer")
    version = _field(manifest, "format_version", "positive", path)
    if version > FORMAT_VERSION:
        raise CollectionError(f"{path.parent} uses collection format {version}, newer than this indexer "
                              f"({FORMAT_VERSION}); upgrade the indexer to read it")
    _field(manifest, "generation", "positive", path)
    for key in ("created", "updated", "image_root"):
        _field(manifest, key, "text", path)
    _field(manifest, "model_file", "name", path)
    model = _field(manifest, "model", "object", path)
    _field(model, "sha256", "sha256", path, "model")
    props = _field(model, "props", "object", path, "model")
    bad = [k for k, v in props.items() if not isinstance(v, str)]
    if bad:
        raise damaged(path, f"'model.props.{bad[0]}' must be a string, found {_show(props[bad[0]])}")
    dim = _field(manifest, "dim", "positive", path)
    model_dim = props.get("moco.embedding_dim")
    if model_dim is not None and model_dim.strip() != str(dim):
        raise damaged(path, f"'dim' is {dim} but its model's moco.embedding_dim is {model_dim!r}")
    for i, part in enumerate(_field(manifest, "vectors", "list", path)):
        where = f"vectors[{i}]"
        if not isinstance(part, dict):
            raise damaged(path, f"'{where}' must be an object, found {_show(part)}")
        _field(part, "file", "name", path, where)
        _field(part, "ids", "name", path, where)
        _field(part, "count", "count", path, where)
        _field(part, "dtype", "dtype", path, where, optional=True)
    index = _field(manifest, "index", "object", path)
    _field(index, "file", "name", path, "index")
    _field(index, "spec", "text", path, "index", optional=True)
    recipe = _field(index, "recipe", "object", path, "index")
    for key in ("name", "factory"):
        _field(recipe, key, "text", path, "index.recipe", optional=True)
    for key in ("recall_at_10", "latency_p50_ms", "latency_p99_ms", "build_seconds"):
        _field(recipe, key, "number", path, "index.recipe", optional=True)
    params = _field(recipe, "params", "object", path, "index.recipe", optional=True) or {}
    for key in params:
        _field(params, key, "count", path, "index.recipe.params")
    projection = _field(manifest, "projection", "object", path, optional=True)
    if projection is not None:
        _field(projection, "file", "name", path, "projection")
        _field(projection, "fit_points", "count", path, "projection")
    counts = _field(manifest, "counts", "object", path)
    _field(counts, "indexed", "count", path, "counts")
    _field(counts, "skipped", "count", path, "counts")
    reasons = _field(counts, "skipped_by_reason", "object", path, "counts", optional=True) or {}
    for key in reasons:
        _field(reasons, key, "count", path, "counts.skipped_by_reason")
    stats = manifest.get("neighbour_stats")
    if stats is not None:  # written since issue 17; older collections measure it when read
        problem = check_neighbour_stats(stats)
        if problem:
            raise damaged(path, problem)
    shard = manifest.get("shard")
    if shard is not None and not (isinstance(shard, list) and len(shard) == 2 and all(map(_is_int, shard))
                                  and 0 <= shard[0] < shard[1]):
        raise damaged(path, f"'shard' must be null or [i, n] with 0 <= i < n, found {_show(shard)}")
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
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CollectionError(f"{self.directory} is a file, not a collection folder") from None
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


def _create_empty(path: Path) -> None:
    """Make a missing ``items.sqlite`` as an empty file with mode 0666 less the umask (Contract 3).

    SQLite would create it itself with 0644 less the umask whatever the user's umask allows
    (so a group-shared collection under umask 002 would not be group-writable), and gives its
    ``-wal`` and ``-shm`` files the mode of the database file; an empty file is an empty
    database to SQLite. Any failure (it exists, a read-only folder) is left to SQLite to report.
    """
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def connect(directory: Path, *, readonly: bool = False, immutable: bool | None = None,
            create: bool = True) -> sqlite3.Connection:
    """Open items.sqlite: for the writer in WAL mode (readers never block it nor it them), for
    readers (``readonly``) so that they never write, even on storage nobody may write to.

    Readers open with ``mode=ro``. SQLite needs the ``-shm`` file beside a WAL database; on
    read-only storage (a read-only mount, a directory without write permission, a copy made
    without the ``-wal``/``-shm`` files) it cannot create it, and then the reader opens with
    ``immutable=1``: the main file alone, without locks, right for files nobody changes. A
    ``-wal`` file that exists there without its ``-shm`` may hold committed rows that
    ``immutable`` would not see, so that case is refused rather than answered from stale rows.
    ``immutable``: None (default) chooses as above, True forces it (tests, known read-only
    media), False never uses it. Reader connections are in autocommit mode, so
    :func:`begin_snapshot` alone decides how long their read transaction lasts.

    ``create`` (writers): make missing tables. A writer that adds to existing rows passes False,
    so a lost or emptied table is reported instead of silently recreated empty.
    """
    path = directory / ITEMS_DB
    if not readonly:
        if not create and not path.is_file():
            raise damaged(path, "is missing")
        if create:
            _create_empty(path)
        try:
            conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
            if not create:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                lacking = sorted({"items", "thumbnails", "user_labels"} - tables)
                if lacking:
                    conn.close()
                    raise damaged(path, f"lacks the table {lacking[0]}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
        except sqlite3.OperationalError as exc:
            raise CollectionError(f"cannot write {path}: {one_line(exc)} (read-only storage or no write "
                                  "permission? readers still work)") from None
        except sqlite3.DatabaseError as exc:
            raise damaged(path, exc) from None
        conn.row_factory = sqlite3.Row
        return conn
    if not path.is_file():
        raise damaged(path, "is missing")
    last: Exception | None = None
    for use_immutable in ([False, True] if immutable is None else [immutable]):
        if use_immutable:
            wal = directory / f"{ITEMS_DB}-wal"
            if wal.exists() and wal.stat().st_size > 0 and not (directory / f"{ITEMS_DB}-shm").exists():
                raise CollectionError(f"{wal} cannot be read without {ITEMS_DB}-shm on read-only storage; copy the "
                                      "collection with both files, or let a writer open it once to fold them in")
        uri = path.absolute().as_uri() + ("?mode=ro&immutable=1" if use_immutable else "?mode=ro")
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            last = exc
            continue
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the file, the WAL, the -shm
        except sqlite3.OperationalError as exc:  # cannot open the WAL here (read-only storage): next way
            conn.close()
            last = exc
            continue
        except sqlite3.DatabaseError as exc:  # not a database, malformed
            conn.close()
            raise damaged(path, exc) from None
        conn.row_factory = sqlite3.Row
        return conn
    raise CollectionError(f"cannot open {path} for reading: {one_line(last)}")


def begin_snapshot(conn: sqlite3.Connection) -> None:
    """Pin what a reader connection sees: a read transaction whose WAL snapshot stays until the
    connection closes (or :func:`end_snapshot`), however many writers commit meanwhile."""
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM items").fetchone()  # the snapshot starts at the first read


def end_snapshot(conn: sqlite3.Connection) -> None:
    """Let go of the snapshot (so SQLite may fold the WAL into the main file again)."""
    if conn.in_transaction:
        conn.execute("COMMIT")


def visible(gen_param: str = ":gen") -> str:
    """SQL condition for the rows visible at a manifest generation."""
    return f"added_gen <= {gen_param} AND (removed_gen IS NULL OR removed_gen > {gen_param})"


def insert_items(conn: sqlite3.Connection, rows: list[tuple], thumbnails: list[tuple[int, bytes]]) -> None:
    """Add item rows and their thumbnails in one transaction. A row is (id, path, size, mtime_ns,
    sha256, label, width, height, status, reason, error, added_gen): the one place that column
    order is written down, for builds, updates and merges alike.

    ``path`` and ``label`` are text keys (``ImageRef.relpath``/``label``: a file name that is not
    valid UTF-8 has each undecodable byte as ``\\xNN``, see ``indexer.images.fs_to_text``), so
    they are lossless and the next ``update`` finds the same key. A raw file-system name (a str
    holding surrogate escapes, which SQLite refuses) is turned into that key here rather than
    failing the whole build; ``reason``/``error`` are free text and get the same escapes."""
    from indexer.images import fs_to_text

    def text(value: Any, key: bool) -> Any:
        if not isinstance(value, str) or value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return fs_to_text(value) if key else value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value

    rows = [(r[0], text(r[1], True), *r[2:5], text(r[5], True), *r[6:9], text(r[9], False), text(r[10], False),
             *r[11:]) for r in rows]
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
        # Fold what no reader still needs into the main file without waiting for anyone, so a
        # copy of the collection made without its -wal file (read-only media) is complete.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()
