"""Near-duplicate groups: neighbours above a similarity threshold, joined into groups.

Beside the index code because it is one more query over the same index: a range search where
the index supports it (flat, IVF), else a k-NN search filtered by the threshold (HNSW, PQ).

The default threshold adapts to the model (:func:`choose_threshold`). A fixed cosine means
different things to different models: a weak one puts every pair of images above 0.95, and a
fixed 0.95 then joins a whole collection into one group. So two images are near-duplicates
when their cosine distance is a small fraction (:data:`RELATIVE`) of the collection's typical
nearest-neighbour distance (measured at build, :mod:`indexer.scores`), and never looser than
the absolute :data:`DEFAULT_THRESHOLD` a good model is judged by. ``--threshold`` still sets an
absolute cosine.

Groups are connected components (duplicates chain: a photo, its resized copy and a recompressed
copy of that copy belong together even if the two ends drift below the threshold), but a chain
may not wander: a component wider than :data:`SPREAD` times the link distance around its most
linked member is cut into groups around such centres (:func:`split_wide`), so a dense region of
similar images never becomes one group of thousands. Identical files (same content hash) always
share a group, whatever their embeddings say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from indexer.ann import Searcher
from indexer.scores import NeighbourStats

__all__ = ["DEFAULT_THRESHOLD", "RELATIVE", "SPREAD", "Threshold", "choose_threshold", "duplicate_groups",
           "group_sizes"]

DEFAULT_THRESHOLD = 0.95
"""Cosine similarity above which two embeddings count as the same picture with a trained model
(resized, recompressed, slightly cropped copies land above it; distinct photos rarely do): the
floor of the adaptive threshold, and the old fixed default."""

RELATIVE = 0.1
"""A near-duplicate's cosine distance is at most this fraction of the median nearest-neighbour
distance: ten times closer than an ordinary nearest neighbour (measured: the weak
flowers model of BENCHMARKS.md puts two unrelated yellow flowers at 0.15-0.19 of it, a shifted copy
at 0.03)."""

SPREAD = 2.0
"""A group's members lie within this many link distances (1 - threshold) of its centre."""

KNN_FALLBACK = 32


@dataclass(frozen=True)
class Threshold:
    """The similarity two images must exceed to be near-duplicates, and why it is that."""

    similarity: float
    reason: str
    adaptive: bool


def choose_threshold(stats: NeighbourStats | None, given: float | None = None) -> Threshold:
    """``given`` (an absolute cosine) when set, else the adaptive default for ``stats``."""
    if given is not None:
        return Threshold(float(given), f"{given:g}, as given (cosine similarity)", False)
    if stats is None:
        return Threshold(DEFAULT_THRESHOLD, f"{DEFAULT_THRESHOLD:g}, the fixed default: too few items to "
                         "measure how close neighbours are in this collection", False)
    typical = stats.typical_distance()
    adaptive = 1.0 - RELATIVE * typical
    scale = (f"the median nearest neighbour is at cosine {1 - typical:.4f} (distance {typical:.4f}), "
             f"a near-duplicate must be {1 / RELATIVE:g}x closer")
    if adaptive > DEFAULT_THRESHOLD:
        return Threshold(adaptive, f"{adaptive:.5f}, adapted to the model: {scale}; this model puts images "
                         f"close together, so the fixed {DEFAULT_THRESHOLD:g} would join unrelated ones", True)
    return Threshold(DEFAULT_THRESHOLD, f"{DEFAULT_THRESHOLD:g}, the absolute floor: {scale}, which would "
                     f"allow {adaptive:.4f}", True)


def duplicate_groups(
    searcher: Searcher,
    vectors: Any,
    ids: npt.NDArray[np.int64],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    same_file: Sequence[str | None] | None = None,
    spread: float = SPREAD,
    chunk: int = 4096,
) -> list[list[int]]:
    """Groups (lists of item ids, largest group first) of items linked by similarity > threshold.

    ``vectors[positions]`` gives rows in the order of ``ids``; ``same_file`` (content hashes in
    the same order, None where unknown) makes identical files one group whatever their vectors.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return []
    src, dst = _links(searcher, vectors, ids, threshold, chunk)
    if same_file is not None:
        file_src, file_dst = _same_file_links(same_file)
        src, dst = np.concatenate([src, file_src]), np.concatenate([dst, file_dst])
    n = len(ids)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    graph = ((graph + graph.T) > 0).astype(np.int8)
    radius = spread * (1.0 - threshold)
    groups: list[list[int]] = []
    for members in _components(graph, np.arange(n)):
        for part in split_wide(graph, vectors, members, radius, same_file):
            groups.append(sorted(ids[part].tolist()))
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


def split_wide(graph: csr_matrix, vectors: Any, members: npt.NDArray[np.int64], radius: float,
               same_file: Sequence[str | None] | None = None) -> list[npt.NDArray[np.int64]]:
    """Cut a connected group into groups whose members lie within cosine distance ``radius`` of a
    centre: the most linked member takes everything near it, the rest are grouped again by their
    own links. Identical files stay together. Members left alone belong to no group."""
    out: list[npt.NDArray[np.int64]] = []
    pending = [np.asarray(members, dtype=np.int64)]
    while pending:
        group = pending.pop()
        if len(group) < 2:
            continue
        vecs = np.asarray(vectors[group], dtype=np.float32)
        sub = graph[group][:, group]
        centre = int(np.argmax(np.asarray(sub.sum(axis=1)).ravel()))
        near = vecs @ vecs[centre] >= 1.0 - radius - 1e-6
        if near.all():
            out.append(group)
            continue
        if same_file is not None:  # an identical file of a member is a member
            keys = {same_file[p] for p in group[near]} - {None}
            near |= np.array([same_file[p] in keys for p in group])
        taken = group[near]
        if len(taken) > 1:
            out.append(taken)
        rest = group[~near]
        pending.extend(_components(graph[rest][:, rest], rest))
    return out


def group_sizes(groups: Sequence[Sequence[int]], total: int) -> dict[str, int]:
    """The summary a person checks first: how many groups, the largest, how many items in groups."""
    return {"groups": len(groups), "largest": max((len(g) for g in groups), default=0),
            "in_groups": sum(len(g) for g in groups), "items": int(total)}


def _components(graph: csr_matrix, members: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Connected components of more than one member (``graph`` indexed like ``members``)."""
    if len(members) < 2:
        return []
    count, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels, minlength=count)
    return [members[labels == c] for c in np.flatnonzero(sizes > 1)]


def _links(searcher: Searcher, vectors: Any, ids: npt.NDArray[np.int64], threshold: float,
           chunk: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(row, row) pairs of items more similar than ``threshold``, by position in ``ids``."""
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
    return src_all[keep].astype(np.int64), dst_all[keep]


def _same_file_links(keys: Sequence[str | None]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Pairs linking each file to the first file of identical content."""
    first: dict[str, int] = {}
    src, dst = [], []
    for p, key in enumerate(keys):
        if key is None:
            continue
        if key in first:
            src.append(p)
            dst.append(first[key])
        else:
            first[key] = p
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
