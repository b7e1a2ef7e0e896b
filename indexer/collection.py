"""The public reader of a collection directory (Contract 3): ``Collection``, ``Hit``, ``Item``.

:meth:`Collection.open` reads the manifest once and sees exactly that generation (SQLite rows
are filtered by it, files are the ones it names), so a reader keeps a consistent view while a
writer works and sees the new version on the next ``open`` (or :meth:`Collection.reload`).
Writing (build, update, commit, shards) is :mod:`indexer.build`'s job and joining shards
:mod:`indexer.merge`'s; both import this module, never the other way round.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from indexer import ann, quality, store
from indexer.embed import EmbeddingModel
from indexer.projection import Projection
from indexer.scores import NeighbourStats, measure
from indexer.vectors import LiveVectors

if TYPE_CHECKING:  # only for the annotation: the writer imports the reader, never the reverse
    from indexer.build import BuildSummary
    from indexer.dupes import Threshold

__all__ = ["Collection", "Hit", "Item", "open_index", "open_projection"]


@dataclass(frozen=True)
class Hit:
    """One search result: item id, path relative to the image root, cosine similarity, label, and
    ``closeness``: the share (0..1) of the collection's items whose nearest neighbour is less
    similar than this hit (None when the collection is too small to measure; see
    :mod:`indexer.scores`), so a score means something whatever the model's scale."""

    id: int
    path: str
    score: float
    label: str | None
    closeness: float | None = None

    def to_json(self) -> dict[str, Any]:
        # Its fields are plain values: a shallow copy, not asdict's recursive deep copy (measured:
        # about 0.1 ms of a served query's 3 ms for 10 hits).
        return dict(vars(self))


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


def open_index(path: Path, dim: int, count: int | None = None) -> Any:
    """The FAISS index file, checked to hold ``count`` vectors of ``dim`` (when given): damage
    is reported on open with the file's name, not as a wrong answer at some later search."""
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


def open_projection(path: Path, dim: int) -> Projection:
    """The map file, checked to fit vectors of ``dim``."""
    try:
        return Projection.load(path, dim)
    except FileNotFoundError:
        raise store.damaged(path, "is missing", store.DATA_HINT) from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise store.damaged(path, f"cannot be read ({store.one_line(exc)})", store.DATA_HINT) from None


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
        # What the run that wrote this generation did, when indexer.build or indexer.merge
        # opened it for its caller (their functions return the new generation opened); else None.
        self.summary: BuildSummary | None = None
        self._model: EmbeddingModel | None = None
        self._model_fh: Any = None
        self._vectors: LiveVectors | None = None
        self._projection: Projection | None = None
        self._labels_conn: sqlite3.Connection | None = None
        self._neighbour_stats: tuple[NeighbourStats | None] | None = None
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
        index = open_index(d / index_entry["file"], self.dim, len(live))
        self.searcher = ann.Searcher(index, self.recipe.get("params"), use_gpu=self.device != "cpu")
        entry = self.manifest.get("projection")
        if entry:
            self._projection = open_projection(d / entry["file"], self.dim)

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
    def quality(self) -> quality.ModelQuality:
        """How the model measured itself at training time (its ``moco.quality``, kept in the
        manifest with the model's other props); "unmeasured" when the model records none."""
        return quality.from_props(self.manifest["model"]["props"])

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

    def records(self) -> list[dict[str, Any]]:
        """Every file of this generation, indexed or skipped, in id order, with what
        ``items.sqlite`` records of it (id, path, label, width, height, size, mtime_ns, sha256,
        status, reason, error): what a merge copies into the merged collection."""
        return [dict(r) for r in self._rows("1 = 1")]

    def _live(self) -> LiveVectors:
        if self._vectors is None:
            live = np.array([r[0] for r in self._conn.execute(
                f"SELECT id FROM items WHERE status='ok' AND {store.visible()} ORDER BY id",
                {"gen": self.generation})], dtype=np.int64)
            self._vectors = LiveVectors(self.directory, self.manifest["vectors"], self.dim, live)
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
        stats = self.neighbour_stats()
        return [Hit(i, meta[i][0], s, meta[i][1], None if stats is None else round(stats.closeness(s), 4))
                for i, s in pairs]

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

    def neighbour_stats(self) -> NeighbourStats | None:
        """How similar items' nearest neighbours are in this collection (:mod:`indexer.scores`):
        measured at build and kept in the manifest; for a collection written before that, measured
        here from a sample once and kept in memory (a reader never writes). None when too small."""
        if self._neighbour_stats is None:
            entry = self.manifest.get("neighbour_stats")
            if entry is not None:
                stats: NeighbourStats | None = NeighbourStats.from_json(entry)
            else:
                live = self._live()
                stats = measure(self.searcher.search, live, live.ids)
            self._neighbour_stats = (stats,)
        return self._neighbour_stats[0]

    def duplicate_threshold(self, threshold: float | None = None) -> Threshold:
        """The similarity near-duplicates must exceed, and why: ``threshold`` (absolute cosine)
        when given, else adapted to this collection's neighbour similarities (:mod:`indexer.dupes`)."""
        from indexer.dupes import choose_threshold

        return choose_threshold(self.neighbour_stats(), threshold)

    def duplicates(self, threshold: float | None = None) -> list[list[int]]:
        """Near-duplicate groups (item ids) with cosine similarity above ``threshold`` (default:
        :meth:`duplicate_threshold`); identical files (same content hash) always share a group."""
        from indexer.dupes import duplicate_groups

        live = self._live()
        hashes = {it.id: it.sha256 for it in self.items}
        return duplicate_groups(self.searcher, live, live.ids, self.duplicate_threshold(threshold).similarity,
                                same_file=[hashes.get(int(i)) for i in live.ids])

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
