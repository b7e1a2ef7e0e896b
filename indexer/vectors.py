"""Vector parts on disk: the N x D embeddings of a collection and the item ids they belong to.

A part is two files named by the manifest (``{"file", "ids", "count", "dtype"}``): raw
little-endian float32 rows (``vectors-NAME.f32``, memory-mapped when read, so a collection
larger than RAM opens in milliseconds) and their item ids (``ids-NAME.npy``). A build writes
one part, each update appends one, and compaction folds them back into one; all three, and
merges, write through :func:`write_part`, so the file layout is written down in one place.

Why a module of its own: both the reader (:mod:`indexer.collection`) and the writer
(:mod:`indexer.build`) need the layout, and the writer's rules (when to compact) are not the
reader's business.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer import files, store
from indexer.npy import load_array

__all__ = ["LiveVectors", "open_part", "write_part"]

DTYPE = "float32"


def write_part(directory: Path, name: str, blocks: Iterable[tuple[npt.ArrayLike, npt.ArrayLike]]) -> dict[str, Any]:
    """Write ``vectors-NAME.f32`` and ``ids-NAME.npy`` from ``(ids, vectors)`` blocks; return the
    part's manifest entry.

    ``blocks`` is consumed lazily, one block in memory at a time, so a caller may stream
    (embedding, copying from other parts) and do its own work per block (the SQLite rows of
    those items) in the generator that yields them. The vectors file is fsynced and the ids are
    written atomically before the entry is returned: a manifest that names the part never
    points at a half-written one. Both files get mode 0666 less the umask (Contract 3).
    """
    vec_name, ids_name = f"vectors-{name}.f32", f"ids-{name}.npy"
    ids_out: list[np.ndarray] = []
    with open(directory / vec_name, "wb") as fh:
        for ids, vectors in blocks:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if not len(ids):
                continue
            rows = np.ascontiguousarray(vectors, dtype=np.float32)
            if rows.ndim != 2 or len(rows) != len(ids):
                raise ValueError(f"a block of {len(ids)} ids came with vectors of shape {rows.shape}")
            fh.write(rows.tobytes())
            ids_out.append(ids)
        fh.flush()
        os.fsync(fh.fileno())
    all_ids = np.concatenate(ids_out) if ids_out else np.zeros(0, dtype=np.int64)
    buf = io.BytesIO()
    np.save(buf, all_ids, allow_pickle=False)
    files.atomic_write_bytes(directory / ids_name, buf.getvalue())
    return {"file": vec_name, "ids": ids_name, "count": int(len(all_ids)), "dtype": DTYPE}


def open_part(directory: Path, part: dict[str, Any], dim: int) -> tuple[npt.NDArray[np.int64], np.ndarray]:
    """A part's ids and vectors (a read-only memmap), checked against the manifest before use:
    a truncated or swapped file is refused here with its name rather than read as wrong vectors."""
    ids_path, vec_path = directory / part["ids"], directory / part["file"]
    count = int(part["count"])
    try:
        ids = load_array(ids_path)
    except FileNotFoundError:
        raise store.damaged(ids_path, "is missing", store.DATA_HINT) from None
    except (OSError, ValueError, EOFError) as exc:
        raise store.damaged(ids_path, f"cannot be read ({store.one_line(exc)})", store.DATA_HINT) from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) != count:
        raise store.damaged(ids_path, f"holds {getattr(ids, 'dtype', '?')} {getattr(ids, 'shape', '?')}, the "
                            f"manifest expects {count} item ids", store.DATA_HINT)
    dtype = np.dtype(part.get("dtype") or DTYPE)
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


class LiveVectors:
    """The vectors of the ids ``live`` across all parts, sliceable chunk by chunk without loading all.

    Rows are in increasing id order (parts are appended with increasing ids), so row i is the
    vector of ``ids[i]``. A single part with no removals is its memmap, zero copy. Every part is
    opened (and checked) here, so the files stay readable for this object's life even after a
    later writer deletes their names.
    """

    def __init__(self, directory: Path, parts: Sequence[dict[str, Any]], dim: int, live: np.ndarray) -> None:
        self.dim = dim
        self.live = live  # the ids asked for; ``ids`` are those of them found in the parts
        self.blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows in part, memmap)
        id_list = []
        for part in parts:
            pid, pvec = open_part(directory, part, dim)
            rows = np.flatnonzero(np.isin(pid, live))
            if len(rows):
                self.blocks.append((rows, pvec))
                id_list.append(pid[rows])
        self.ids: npt.NDArray[np.int64] = np.concatenate(id_list) if id_list else np.zeros(0, dtype=np.int64)
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

    def chunks(self, size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` blocks of at most ``size`` rows, in order: what :func:`write_part`
        takes, so compaction copies a collection larger than RAM block by block."""
        for start in range(0, len(self), size):
            yield self.ids[start:start + size], self[start:start + size]
