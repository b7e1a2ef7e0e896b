"""``merge``: join part collections written by ``build --shard i/n`` into one collection.

Parts are embedded independently (one per machine or GPU); merging copies their rows,
thumbnails and vectors, re-numbers items in path order (so ids equal those of a single build
of the same folder) and trains the index once, on a sample of all vectors, instead of merging
per-part indexes whose IVF centroids would differ. The same commit protocol as a build applies:
the generation is finished and committed by :func:`indexer.build.finish` and
:func:`indexer.build.commit`, and the parts are read through the public reader only.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexer import build, store
from indexer.collection import Collection
from indexer.vectors import write_part

__all__ = ["merge"]

CHUNK = 8192


def merge(parts: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, index: str = "auto",
          device: str = "auto", progress: bool = False, projection_fit_max: int | None = None) -> Collection:
    """Merge ``parts`` into the collection ``out`` (created, or replaced by a new generation);
    returns it opened, with the run's :class:`indexer.build.BuildSummary` as ``summary``."""
    t0 = time.perf_counter()
    paths, out = [Path(p) for p in parts], Path(out)
    if not paths:
        raise store.CollectionError("merge needs at least one part collection")
    opts = build.Options(index=index, device=device, progress=progress)
    if projection_fit_max is not None:
        opts.projection_fit_max = projection_fit_max
    opened: list[Collection] = []
    try:
        for p in paths:
            opened.append(Collection.open(p, device="cpu"))
        _check_parts(paths, opened)
        model = opened[0].model  # checked against the parts' manifests before anything is written
        with store.WriterLock(out):
            prev = store.read_manifest(out) if (out / store.MANIFEST).exists() else None
            gen = (int(prev["generation"]) if prev else 0) + 1
            conn = store.connect(out)
            try:
                store.rollback_uncommitted(conn, gen - 1)
                with conn:
                    conn.execute("UPDATE items SET removed_gen = ? WHERE removed_gen IS NULL", (gen,))
                next_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]) + 1
                rows = sorted(((r["path"], k, r) for k, col in enumerate(opened) for r in col.records()),
                              key=lambda t: t[0])
                paths_in_order = [t[0] for t in rows]
                if len(set(paths_in_order)) != len(paths_in_order):
                    raise store.CollectionError("the parts overlap (the same file is in two parts); merge parts of "
                                                "one sharded build only")
                summary = build.BuildSummary()
                part = write_part(out, f"{gen:06d}", _copy(gen, next_id, rows, opened, conn))
                store.crash_point("vectors-written")
                manifest = build.finish(out, conn, prev, model, opened[0].image_root, gen, part, summary, opts,
                                        full=True)
            finally:
                conn.close()
            manifest["merged_from"] = [str(p) for p in paths]
            summary.seconds = round(time.perf_counter() - t0, 2)
            build.commit(out, manifest, prev)
    finally:
        for col in opened:
            col.close()
    merged = Collection.open(out, device=device)
    merged.summary = summary
    return merged


def _check_parts(paths: list[Path], parts: list[Collection]) -> None:
    """Same model, same image root, and (for sharded parts) every shard present exactly once."""
    first = parts[0].manifest
    for path, col in zip(paths, parts):
        if col.manifest["model"]["sha256"] != first["model"]["sha256"]:
            raise store.CollectionError(f"{path} was embedded with another model than {paths[0]}; parts must "
                                        "share one model")
        if col.manifest["image_root"] != first["image_root"]:
            raise store.CollectionError(f"{path} indexes {col.manifest['image_root']}, {paths[0]} "
                                        f"{first['image_root']}; parts must index the same folder")
    shards = [tuple(c.manifest["shard"]) for c in parts if c.manifest.get("shard")]
    if shards:
        counts = {n for _, n in shards}
        if len(counts) != 1 or len(shards) != len(parts):
            raise store.CollectionError("the parts come from different shardings (--shard i/n with different n)")
        n = counts.pop()
        have = sorted(i for i, _ in shards)
        if have != list(range(n)):
            missing = sorted(set(range(n)) - set(have))
            raise store.CollectionError(f"parts for shards {missing} of {n} are missing"
                                        if missing else "a shard is given twice")


def _copy(gen: int, next_id: int, rows: list[tuple[str, int, dict[str, Any]]], parts: list[Collection],
          conn: sqlite3.Connection) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """Rows (re-numbered in path order) and thumbnails into ``conn``, block by block, yielding
    each block's ``(ids, vectors)`` for :func:`indexer.vectors.write_part`."""
    for start in range(0, len(rows), CHUNK):
        new_rows, thumbs, ids, vecs = [], [], [], []
        for offset, (_, k, r) in enumerate(rows[start:start + CHUNK]):
            new_id = next_id + start + offset
            new_rows.append((new_id, r["path"], r["size"], r["mtime_ns"], r["sha256"], r["label"], r["width"],
                             r["height"], r["status"], r["reason"], r["error"], gen))
            if r["status"] == "ok":
                vecs.append(parts[k].vector(r["id"]))
                ids.append(new_id)
                thumb = parts[k].thumbnail(r["id"])
                if thumb:
                    thumbs.append((new_id, thumb))
        store.insert_items(conn, new_rows, thumbs)
        yield ids, vecs
