"""The public ``Collection``: open, search, build, update and merge a collection directory (Contract 3).

Reading: :meth:`Collection.open` reads the manifest once and sees exactly that generation
(SQLite rows are filtered by it, files are the ones it names), so a reader keeps a consistent
view while a writer works and sees the new version on the next ``open`` (or :meth:`reload`).

Writing: :class:`_Writer` holds the writer lock, rolls back what a crashed writer left, embeds
only new or changed files, appends one vectors file per generation, rewrites the index and
projection under new names and commits by replacing the manifest. The steps are separated by
:func:`indexer.store.crash_point` marks that the crash tests stop at.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from indexer import ann, store
from indexer.embed import EmbeddingModel, ModelError, file_sha256
from indexer.images import DEFAULT_MAX_PIXELS, ImageRef, scan_images
from indexer.projection import FIT_MAX, Projection, fit_projection

__all__ = ["BuildSummary", "Collection", "Hit", "Item", "NothingIndexed", "default_model", "parse_shard"]


MAX_VECTOR_FILES = 8
"""Updates append one vectors file each; beyond this many (or a quarter of rows dead) they are
compacted into one, so opening stays cheap and removed items stop taking space."""


class NothingIndexed(store.CollectionError):
    """Not a single image could be embedded: nothing is written (exit code 1)."""


@dataclass(frozen=True)
class Hit:
    """One search result: item id, path relative to the image root, cosine similarity, label."""

    id: int
    path: str
    score: float
    label: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Item:
    """One indexed image."""

    id: int
    path: str
    label: str | None
    width: int
    height: int
    size: int
    mtime_ns: int
    sha256: str | None


@dataclass
class BuildSummary:
    """What a build/update/merge did, for the final report and the manifest."""

    indexed: int = 0  # items indexed in the collection now
    embedded: int = 0  # files decoded and embedded by this run
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] | None = None
    seconds: float = 0.0
    embed_seconds: float = 0.0
    recipe: dict[str, Any] | None = None

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The human summary printed at the end of a build."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted((self.skipped_by_reason or {}).items())) or "none"
        out = [
            f"indexed     {self.indexed:,} items ({self.embedded:,} embedded now, {self.unchanged:,} unchanged, "
            f"{self.removed:,} removed)",
            f"skipped     {self.skipped:,} files ({reasons})",
            f"time        {self.seconds:.1f} s total, {self.images_per_second:.1f} images/s while embedding",
        ]
        if self.recipe:
            out.append("index       " + describe_recipe(self.recipe))
        return out


def describe_recipe(recipe: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (recipe.get("params") or {}).items())
    recall = recipe.get("recall_at_10")
    text = f"{recipe.get('name')} ({recipe.get('factory')}{'; ' + params if params else ''})"
    if recall is not None:
        text += f", recall@10 {recall:.3f}"
        if recipe.get("measured_queries"):
            text += f" on {recipe['measured_queries']} held-out queries"
    if recipe.get("latency_p50_ms") is not None and recipe.get("latency_p99_ms") is not None:
        text += f", p50 {recipe['latency_p50_ms']:.2f} ms / p99 {recipe['latency_p99_ms']:.2f} ms per query"
    if recipe.get("note"):
        text += f" ({recipe['note']})"
    return text


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_model(models_dir: Path = Path("models")) -> Path:
    """The newest ``models/*.onnx``; the error says how to make one when there is none."""
    candidates = sorted(models_dir.glob("*.onnx"), key=lambda p: p.stat().st_mtime) if models_dir.is_dir() else []
    if not candidates:
        raise ModelError(f"no --model given and no {models_dir}/*.onnx found; train and export one with "
                         "'python -m moco train IMAGE_DIR --out runs/NAME' and "
                         f"'python -m exports runs/NAME -o {models_dir}/NAME.onnx', or pass --model M.onnx")
    return candidates[-1]


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``i/n`` (0-based), or ``env``: RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS."""
    if text is None:
        return None
    env = dict(os.environ if env is None else env)
    if text == "env":
        for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_key in env and size_key in env:
                text = f"{env[rank_key]}/{env[size_key]}"
                break
        else:
            raise ValueError("--shard env: neither RANK/WORLD_SIZE nor SLURM_PROCID/SLURM_NTASKS is set")
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard expects i/n such as 0/4, got {text!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard expects i/n with 0 <= i < n, got {text!r}")
    return i, n


def in_shard(relpath: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic by path alone (crc32), so every machine agrees without talking."""
    return shard is None or zlib.crc32(relpath.encode()) % shard[1] == shard[0]


# --------------------------------------------------------------------------------------------
# Vectors files
# --------------------------------------------------------------------------------------------


def _open_part(directory: Path, part: dict[str, Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A vectors file and its ids, checked against the manifest before use: a truncated or
    swapped file is refused here with its name rather than read as wrong vectors."""
    ids_path, vec_path = directory / part["ids"], directory / part["file"]
    count = int(part["count"])
    try:
        ids = np.load(ids_path, allow_pickle=False)
    except FileNotFoundError:
        raise store.damaged(ids_path, "is missing", store.DATA_HINT) from None
    except (OSError, ValueError, EOFError) as exc:
        raise store.damaged(ids_path, f"cannot be read ({store.one_line(exc)})", store.DATA_HINT) from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) != count:
        raise store.damaged(ids_path, f"holds {getattr(ids, 'dtype', '?')} {getattr(ids, 'shape', '?')}, the "
                            f"manifest expects {count} item ids", store.DATA_HINT)
    dtype = np.dtype(part.get("dtype") or "float32")
    expected = count * dim * dtype.itemsize
    try:
        size = vec_path.stat().st_size
    except FileNotFoundError:
        raise store.damaged(vec_path, "is missing", store.DATA_HINT) from None
    if size != expected:
        raise store.damaged(vec_path, f"has {size:,} bytes, the manifest expects {expected:,} ({count} vectors of "
                            f"{dim} {dtype.name}){' (truncated?)' if size < expected else ''}", store.DATA_HINT)
    if count == 0:
        return ids.astype(np.int64), np.zeros((0, dim), dtype=np.float32)
    try:
        vectors = np.memmap(vec_path, dtype=dtype, mode="r", shape=(count, dim))
    except (OSError, ValueError) as exc:
        raise store.damaged(vec_path, f"cannot be read ({store.one_line(exc)})", store.DATA_HINT) from None
    return ids.astype(np.int64), vectors


def _load_index(path: Path, dim: int, count: int | None = None) -> Any:
    """The FAISS index file, checked to hold ``count`` vectors of ``dim`` (when given)."""
    try:
        index = ann.load_index(path)
    except RuntimeError as exc:
        if not path.exists():
            raise store.damaged(path, "is missing", store.DATA_HINT) from None
        detail = store.one_line(str(exc).rsplit("Error: ", 1)[-1])
        raise store.damaged(path, f"is not an index FAISS can read ({detail})", store.DATA_HINT) from None
    if index.d != dim:
        raise store.damaged(path, f"indexes {index.d}-d vectors, the collection has {dim}", store.DATA_HINT)
    if count is not None and index.ntotal != count:
        raise store.damaged(path, f"holds {index.ntotal} vectors for {count} indexed items", store.DATA_HINT)
    return index


def _load_projection(path: Path, dim: int) -> Projection:
    """The map file, checked to fit vectors of ``dim``."""
    import zipfile

    try:
        return Projection.load(path, dim)
    except FileNotFoundError:
        raise store.damaged(path, "is missing", store.DATA_HINT) from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise store.damaged(path, f"cannot be read ({store.one_line(exc)})", store.DATA_HINT) from None


class _LiveVectors:
    """The vectors of live ids across all parts, sliceable chunk by chunk without loading all.

    Rows are in increasing id order (parts are appended with increasing ids), so row i is the
    vector of ``ids[i]``. A single part with no removals is its memmap, zero copy.
    """

    def __init__(self, directory: Path, parts: Sequence[dict[str, Any]], dim: int, live: np.ndarray) -> None:
        self.dim = dim
        self.live = live  # the ids asked for; ``ids`` are those of them found in the parts
        self.blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows in part, memmap)
        id_list = []
        for part in parts:
            pid, pvec = _open_part(directory, part, dim)
            rows = np.flatnonzero(np.isin(pid, live))
            if len(rows):
                self.blocks.append((rows, pvec))
                id_list.append(pid[rows])
        self.ids = np.concatenate(id_list) if id_list else np.zeros(0, dtype=np.int64)
        self.offsets = np.cumsum([0] + [len(r) for r, _ in self.blocks])
        self.shape = (len(self.ids), dim)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: Any) -> np.ndarray:
        rows = np.arange(len(self))[item]
        scalar = np.ndim(rows) == 0
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        block_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for b in np.unique(block_of):
            sel = block_of == b
            part_rows, memmap = self.blocks[b]
            out[sel] = memmap[part_rows[rows[sel] - self.offsets[b]]]
        return out[0] if scalar else out

    def array(self) -> np.ndarray:
        """All rows as one array: the memmap itself when there is one full part."""
        if len(self.blocks) == 1 and len(self.blocks[0][0]) == len(self.blocks[0][1]):
            return self.blocks[0][1]
        return self[:]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Moved(store.CollectionError):
    """Writers committed twice while a reader was opening: its manifest's rows may be gone."""


class Collection:
    """A read-only view of one committed generation of a collection directory.

    Every answer comes from the one generation read on :meth:`open`, completely, however many
    updates commit meanwhile; a reader asks for newer data with :meth:`reload`. The three
    kinds of state are pinned when the object is made:

    * data files (vectors, index, map, the model): opened or loaded at once. The writer deletes
      files two generations old, but an open file (or a memory map) stays readable after its
      name is gone; the model file is held open and loaded from that handle on first use.
    * ``items.sqlite`` rows and thumbnails: read inside one SQLite read transaction begun right
      after the manifest was read (a WAL snapshot), so rows that later updates remove or add
      are neither lost nor seen. It is begun only once the manifest is known to be at most one
      commit old (rows visible at generation g are deleted only after g+2 commits), otherwise
      opening starts again.
    * ``len``: the manifest's count, checked at open against the rows and vectors it names.

    The cost of the snapshot: while an old reader stays open, SQLite cannot fold the writes of
    later updates from the ``-wal`` file into the main file, so the WAL grows by what those
    updates wrote until the reader is closed (or garbage-collected); long-lived holders (the
    app's cache) keep a few generations at most. People's labels (:meth:`user_labels`) live
    outside generations and are always read fresh.

    Damage (a manifest field of the wrong type, a truncated or missing file, rows that do not
    match the manifest, a model that disagrees with it) raises :class:`indexer.store.CollectionError`
    with one line naming the file and the problem, on open rather than on some later search.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], *, device: str = "auto") -> None:
        self.directory = directory
        self.manifest = manifest
        self.generation: int = int(manifest["generation"])
        self.dim: int = int(manifest["dim"])
        self.device = device
        self._model: EmbeddingModel | None = None
        self._model_fh: Any = None
        self._vectors: _LiveVectors | None = None
        self._projection: Projection | None = None
        self._labels_conn: sqlite3.Connection | None = None
        index_entry = manifest["index"]
        self.recipe: dict[str, Any] = index_entry["recipe"]
        self._conn = store.connect(directory, readonly=True)
        try:
            self._pin(index_entry)
        except BaseException:
            self.close()
            raise

    def _pin(self, index_entry: dict[str, Any]) -> None:
        """Begin the snapshot and open every data file of this generation (see the class doc)."""
        d = self.directory
        db = d / store.ITEMS_DB
        try:
            store.begin_snapshot(self._conn)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:  # "no such table: items", a malformed file
            raise store.damaged(db, exc) from None
        lacking = sorted({"items", "thumbnails", "user_labels"} - tables)
        if lacking:
            raise store.damaged(db, f"lacks the table {lacking[0]}")
        now = int(store.read_manifest(d)["generation"])
        if now > self.generation + 1:
            raise _Moved(f"{d} moved from generation {self.generation} to {now} while opening")
        model_path = d / self.manifest["model_file"]
        try:
            self._model_fh = open(model_path, "rb")  # noqa: SIM115 - held open for the object's life
        except FileNotFoundError:
            raise store.damaged(model_path, "is missing") from None
        except OSError as exc:
            raise store.damaged(model_path, exc.strerror or exc) from None
        try:
            live = self._live()
            counted = int(self.manifest["counts"]["indexed"])
            if len(live.live) != counted:
                raise store.damaged(db, f"holds {len(live.live)} indexed items of generation {self.generation}, "
                                    f"{store.MANIFEST} says {counted} (copied without its -wal file?)")
            if len(live) != len(live.live):
                raise store.damaged(d / self.manifest["vectors"][-1]["file"], f"the vectors files hold "
                                    f"{len(live)} of the {len(live.live)} indexed items", store.DATA_HINT)
        except sqlite3.DatabaseError as exc:
            raise store.damaged(db, exc) from None
        index = _load_index(d / index_entry["file"], self.dim, len(live))
        self.searcher = ann.Searcher(index, self.recipe.get("params"), use_gpu=self.device != "cpu")
        entry = self.manifest.get("projection")
        if entry:
            self._projection = _load_projection(d / entry["file"], self.dim)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, device: str = "auto") -> Collection:
        """Open the current generation. Starts again when writers commit while we open (the
        files and rows of the manifest we read may go); never blocks on a writer. A damaged
        collection raises :class:`indexer.store.CollectionError` with one line."""
        path = Path(directory)
        if not path.is_dir():
            raise store.CollectionError(f"collection not found: {path}")
        last: store.CollectionError | None = None
        for _ in range(5):
            manifest = store.read_manifest(path)
            try:
                return cls(path, manifest, device=device)
            except store.CollectionError as exc:
                # Damage, or a race: files named by a manifest two commits old are deleted by
                # the writer. Only a manifest that has moved on since tells the two apart.
                if not isinstance(exc, _Moved) and \
                        int(store.read_manifest(path)["generation"]) == int(manifest["generation"]):
                    raise
                last = exc
                time.sleep(0.05)
        raise store.CollectionError(f"cannot open {path}: writers keep committing ({last})")

    def reload(self) -> Collection:
        """This collection if still current, else the newly committed generation."""
        manifest = store.read_manifest(self.directory)
        if int(manifest["generation"]) == self.generation:
            return self
        return Collection.open(self.directory, device=self.device)

    def close(self) -> None:
        """Let go of the snapshot, the connections and the model file (reads fail afterwards)."""
        for conn in (self._conn, self._labels_conn):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    store.end_snapshot(conn)
                conn.close()
        if self._model_fh is not None:
            self._model_fh.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- contents ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.manifest["counts"]["indexed"])

    def __repr__(self) -> str:
        return f"Collection({str(self.directory)!r}, items={len(self)}, generation={self.generation})"

    @property
    def image_root(self) -> Path:
        return Path(self.manifest["image_root"])

    @property
    def model(self) -> EmbeddingModel:
        """The model that made the vectors (queries must use the same one); loaded on first use,
        from the file held open since :meth:`open`, and checked to be the manifest's model."""
        if self._model is None:
            path = self.directory / self.manifest["model_file"]
            model = EmbeddingModel(path, device=self.device, data=_read_whole(self._model_fh.fileno()))
            if model.sha256 != self.manifest["model"]["sha256"]:
                raise store.damaged(path, f"is not the model that made the vectors (sha256 {model.sha256[:12]}, "
                                    f"{store.MANIFEST} says {self.manifest['model']['sha256'][:12]})")
            if model.dim != self.dim:
                raise store.damaged(path, f"embeds {model.dim}-d vectors, the collection holds {self.dim}-d ones")
            self._model = model
        return self._model

    def _rows(self, where: str, params: dict[str, Any] | None = None) -> list[sqlite3.Row]:
        sql = (f"SELECT id, path, label, width, height, size, mtime_ns, sha256, status, reason, error "
               f"FROM items WHERE {store.visible()} AND {where} ORDER BY id")
        return self._conn.execute(sql, {"gen": self.generation, **(params or {})}).fetchall()

    @property
    def items(self) -> list[Item]:
        """The indexed items in id order (row i matches ``vectors[i]`` and ``ids[i]``)."""
        return [Item(r["id"], r["path"], r["label"], r["width"] or 0, r["height"] or 0, r["size"], r["mtime_ns"],
                     r["sha256"]) for r in self._rows("status = 'ok'")]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Files that could not be indexed, with their reason."""
        return [{"id": r["id"], "path": r["path"], "reason": r["reason"], "error": r["error"]}
                for r in self._rows("status = 'skipped'")]

    def _live(self) -> _LiveVectors:
        if self._vectors is None:
            live = np.array([r[0] for r in self._conn.execute(
                f"SELECT id FROM items WHERE status='ok' AND {store.visible()} ORDER BY id",
                {"gen": self.generation})], dtype=np.int64)
            self._vectors = _LiveVectors(self.directory, self.manifest["vectors"], self.dim, live)
        return self._vectors

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        return self._live().ids

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        """N x D embeddings in id order (memory-mapped when stored as one file)."""
        return self._live().array()

    def vector(self, item_id: int) -> npt.NDArray[np.float32]:
        live = self._live()
        pos = np.searchsorted(live.ids, item_id)
        if pos >= len(live.ids) or live.ids[pos] != item_id:
            raise KeyError(f"no indexed item with id {item_id}")
        return live[int(pos)]

    def item(self, item_id: int) -> Item:
        rows = self._rows("id = :id AND status = 'ok'", {"id": int(item_id)})
        if not rows:
            raise KeyError(f"no indexed item with id {item_id}")
        r = rows[0]
        return Item(r["id"], r["path"], r["label"], r["width"] or 0, r["height"] or 0, r["size"], r["mtime_ns"],
                    r["sha256"])

    def thumbnail(self, item_id: int) -> bytes | None:
        """The stored JPEG thumbnail of an item of this generation (None for other ids)."""
        row = self._conn.execute(
            f"SELECT t.jpeg FROM thumbnails t JOIN items USING (id) WHERE id = :id AND {store.visible()}",
            {"id": int(item_id), "gen": self.generation}).fetchone()
        return bytes(row[0]) if row else None

    def user_labels(self) -> dict[str, str]:
        """Labels set by people (in the app), by relative path; they survive updates and rebuilds.
        Read outside the generation's snapshot, so a label just set is seen at once."""
        if self._labels_conn is None:
            self._labels_conn = store.connect(self.directory, readonly=True)
        return {r["path"]: r["label"] for r in self._labels_conn.execute("SELECT path, label FROM user_labels")}

    def set_user_label(self, path: str, label: str | None) -> None:
        """Set (or with None clear) a person's label for a file."""
        self.set_user_labels({path: label})

    def set_user_labels(self, labels: dict[str, str | None]) -> None:
        """Set (None: clear) people's labels for many files in one transaction of its own, outside
        the generations, so it needs no writer lock; a CSV import of thousands is one commit."""
        now = time.time_ns()
        conn = store.connect(self.directory)
        try:
            with conn:
                conn.executemany("DELETE FROM user_labels WHERE path = ?",
                                 [(path,) for path, label in labels.items() if label is None])
                conn.executemany("INSERT OR REPLACE INTO user_labels (path, label, updated_ns) VALUES (?, ?, ?)",
                                 [(path, label, now) for path, label in labels.items() if label is not None])
        except sqlite3.OperationalError as exc:  # SQLite opens a file it may not write read-only, silently
            raise store.CollectionError(f"cannot save labels in {self.directory / store.ITEMS_DB}: "
                                        f"{store.one_line(exc)} (read-only storage or no write permission?)") from None
        finally:
            conn.close()

    @property
    def projection(self) -> Projection | None:
        """The 2-D map of this generation (loaded on open), or None when it has none."""
        return self._projection

    def coords(self) -> npt.NDArray[np.float32]:
        """2-D map coordinates in the order of ``ids`` (NaN where none)."""
        proj = self.projection
        if proj is None:
            return np.full((len(self.ids), 2), np.nan, dtype=np.float32)
        return proj.coords_for(self.ids)

    # -- search --------------------------------------------------------------------------------

    def _hits(self, sims: np.ndarray, found: np.ndarray, exclude: int | None = None) -> list[Hit]:
        pairs = [(int(i), float(s)) for i, s in zip(found, sims) if i >= 0 and i != exclude]
        if not pairs:
            return []
        rows = self._conn.execute(
            f"SELECT id, path, label FROM items WHERE id IN ({','.join('?' * len(pairs))})", [i for i, _ in pairs])
        meta = {r["id"]: (r["path"], r["label"]) for r in rows}
        lost = [i for i, _ in pairs if i not in meta]
        if lost:  # the index and the rows disagree: say so rather than return fewer hits
            raise store.damaged(self.directory / store.ITEMS_DB, f"has no row for indexed item {lost[0]}")
        return [Hit(i, meta[i][0], s, meta[i][1]) for i, s in pairs]

    def search_vector(self, vector: npt.ArrayLike, k: int = 10) -> list[Hit]:
        """The k most similar items to an embedding (normalised here, so any scale works)."""
        v = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if v.shape[1] != self.dim:
            raise ValueError(f"query has {v.shape[1]} dimensions, the collection {self.dim}")
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        sims, found = self.searcher.search(v, k)
        return self._hits(sims[0], found[0])

    def search_image(self, image: Image.Image | str | os.PathLike[str] | bytes, k: int = 10) -> list[Hit]:
        """Embed a query image (PIL image, path or encoded bytes) with the collection's model, search."""
        return self.search_vector(self.model.embed_image(image), k)

    def search_id(self, item_id: int, k: int = 10) -> list[Hit]:
        """The k items most similar to an indexed item, the item itself left out."""
        sims, found = self.searcher.search(self.vector(item_id)[None], k + 1)
        return self._hits(sims[0], found[0], exclude=int(item_id))[:k]

    # -- analysis ------------------------------------------------------------------------------

    def duplicates(self, threshold: float | None = None) -> list[list[int]]:
        """Near-duplicate groups (item ids) with cosine similarity above ``threshold``."""
        from indexer.dupes import DEFAULT_THRESHOLD, duplicate_groups

        live = self._live()
        return duplicate_groups(self.searcher, live, live.ids,
                                DEFAULT_THRESHOLD if threshold is None else threshold)

    def evaluate(self, *, test_fraction: float = 0.2, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
        """kNN, linear and few-label accuracy from folder labels (stratified train/test split)."""
        from indexer.analysis import evaluate_features

        items = self.items
        labels = [it.label for it in items]
        rows = np.array([i for i, lab in enumerate(labels) if lab is not None], dtype=np.int64)
        names = sorted({labels[i] for i in rows})
        if len(names) < 2:
            raise store.CollectionError("eval needs images in at least two label folders (IMAGE_DIR/LABEL/...)")
        y = np.array([names.index(labels[i]) for i in rows], dtype=np.int64)
        rng = np.random.default_rng(0)
        test_mask = np.zeros(len(rows), dtype=bool)
        for c in range(len(names)):
            members = rng.permutation(np.flatnonzero(y == c))
            n_test = int(round(len(members) * test_fraction)) if len(members) > 1 else 0
            test_mask[members[:n_test]] = True
        if not test_mask.any() or test_mask.all():
            raise store.CollectionError("eval needs at least two images per label")
        x = self._live()[rows]
        result = evaluate_features(x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], seeds=seeds)
        return {**result, "classes": len(names), "train": int((~test_mask).sum()), "test": int(test_mask.sum())}

    # -- writing -------------------------------------------------------------------------------

    @classmethod
    def build(cls, image_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
              model: str | os.PathLike[str] | None = None, rebuild: bool = False, **options: Any) -> Collection:
        """Build (or incrementally refresh) a collection of ``image_dir``; returns it opened.

        ``options``: index ("auto"), device, batch_size, workers, max_pixels, shard (i, n),
        progress (bool), projection_fit_max. The run's :class:`BuildSummary` is ``.summary``.
        """
        image_root = Path(image_dir).expanduser().resolve()
        directory = Path(out) if out is not None else Path("indexes") / image_root.name
        writer = _Writer(directory, **options)
        summary = writer.run(image_root=image_root, model_path=Path(model) if model else None, rebuild=rebuild)
        opened = cls.open(directory, device=options.get("device", "auto"))
        opened.summary = summary  # type: ignore[attr-defined]
        return opened

    def update(self, *, model: str | os.PathLike[str] | None = None, rebuild: bool = False,
               **options: Any) -> Collection:
        """Embed new/changed files, drop deleted ones; returns the new generation opened."""
        options.setdefault("device", self.device)
        return update(self.directory, model=model, rebuild=rebuild, **options)

    @classmethod
    def merge(cls, parts: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], **options: Any) -> Collection:
        """Join part collections (from ``build --shard``) into one; the index is trained once."""
        from indexer.merge import merge_parts

        summary = merge_parts([Path(p) for p in parts], Path(out), **options)
        opened = cls.open(out, device=options.get("device", "auto"))
        opened.summary = summary  # type: ignore[attr-defined]
        return opened


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def update(directory: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None,
           rebuild: bool = False, **options: Any) -> Collection:
    """Bring the collection at ``directory`` up to date without opening (loading) it first."""
    writer = _Writer(Path(directory), **options)
    summary = writer.run(image_root=None, model_path=Path(model) if model else None, rebuild=rebuild)
    opened = Collection.open(directory, device=options.get("device", "auto"))
    opened.summary = summary  # type: ignore[attr-defined]
    return opened


class _Writer:
    """One build/update run over a collection directory (holds the writer lock throughout)."""

    def __init__(self, directory: Path, *, index: str = "auto", device: str = "auto", batch_size: int = 64,
                 workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 shard: tuple[int, int] | None = None, progress: bool = False,
                 projection_fit_max: int = FIT_MAX, threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.index_spec = index
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.shard = shard
        self.progress = progress
        self.fit_max = projection_fit_max
        self.threads = threads

    def run(self, *, image_root: Path | None, model_path: Path | None, rebuild: bool) -> BuildSummary:
        t0 = time.perf_counter()
        if image_root is None and not (self.directory / store.MANIFEST).exists():
            raise store.CollectionError(f"{self.directory} is not a collection (no {store.MANIFEST})")
        with store.WriterLock(self.directory):
            prev = store.read_manifest(self.directory) if (self.directory / store.MANIFEST).exists() else None
            return self._run_locked(prev, image_root, model_path, rebuild, t0)

    def _run_locked(self, prev: dict[str, Any] | None, image_root: Path | None, model_path: Path | None,
                    rebuild: bool, t0: float) -> BuildSummary:
        d = self.directory
        gen_prev = int(prev["generation"]) if prev else 0
        gen = gen_prev + 1
        if prev is not None:
            if image_root is not None and Path(prev["image_root"]) != image_root and not rebuild:
                raise store.CollectionError(f"{d} indexes {prev['image_root']}, not {image_root}; use another --out "
                                            "or --rebuild")
            image_root = image_root or Path(prev["image_root"])
            if self.shard is None and prev.get("shard"):
                self.shard = tuple(prev["shard"])  # type: ignore[assignment]
            if self.index_spec == "auto" and prev.get("index", {}).get("spec"):
                self.index_spec = prev["index"]["spec"]
        assert image_root is not None
        if model_path is None:
            model_path = d / prev["model_file"] if prev else default_model()
            if prev and not model_path.is_file():
                raise store.damaged(model_path, "is missing", "give the model with --model, or " + store.REBUILD_HINT)
        model = EmbeddingModel(model_path, device=self.device, threads=self.threads)
        if prev is not None and prev["model"]["sha256"] != model.sha256 and not rebuild:
            raise store.CollectionError(
                f"{d} was built with another model (sha256 {prev['model']['sha256'][:12]}, "
                f"{prev['model']['props'].get('moco.arch', '?')}); {model_path} is {model.sha256[:12]}: vectors of "
                "two models cannot be mixed; rerun with --rebuild to re-embed everything")
        full = rebuild or prev is None
        if not full:
            self._check_previous(prev, model)  # before embedding anything: fail in a second, not in an hour
        try:
            refs = scan_images(image_root)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise store.CollectionError(str(exc)) from None
        refs = [r for r in refs if in_shard(r.relpath, self.shard)]
        if not refs and prev is None:
            raise NothingIndexed(f"no image files ({', '.join(sorted(e.lstrip('.') for e in _exts()))}) under "
                                 f"{image_root}{' in this shard' if self.shard else ''}")

        conn = store.connect(d, create=full)
        try:
            store.rollback_uncommitted(conn, gen_prev)
            vis = {"gen": gen_prev}
            old = {r["path"]: r for r in conn.execute(
                f"SELECT id, path, size, mtime_ns, sha256, status FROM items WHERE {store.visible()}", vis)}
            if not full:  # rows lost (an emptied or replaced items.sqlite) would be re-added as new items
                have = sum(r["status"] == "ok" for r in old.values())
                if have != prev["counts"]["indexed"]:  # type: ignore[index]
                    raise store.damaged(d / store.ITEMS_DB, f"holds {have} indexed items of generation {gen_prev}, "
                                        f"{store.MANIFEST} says {prev['counts']['indexed']}")  # type: ignore[index]
            if full:
                old_for_diff: dict[str, sqlite3.Row] = {}
                removed_ids = [r["id"] for r in old.values()]
            else:
                old_for_diff = old
                current = {r.relpath for r in refs}
                removed_ids = [r["id"] for p, r in old.items() if p not in current]
            to_embed, changed_ids, touched = self._diff(refs, old_for_diff)
            removed_ids += changed_ids
            with conn:
                conn.executemany("UPDATE items SET removed_gen = ? WHERE id = ?", [(gen, i) for i in removed_ids])
                conn.executemany("UPDATE items SET size = ?, mtime_ns = ? WHERE id = ?", touched)
            store.crash_point("rows-removed")
            next_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]) + 1
            summary = BuildSummary(unchanged=len(old_for_diff) - len(removed_ids) if not full else 0,
                                   removed=len(removed_ids) - len(changed_ids) if not full else 0)
            part = self._embed(conn, model, image_root, to_embed, gen, next_id, summary)
            store.crash_point("vectors-written")
            new_manifest = self._finish(conn, prev, model, image_root, gen, full, part, summary)
        finally:
            conn.close()
        summary.seconds = round(time.perf_counter() - t0, 2)
        store.write_manifest(d, new_manifest)
        store.crash_point("manifest-written")
        store.remove_unreferenced(d, new_manifest, prev or {})
        store.forget_removed(d, gen_prev)
        return summary

    def _check_previous(self, prev: dict[str, Any], model: EmbeddingModel) -> None:
        """The previous generation's files that an incremental run reuses exist and fit; damage
        is reported now, with ``--rebuild`` (which reuses none of them) as the way out."""
        d = self.directory
        if model.dim != prev["dim"]:
            raise store.damaged(d / store.MANIFEST, f"'dim' is {prev['dim']} but its model embeds {model.dim}-d "
                                "vectors", store.DATA_HINT)
        for part in prev["vectors"]:
            _open_part(d, part, model.dim)
        for key in ("index", "projection"):
            entry = prev.get(key)
            if entry and not (d / entry["file"]).is_file():
                raise store.damaged(d / entry["file"], "is missing", store.DATA_HINT)

    def _diff(self, refs: list[ImageRef], old: dict[str, sqlite3.Row]
              ) -> tuple[list[ImageRef], list[int], list[tuple[int, int, int]]]:
        """Files to embed, ids of changed files, and (size, mtime, id) of files only touched.

        Size and mtime decide first (no read); when they differ the content hash decides, so a
        file copied back with a new mtime is not re-embedded.
        """
        to_embed: list[ImageRef] = []
        changed: list[int] = []
        touched: list[tuple[int, int, int]] = []
        for ref in refs:
            row = old.get(ref.relpath)
            if row is None:
                to_embed.append(ref)
                continue
            if row["size"] == ref.size and row["mtime_ns"] == ref.mtime_ns:
                continue
            if row["status"] == "ok" and row["sha256"]:
                try:
                    same = file_sha256(ref.path) == row["sha256"]
                except OSError:
                    same = False
                if same:
                    touched.append((ref.size, ref.mtime_ns, row["id"]))
                    continue
            changed.append(row["id"])
            to_embed.append(ref)
        return to_embed, changed, touched

    def _embed(self, conn: sqlite3.Connection, model: EmbeddingModel, image_root: Path, refs: list[ImageRef],
               gen: int, next_id: int, summary: BuildSummary) -> dict[str, Any]:
        """Embed ``refs`` into ``vectors-GEN.f32`` + ``ids-GEN.npy`` and their rows into SQLite."""
        from tqdm import tqdm

        from indexer.embed import embed_files

        d = self.directory
        vec_name, ids_name = f"vectors-{gen:06d}.f32", f"ids-{gen:06d}.npy"
        ids_out: list[int] = []
        t0 = time.perf_counter()
        bar = tqdm(total=len(refs), unit="img", desc="embedding", disable=not self.progress, smoothing=0.1,
                   dynamic_ncols=True)
        with open(d / vec_name, "wb") as vec_fh:
            ref_iter = iter(refs)
            item_id = next_id
            for chunk in embed_files((r.path for r in refs), model, batch_size=self.batch_size,
                                     workers=self.workers, max_pixels=self.max_pixels):
                rows, thumbs, vecs = [], [], []
                for decoded, vector in chunk:
                    ref = next(ref_iter)
                    ok = vector is not None
                    rows.append((item_id, ref.relpath, ref.size, ref.mtime_ns, decoded.sha256, ref.label,
                                 decoded.width or None, decoded.height or None, "ok" if ok else "skipped",
                                 decoded.reason, decoded.error, gen))
                    if ok:
                        vecs.append(vector)
                        ids_out.append(item_id)
                        if decoded.thumbnail:
                            thumbs.append((item_id, decoded.thumbnail))
                    item_id += 1
                if vecs:
                    vec_fh.write(np.ascontiguousarray(np.stack(vecs), dtype=np.float32).tobytes())
                store.insert_items(conn, rows, thumbs)
                bar.update(len(chunk))
            vec_fh.flush()
            os.fsync(vec_fh.fileno())
        bar.close()
        summary.embed_seconds = round(time.perf_counter() - t0, 3)
        summary.embedded = len(ids_out)
        store.atomic_write_bytes(d / ids_name, _npy_bytes(np.asarray(ids_out, dtype=np.int64)))
        return {"file": vec_name, "ids": ids_name, "count": len(ids_out), "dtype": "float32"}

    def _finish(self, conn: sqlite3.Connection, prev: dict[str, Any] | None, model: EmbeddingModel,
                image_root: Path, gen: int, full: bool, part: dict[str, Any], summary: BuildSummary
                ) -> dict[str, Any]:
        """Index, projection, model copy and the new manifest (not yet committed)."""
        d = self.directory
        vis = {"gen": gen}
        live_ids = np.array([r[0] for r in conn.execute(
            f"SELECT id FROM items WHERE status='ok' AND {store.visible()} ORDER BY id", vis)], dtype=np.int64)
        reasons = Counter(r[0] for r in conn.execute(
            f"SELECT reason FROM items WHERE status='skipped' AND {store.visible()}", vis))
        summary.indexed = len(live_ids)
        summary.skipped = sum(reasons.values())
        summary.skipped_by_reason = dict(reasons)
        if len(live_ids) == 0:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no image files"
            raise NothingIndexed(f"no image could be indexed under {image_root} ({detail}); nothing written")
        parts = ([] if full else list(prev["vectors"])) + [part]  # type: ignore[index]
        live = _LiveVectors(d, parts, model.dim, live_ids)
        total = sum(int(p["count"]) for p in parts)
        if len(parts) > MAX_VECTOR_FILES or total - len(live_ids) > total // 4:
            parts = [self._compact(live, gen)]  # one file again, without the rows of removed items
            live = _LiveVectors(d, parts, model.dim, live_ids)
        index_file = f"index-{gen:06d}.faiss"
        prev_ids = np.array([r[0] for r in conn.execute(
            f"SELECT id FROM items WHERE status='ok' AND {store.visible()} ORDER BY id", {"gen": gen - 1})],
            dtype=np.int64)
        index, recipe = self._index(prev, full, live, prev_ids)
        ann.save_index(index, d / index_file)
        store.crash_point("index-written")
        projection_file = f"projection-{gen:06d}.npz"
        proj = self._projection(prev, full, live)
        proj.save(d / projection_file)
        store.fsync_file(d / projection_file)
        store.crash_point("projection-written")
        model_file = prev["model_file"] if prev and prev["model"]["sha256"] == model.sha256 else None
        if model_file is None:
            model_file = "model.onnx" if not (d / "model.onnx").exists() or prev is None else \
                f"model-{model.sha256[:12]}.onnx"
            if not (d / model_file).exists() or file_sha256(d / model_file) != model.sha256:
                tmp = d / f".{model_file}.tmp"
                shutil.copyfile(model.path, tmp)
                store.fsync_file(tmp)
                os.replace(tmp, d / model_file)
        summary.recipe = recipe.to_json()
        return {
            "format_version": store.FORMAT_VERSION,
            "generation": gen,
            "created": prev["created"] if prev and not full else _now(),
            "updated": _now(),
            "image_root": str(image_root),
            "shard": list(self.shard) if self.shard else None,
            "model_file": model_file,
            "model": {"sha256": model.sha256, "props": model.props, "source": str(model.path)},
            "dim": model.dim,
            "vectors": parts,
            "index": {"file": index_file, "spec": self.index_spec, "recipe": recipe.to_json()},
            "projection": {"file": projection_file, "fit_points": int(len(proj.anchor_coords)),
                           "method": "pca50+openTSNE, others placed by nearest anchors"},
            "counts": {"indexed": int(len(live_ids)), "skipped": summary.skipped,
                       "skipped_by_reason": dict(reasons)},
            "last_run": {"embedded": summary.embedded, "embed_seconds": summary.embed_seconds},
        }

    def _compact(self, live: _LiveVectors, gen: int) -> dict[str, Any]:
        """Copy the live vectors, chunk by chunk, into one new vectors file."""
        name, ids_name = f"vectors-{gen:06d}-all.f32", f"ids-{gen:06d}-all.npy"
        with open(self.directory / name, "wb") as fh:
            for start in range(0, len(live), ann.ADD_CHUNK):
                fh.write(np.ascontiguousarray(live[start:start + ann.ADD_CHUNK], dtype=np.float32).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        store.atomic_write_bytes(self.directory / ids_name, _npy_bytes(live.ids))
        return {"file": name, "ids": ids_name, "count": len(live), "dtype": "float32"}

    def _index(self, prev: dict[str, Any] | None, full: bool, live: _LiveVectors, prev_ids: np.ndarray
               ) -> tuple[Any, ann.Recipe]:
        """Update the previous index in place when possible, else build (train + tune) a new one."""
        recipe = ann.choose_recipe(len(live), live.dim, self.index_spec)
        if not full and prev and prev.get("index"):
            old_recipe = ann.Recipe.from_json(prev["index"]["recipe"])
            old_n = int(prev["counts"]["indexed"])
            # Same recipe and the collection has not more than doubled since the index was tuned.
            # (An exact index that ``auto`` fell back to stays exact: its IVF missed the recall.)
            same = old_recipe.factory == recipe.factory or (
                self.index_spec == "auto" and old_recipe.exact and bool(old_recipe.note))
            if same and len(live) <= 2 * max(old_n, 1):
                index = _load_index(self.directory / prev["index"]["file"], live.dim, len(prev_ids))
                indexed = prev_ids
                gone = np.setdiff1d(indexed, live.ids)
                new = np.setdiff1d(live.ids, indexed)
                if ann.remove_ids(index, gone):
                    rows = np.searchsorted(live.ids, new)
                    for start in range(0, len(rows), ann.ADD_CHUNK):
                        sel = rows[start:start + ann.ADD_CHUNK]
                        ann.add_vectors(index, live[sel], live.ids[sel])
                    return index, old_recipe
        return ann.build_recipe(live, live.ids, self.index_spec, use_gpu=self.device != "cpu")

    def _projection(self, prev: dict[str, Any] | None, full: bool, live: _LiveVectors) -> Projection:
        if not full and prev and prev.get("projection"):
            proj = _load_projection(self.directory / prev["projection"]["file"], live.dim).keep(live.ids)
            new = np.setdiff1d(live.ids, proj.ids)
            if len(new):
                proj = proj.extend(new, live[np.searchsorted(live.ids, new)])
            return proj
        return fit_projection(live.ids, live, fit_max=self.fit_max)


def _read_whole(fd: int) -> bytes:
    """All bytes of an open file, by offset (no shared file position, so threads may share ``fd``)."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 30), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _exts() -> list[str]:
    from indexer.images import IMAGE_EXTENSIONS

    return list(IMAGE_EXTENSIONS)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
