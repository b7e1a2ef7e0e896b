"""``merge``: join part collections written by ``build --shard i/n`` into one collection.

Parts are embedded independently (one per machine or GPU); merging copies their rows,
thumbnails and vectors, re-numbers items in path order (so ids equal those of a single build
of the same folder) and trains the index once, on a sample of all vectors, instead of merging
per-part indexes whose IVF centroids would differ. The same commit protocol as a build applies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer import store
from indexer.collection import BuildSummary, Collection, _Writer

__all__ = ["merge_parts"]

CHUNK = 8192


def merge_parts(parts: list[Path], out: Path, *, index: str = "auto", device: str = "auto",
                progress: bool = False, projection_fit_max: int | None = None, **_: Any) -> BuildSummary:
    """Merge ``parts`` into the collection ``out`` (created, or replaced by a new generation)."""
    t0 = time.perf_counter()
    if not parts:
        raise store.CollectionError("merge needs at least one part collection")
    opened: list[Collection] = []
    try:
        for p in parts:
            opened.append(Collection.open(p, device="cpu"))
        _check_parts(parts, opened)
        model = opened[0].model  # checked against the parts' manifests before anything is written
        options: dict[str, Any] = {"index": index, "device": device, "progress": progress}
        if projection_fit_max is not None:
            options["projection_fit_max"] = projection_fit_max
        writer = _Writer(out, **options)
        with store.WriterLock(out):
            prev = store.read_manifest(out) if (out / store.MANIFEST).exists() else None
            gen = (int(prev["generation"]) if prev else 0) + 1
            conn = store.connect(out)
            try:
                store.rollback_uncommitted(conn, gen - 1)
                with conn:
                    conn.execute("UPDATE items SET removed_gen = ? WHERE removed_gen IS NULL", (gen,))
                next_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]) + 1
                rows = []
                for k, col in enumerate(opened):
                    for r in col._conn.execute(f"SELECT * FROM items WHERE {store.visible()}",
                                               {"gen": col.generation}):
                        rows.append((r["path"], k, dict(r)))
                rows.sort(key=lambda t: t[0])
                paths = [t[0] for t in rows]
                if len(set(paths)) != len(paths):
                    raise store.CollectionError("the parts overlap (the same file is in two parts); merge parts of "
                                                "one sharded build only")
                summary = BuildSummary()
                part = _copy(out, gen, next_id, rows, opened, conn, summary)
                store.crash_point("vectors-written")
                writer.shard = None
                manifest = writer._finish(conn, prev, model, opened[0].image_root, gen, True, part, summary)
            finally:
                conn.close()
            manifest["merged_from"] = [str(p) for p in parts]
            summary.seconds = round(time.perf_counter() - t0, 2)
            store.write_manifest(out, manifest)
            store.crash_point("manifest-written")
            store.remove_unreferenced(out, manifest, prev or {})
            store.forget_removed(out, gen - 1)
        return summary
    finally:
        for col in opened:
            col.close()


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


def _copy(out: Path, gen: int, next_id: int, rows: list[tuple[str, int, dict[str, Any]]],
          parts: list[Collection], conn: Any, summary: BuildSummary) -> dict[str, Any]:
    """Copy rows (re-numbered in path order), thumbnails and vectors into ``out``."""
    vec_name, ids_name = f"vectors-{gen:06d}.f32", f"ids-{gen:06d}.npy"
    part_ids = [c.ids for c in parts]
    ids_out: list[int] = []
    with open(out / vec_name, "wb") as fh:
        for start in range(0, len(rows), CHUNK):
            batch = rows[start:start + CHUNK]
            new_rows, thumbs, vecs = [], [], []
            for offset, (_, k, r) in enumerate(batch):
                new_id = next_id + start + offset
                new_rows.append((new_id, r["path"], r["size"], r["mtime_ns"], r["sha256"], r["label"], r["width"],
                                 r["height"], r["status"], r["reason"], r["error"], gen))
                if r["status"] == "ok":
                    pos = int(np.searchsorted(part_ids[k], r["id"]))
                    vecs.append(parts[k]._live()[pos])
                    ids_out.append(new_id)
                    thumb = parts[k].thumbnail(r["id"])
                    if thumb:
                        thumbs.append((new_id, thumb))
            if vecs:
                fh.write(np.ascontiguousarray(np.stack(vecs), dtype=np.float32).tobytes())
            store.insert_items(conn, new_rows, thumbs)
        fh.flush()
        os.fsync(fh.fileno())
    from indexer.collection import _npy_bytes

    store.atomic_write_bytes(out / ids_name, _npy_bytes(np.asarray(ids_out, dtype=np.int64)))
    summary.embedded = 0
    return {"file": vec_name, "ids": ids_name, "count": len(ids_out), "dtype": "float32"}
