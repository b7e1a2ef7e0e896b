"""The one writer of a collection directory (Contract 3): build, update, commit, shards.

:func:`build` and :func:`update` hold the writer lock, roll back what a crashed writer left,
embed only new or changed files, append one vector part per generation, rewrite the index and
the map under new names and commit by replacing the manifest; they return the new generation
opened. :func:`finish` (index, map, model copy, the manifest to commit) and :func:`commit` are
public because :mod:`indexer.merge` writes a generation the same way from copied rows. The
steps are separated by :func:`indexer.store.crash_point` marks that the crash tests stop at.

Imports run one way: this module uses the reader (:mod:`indexer.collection`), and nothing the
reader imports uses this one.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer import ann, files, scores, store
from indexer.collection import Collection, open_index, open_projection
from indexer.embed import EmbeddingModel, embed_files
from indexer.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageRef, scan_images
from indexer.models import choose_model, choose_variant
from indexer.projection import FIT_MAX, Projection, fit_projection
from indexer.vectors import LiveVectors, open_part, write_part

__all__ = ["BuildSummary", "NothingIndexed", "Options", "build", "commit", "default_model", "finish", "in_shard",
           "parse_shard", "update"]


MAX_VECTOR_FILES = 8
"""Updates append one vectors file each; beyond this many (or a quarter of rows dead) they are
compacted into one, so opening stays cheap and removed items stop taking space."""


class NothingIndexed(store.CollectionError):
    """Not a single image could be embedded: nothing is written (exit code 1)."""


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
            out.append("index       " + ann.describe_recipe(self.recipe))
        return out


@dataclass
class Options:
    """How a writer runs: the keyword options of :func:`build`, :func:`update` and merges."""

    index: str = "auto"  # "auto", flat, hnsw, ivf or a FAISS factory string (indexer.ann)
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # decoding threads (default one per core)
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard: tuple[int, int] | None = None  # embed only files in_shard(path, (i, n))
    progress: bool = False
    projection_fit_max: int = FIT_MAX
    threads: int | None = None  # ONNX Runtime threads


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_model(image_root: Path, models_dir: Path = Path("models"), device: str = "auto") -> Path:
    """The model trained on ``image_root`` (:func:`indexer.models.choose_model`), never silently
    the newest file: a model trained on other pictures embeds these badly without a word; its
    verified int8 sibling where that is faster (:func:`indexer.models.choose_variant`)."""
    return choose_variant(choose_model(image_root, models_dir).path, device=device).path


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
# Entry points
# --------------------------------------------------------------------------------------------


def build(image_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
          model: str | os.PathLike[str] | None = None, rebuild: bool = False, **options: Any) -> Collection:
    """Build (or incrementally refresh) a collection of ``image_dir``; returns it opened.

    ``out`` defaults to ``indexes/<folder name>``; ``options`` are the fields of :class:`Options`.
    The run's :class:`BuildSummary` is the returned collection's ``summary``.
    """
    image_root = Path(image_dir).expanduser().resolve()
    directory = Path(out) if out is not None else Path("indexes") / image_root.name
    opts = Options(**options)
    summary = _Writer(directory, opts).run(image_root=image_root, model_path=Path(model) if model else None,
                                           rebuild=rebuild)
    return _opened(directory, opts, summary)


def update(directory: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None,
           rebuild: bool = False, **options: Any) -> Collection:
    """Bring the collection at ``directory`` up to date with its image folder (new and changed
    files embedded, deleted ones dropped) without loading it first; returns it opened."""
    opts = Options(**options)
    summary = _Writer(Path(directory), opts).run(image_root=None, model_path=Path(model) if model else None,
                                                 rebuild=rebuild)
    return _opened(Path(directory), opts, summary)


def _opened(directory: Path, opts: Options, summary: BuildSummary) -> Collection:
    opened = Collection.open(directory, device=opts.device)
    opened.summary = summary
    return opened


def commit(directory: Path, manifest: dict[str, Any], prev: dict[str, Any] | None) -> None:
    """Make ``manifest`` current, then delete what neither it nor ``prev`` names, and the rows
    both cannot see (a reader of ``prev`` keeps working meanwhile)."""
    store.write_manifest(directory, manifest)
    store.crash_point("manifest-written")
    store.remove_unreferenced(directory, manifest, prev or {})
    store.forget_removed(directory, int(manifest["generation"]) - 1)


# --------------------------------------------------------------------------------------------
# One build or update
# --------------------------------------------------------------------------------------------


class _Writer:
    """One build/update run over a collection directory (holds the writer lock throughout)."""

    def __init__(self, directory: Path, opts: Options) -> None:
        self.directory = Path(directory)
        self.opts = opts

    def run(self, *, image_root: Path | None, model_path: Path | None, rebuild: bool) -> BuildSummary:
        t0 = time.perf_counter()
        if image_root is None and not (self.directory / store.MANIFEST).exists():
            raise store.CollectionError(f"{self.directory} is not a collection (no {store.MANIFEST})")
        with store.WriterLock(self.directory):
            prev = store.read_manifest(self.directory) if (self.directory / store.MANIFEST).exists() else None
            return self._run_locked(prev, image_root, model_path, rebuild, t0)

    def _run_locked(self, prev: dict[str, Any] | None, image_root: Path | None, model_path: Path | None,
                    rebuild: bool, t0: float) -> BuildSummary:
        d, opts = self.directory, self.opts
        gen_prev = int(prev["generation"]) if prev else 0
        gen = gen_prev + 1
        if prev is not None:
            if image_root is not None and Path(prev["image_root"]) != image_root and not rebuild:
                raise store.CollectionError(f"{d} indexes {prev['image_root']}, not {image_root}; use another --out "
                                            "or --rebuild")
            image_root = image_root or Path(prev["image_root"])
            if opts.shard is None and prev.get("shard"):
                opts.shard = tuple(prev["shard"])  # type: ignore[assignment]
            if opts.index == "auto" and prev.get("index", {}).get("spec"):
                opts.index = prev["index"]["spec"]
        assert image_root is not None
        if model_path is None:
            model_path = d / prev["model_file"] if prev else default_model(image_root, device=opts.device)
            if prev and not model_path.is_file():
                raise store.damaged(model_path, "is missing", "give the model with --model, or " + store.REBUILD_HINT)
        model = EmbeddingModel(model_path, device=opts.device, threads=opts.threads)
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
        refs = [r for r in refs if in_shard(r.relpath, opts.shard)]
        if not refs and prev is None:
            raise NothingIndexed(f"no image files ({', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))}) "
                                 f"under {image_root}{' in this shard' if opts.shard else ''}")

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
            part = self._embed(conn, model, to_embed, gen, next_id, summary)
            store.crash_point("vectors-written")
            new_manifest = finish(d, conn, prev, model, image_root, gen, part, summary, opts, full=full)
        finally:
            conn.close()
        summary.seconds = round(time.perf_counter() - t0, 2)
        commit(d, new_manifest, prev)
        return summary

    def _check_previous(self, prev: dict[str, Any], model: EmbeddingModel) -> None:
        """The previous generation's files that an incremental run reuses exist and fit; damage
        is reported now, with ``--rebuild`` (which reuses none of them) as the way out."""
        d = self.directory
        if model.dim != prev["dim"]:
            raise store.damaged(d / store.MANIFEST, f"'dim' is {prev['dim']} but its model embeds {model.dim}-d "
                                "vectors", store.DATA_HINT)
        for part in prev["vectors"]:
            open_part(d, part, model.dim)
        for key in ("index", "projection"):
            entry = prev.get(key)
            if entry and not (d / entry["file"]).is_file():
                raise store.damaged(d / entry["file"], "is missing", store.DATA_HINT)

    @staticmethod
    def _diff(refs: list[ImageRef], old: dict[str, sqlite3.Row]
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
                    same = files.sha256_file(ref.path) == row["sha256"]
                except OSError:
                    same = False
                if same:
                    touched.append((ref.size, ref.mtime_ns, row["id"]))
                    continue
            changed.append(row["id"])
            to_embed.append(ref)
        return to_embed, changed, touched

    def _embed(self, conn: sqlite3.Connection, model: EmbeddingModel, refs: list[ImageRef], gen: int, next_id: int,
               summary: BuildSummary) -> dict[str, Any]:
        """Embed ``refs`` into this generation's vector part, and their rows into SQLite."""
        from tqdm import tqdm

        opts = self.opts
        embedded = 0

        def blocks() -> Iterator[tuple[list[int], list[np.ndarray]]]:
            nonlocal embedded
            ref_iter = iter(refs)
            item_id = next_id
            for chunk in embed_files((r.path for r in refs), model, batch_size=opts.batch_size,
                                     workers=opts.workers, max_pixels=opts.max_pixels):
                rows, thumbs, ids, vecs = [], [], [], []
                for decoded, vector in chunk:
                    ref = next(ref_iter)
                    ok = vector is not None
                    rows.append((item_id, ref.relpath, ref.size, ref.mtime_ns, decoded.sha256, ref.label,
                                 decoded.width or None, decoded.height or None, "ok" if ok else "skipped",
                                 decoded.reason, decoded.error, gen))
                    if ok:
                        vecs.append(vector)
                        ids.append(item_id)
                        if decoded.thumbnail:
                            thumbs.append((item_id, decoded.thumbnail))
                    item_id += 1
                store.insert_items(conn, rows, thumbs)
                embedded += len(ids)
                bar.update(len(chunk))
                yield ids, vecs

        t0 = time.perf_counter()
        bar = tqdm(total=len(refs), unit="img", desc="embedding", disable=not opts.progress, smoothing=0.1,
                   dynamic_ncols=True)
        try:
            part = write_part(self.directory, f"{gen:06d}", blocks())
        finally:
            bar.close()
        summary.embed_seconds = round(time.perf_counter() - t0, 3)
        summary.embedded = embedded
        return part


