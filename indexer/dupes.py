"""Near-duplicate groups: neighbours above a similarity threshold, joined into connected components.

Beside the index code because it is one more query over the same index: a range search where
the index supports it (flat, IVF), else a k-NN search filtered by the threshold (HNSW, PQ).
Connected components (not cliques) because duplicates chain: a photo, its resized copy and a
recompressed copy of that copy belong together even if the two ends drift below the threshold.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from indexer.ann import Searcher

__all__ = ["DEFAULT_THRESHOLD", "duplicate_groups"]

DEFAULT_THRESHOLD = 0.95
"""Cosine similarity above which two embeddings count as the same picture (resized, recompressed,
slightly cropped copies land above it with a trained model; distinct photos rarely do)."""

KNN_FALLBACK = 32


def duplicate_groups(
    searcher: Searcher,
    vectors: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    chunk: int = 4096,
) -> list[list[int]]:
    """Groups (lists of item ids, largest group first) of items linked by similarity > threshold."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return []
    position = {int(i): p for p, i in enumerate(ids)}
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    use_range = True
    for start in range(0, len(ids), chunk):
        q = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        src = np.arange(start, start + len(q))
        if use_range:
            try:
                lims, _sims, found = searcher.range_search(q, threshold)
                counts = np.diff(lims).astype(np.int64)
                rows.append(np.repeat(src, counts))
                cols.append(found)
                continue
            except RuntimeError:
                use_range = False  # HNSW and PQ indexes have no range search
        sims, found = searcher.search(q, min(KNN_FALLBACK, len(ids)))
        mask = (sims > threshold) & (found >= 0)
        rows.append(np.repeat(src, mask.sum(axis=1)))
        cols.append(found[mask])
    src_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    dst_ids = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    dst_all = np.array([position.get(int(i), -1) for i in dst_ids], dtype=np.int64)
    keep = (dst_all >= 0) & (dst_all != src_all)
    graph = coo_matrix((np.ones(int(keep.sum()), dtype=np.int8), (src_all[keep], dst_all[keep])),
                       shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    groups = [sorted(ids[labels == c].tolist()) for c in np.flatnonzero(sizes > 1)]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups
