"""What a similarity means in this collection: its neighbour-similarity distribution.

A raw cosine says little on its own: a weak model puts every pair at 0.95-0.99, a good one
spreads them from 0.3 to 1. What does mean something is where a score stands among the
collection's own neighbour similarities. At every build or update the writer samples up to
:data:`SAMPLE` items, finds each one's nearest neighbour and its :data:`K`-th (itself left out,
and so are neighbours with the very same embedding: exact copies would otherwise pull the
"typical" neighbour up to 1.0) and stores percentiles of both in the manifest
(``neighbour_stats``). Readers turn a score into:

* ``closeness``: the share of items whose nearest neighbour is less similar than this score
  (0: weaker than every item's nearest neighbour, 1: closer than all of them);
* words a person understands (:meth:`NeighbourStats.describe`);
* the near-duplicate threshold's scale (:meth:`NeighbourStats.typical_distance`, used by
  :mod:`indexer.dupes`).

Only numpy: the search is passed in as a function, so this module knows nothing of FAISS.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["IDENTICAL", "K", "LEVELS", "SAMPLE", "NeighbourStats", "measure"]

SAMPLE = 2000
"""Items sampled per measurement: percentiles to about +-1 point, a fraction of a second to search."""

K = 10
"""The second neighbour measured: the K-th nearest, what an ordinary (not the best) match looks like."""

LEVELS = 101
"""Percentiles stored: 0, 1, ..., 100."""

IDENTICAL = 1.0 - 1e-6
"""Cosine at or above which two embeddings are the same one (an exact copy of a picture)."""

VERSION = 1

Search = Callable[[npt.NDArray[np.float32], int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class NeighbourStats:
    """Percentiles (0..100) of the nearest and the K-th neighbour's cosine similarity."""

    sample: int  # items measured
    nearest: tuple[float, ...]  # LEVELS ascending values
    kth: tuple[float, ...]  # LEVELS ascending values (the k-th neighbour's similarity)
    k: int = K

    # -- reading a score -----------------------------------------------------------------------

    def closeness(self, score: float) -> float:
        """The share (0..1) of items whose nearest neighbour is less similar than ``score``,
        interpolated between the stored percentiles."""
        return _share_below(self.nearest, score)

    def typical_nearest(self) -> float:
        """The median nearest-neighbour similarity."""
        return self.nearest[LEVELS // 2]

    def typical_kth(self) -> float:
        """The median similarity of the K-th neighbour."""
        return self.kth[LEVELS // 2]

    def typical_distance(self) -> float:
        """The median nearest-neighbour cosine distance (1 - similarity): the model's scale."""
        return max(0.0, 1.0 - self.typical_nearest())

    def describe(self, score: float) -> str:
        """A few words saying how good a match of this similarity is in this collection."""
        if score >= IDENTICAL:
            return "identical embedding"
        share = self.closeness(score)
        if share >= 0.5:
            return f"closer than {min(99, math.floor(100 * share))}% of nearest neighbours"
        if score >= self.typical_kth():
            return "a typical neighbour"
        return "weaker than most neighbours"

    # -- the manifest entry --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "sample": self.sample, "k": self.k,
                "nearest": [round(v, 6) for v in self.nearest], "kth": [round(v, 6) for v in self.kth]}

    @classmethod
    def from_json(cls, entry: Any) -> NeighbourStats:
        """The manifest entry back; ValueError naming the field when it is not one this code wrote."""
        problem = check_entry(entry)
        if problem:
            raise ValueError(problem)
        return cls(int(entry["sample"]), tuple(map(float, entry["nearest"])), tuple(map(float, entry["kth"])),
                   int(entry["k"]))


def check_entry(entry: Any) -> str | None:
    """What is wrong with a manifest's ``neighbour_stats`` entry (None when nothing): the store's
    manifest validation calls this, so a damaged entry is refused with the others."""
    if not isinstance(entry, dict):
        return "'neighbour_stats' must be an object"
    if entry.get("version") != VERSION:
        return f"'neighbour_stats.version' must be {VERSION}"
    for key in ("sample", "k"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"'neighbour_stats.{key}' must be a positive integer"
    for key in ("nearest", "kth"):
        values = entry.get(key)
        if not (isinstance(values, list) and len(values) == LEVELS
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and -1.01 <= v <= 1.01
                        for v in values)
                and all(a <= b for a, b in zip(values, values[1:]))):
            return f"'neighbour_stats.{key}' must be {LEVELS} ascending similarities"
    return None


def measure(search: Search, vectors: Any, ids: npt.NDArray[np.int64], *, sample: int = SAMPLE,
            seed: int = 0) -> NeighbourStats | None:
    """Measure the distribution on up to ``sample`` items (a fixed random choice).

    ``search(queries, k)`` answers (similarities, ids) like :meth:`indexer.ann.Searcher.search`;
    ``vectors[positions]`` gives rows in the order of ``ids``. None when too few items have a
    neighbour other than themselves and their exact copies to say anything.
    """
    n = len(ids)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    ids = np.asarray(ids, dtype=np.int64)
    k = min(K, n - 1)
    nearest, kth = [], []
    for start in range(0, len(positions), 512):
        pos = positions[start:start + 512]
        q = np.ascontiguousarray(vectors[pos], dtype=np.float32)
        # Room for the item itself and a few exact copies of it before the k neighbours.
        sims, found = search(q, min(n, k + 8))
        for row_sims, row_ids, own in zip(sims, found, ids[pos]):
            keep = (row_ids >= 0) & (row_ids != own) & (row_sims < IDENTICAL)
            others = row_sims[keep]
            if len(others):
                nearest.append(float(others[0]))
            if len(others) >= k:
                kth.append(float(others[k - 1]))
    if len(nearest) < 2 or not kth:
        return None
    levels = np.linspace(0, 100, LEVELS)
    return NeighbourStats(len(nearest), tuple(np.percentile(nearest, levels).tolist()),
                          tuple(np.percentile(kth, levels).tolist()), k)


@functools.lru_cache(maxsize=64)
def _interpolation(percentiles: tuple[float, ...]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The distinct values of ``percentiles`` and the highest level (0..1) of each: worked out once
    per distribution, not once per hit (per hit it was a fifth of a served vector query's CPU)."""
    values = np.asarray(percentiles, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, len(values))
    # np.interp needs distinct x: keep the highest level of each repeated value.
    distinct, last = np.unique(values[::-1], return_index=True)
    top = levels[::-1][last]
    distinct.flags.writeable = top.flags.writeable = False  # shared by every caller
    return distinct, top


def _share_below(percentiles: tuple[float, ...], score: float) -> float:
    """Where ``score`` falls in a distribution given by its percentiles (0..1); ties count as
    below, so a score equal to a plateau of values is placed at the plateau's top."""
    if not math.isfinite(score):
        return 0.0
    distinct, top = _interpolation(tuple(percentiles))
    return min(1.0, max(0.0, float(np.interp(score, distinct, top, left=0.0, right=1.0))))