# --------------------------------------------------------------------------------------------
# The rest of a generation: index, map, model copy, manifest
# --------------------------------------------------------------------------------------------


def finish(directory: Path, conn: sqlite3.Connection, prev: dict[str, Any] | None, model: EmbeddingModel,
           image_root: Path, gen: int, part: dict[str, Any], summary: BuildSummary, opts: Options, *,
           full: bool) -> dict[str, Any]:
    """Index, map and model copy of generation ``gen``, and the manifest that names them (not yet
    committed: pass it to :func:`commit`).

    ``part`` is the vector part this run wrote (its rows already in ``conn``, added at ``gen``);
    ``full``: the generation replaces ``prev`` completely (a build, rebuild or merge) rather than
    appending to its parts, index and map. ``summary`` gets the counts and the recipe.
    """
    d = directory
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
    live = LiveVectors(d, parts, model.dim, live_ids)
    total = sum(int(p["count"]) for p in parts)
    if len(parts) > MAX_VECTOR_FILES or total - len(live_ids) > total // 4:
        # one part again, without the rows of removed items
        parts = [write_part(d, f"{gen:06d}-all", live.chunks(ann.ADD_CHUNK))]
        live = LiveVectors(d, parts, model.dim, live_ids)
    index_file = f"index-{gen:06d}.faiss"
    prev_ids = np.array([r[0] for r in conn.execute(
        f"SELECT id FROM items WHERE status='ok' AND {store.visible()} ORDER BY id", {"gen": gen - 1})],
        dtype=np.int64)
    index, recipe = _index(d, prev, full, live, prev_ids, opts)
    ann.save_index(index, d / index_file)
    store.crash_point("index-written")
    projection_file = f"projection-{gen:06d}.npz"
    proj = _projection(d, prev, full, live, opts)
    proj.save(d / projection_file)
    store.crash_point("projection-written")
    model_file = _model_copy(d, prev, model)
    summary.recipe = recipe.to_json()
    # What a similarity means in this generation (indexer.scores): closeness of hits, dupes' threshold.
    stats = scores.measure(ann.Searcher(index, recipe.params, use_gpu=False).search, live, live_ids)
    return {
        "format_version": store.FORMAT_VERSION,
        "generation": gen,
        "created": prev["created"] if prev and not full else _now(),
        "updated": _now(),
        "image_root": str(image_root),
        "shard": list(opts.shard) if opts.shard else None,
        "model_file": model_file,
        "model": {"sha256": model.sha256, "props": model.props, "source": str(model.path)},
        "dim": model.dim,
        "vectors": parts,
        "index": {"file": index_file, "spec": opts.index, "recipe": recipe.to_json()},
        "projection": {"file": projection_file, "fit_points": int(len(proj.anchor_coords)),
                       "method": "pca50+openTSNE, others placed by nearest anchors"},
        "counts": {"indexed": int(len(live_ids)), "skipped": summary.skipped,
                   "skipped_by_reason": dict(reasons)},
        "last_run": {"embedded": summary.embedded, "embed_seconds": summary.embed_seconds},
        "neighbour_stats": stats.to_json() if stats else None,
    }


def _model_copy(d: Path, prev: dict[str, Any] | None, model: EmbeddingModel) -> str:
    """The collection's own copy of the model (queries must use the one that made the vectors):
    the previous one when it is the same model, else a new copy under a name no reader of the
    previous generation is using."""
    if prev and prev["model"]["sha256"] == model.sha256:
        return str(prev["model_file"])
    model_file = "model.onnx" if not (d / "model.onnx").exists() or prev is None else \
        f"model-{model.sha256[:12]}.onnx"
    if not (d / model_file).exists() or files.sha256_file(d / model_file) != model.sha256:
        with open(model.path, "rb") as src:
            files.atomic_write(d / model_file, lambda out: shutil.copyfileobj(src, out, 1 << 20))
    return model_file


def _index(d: Path, prev: dict[str, Any] | None, full: bool, live: LiveVectors, prev_ids: np.ndarray,
           opts: Options) -> tuple[Any, ann.Recipe]:
    """Update the previous index in place when possible, else build (train + tune) a new one."""
    recipe = ann.choose_recipe(len(live), live.dim, opts.index)
    if not full and prev and prev.get("index"):
        old_recipe = ann.Recipe.from_json(prev["index"]["recipe"])
        old_n = int(prev["counts"]["indexed"])
        # Same recipe and the collection has not more than doubled since the index was tuned.
        # (An exact index that ``auto`` fell back to stays exact: its IVF missed the recall.)
        same = old_recipe.factory == recipe.factory or (
            opts.index == "auto" and old_recipe.exact and bool(old_recipe.note))
        if same and len(live) <= 2 * max(old_n, 1):
            index = open_index(d / prev["index"]["file"], live.dim, len(prev_ids))
            gone = np.setdiff1d(prev_ids, live.ids)
            new = np.setdiff1d(live.ids, prev_ids)
            if ann.remove_ids(index, gone):
                rows = np.searchsorted(live.ids, new)
                for start in range(0, len(rows), ann.ADD_CHUNK):
                    sel = rows[start:start + ann.ADD_CHUNK]
                    ann.add_vectors(index, live[sel], live.ids[sel])
                return index, old_recipe
    return ann.build_recipe(live, live.ids, opts.index, use_gpu=opts.device != "cpu")


def _projection(d: Path, prev: dict[str, Any] | None, full: bool, live: LiveVectors, opts: Options) -> Projection:
    """The previous map with removed items dropped and new ones placed, or a new fit."""
    if not full and prev and prev.get("projection"):
        proj = open_projection(d / prev["projection"]["file"], live.dim).keep(live.ids)
        new = np.setdiff1d(live.ids, proj.ids)
        if len(new):
            proj = proj.extend(new, live[np.searchsorted(live.ids, new)])
        return proj
    return fit_projection(live.ids, live, fit_max=opts.projection_fit_max)
