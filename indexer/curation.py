"""Curation scores from a collection's own embeddings: label issues, outliers, representatives.

Everything comes from one k-nearest-neighbour search of every item through the collection's
FAISS index (never an N x N matrix), so the cost grows with N x k searches and stays within a
minute or two for 100,000 items on two cores:

- *label issues*: each labelled item's class probabilities from the labels of its nearest
  neighbours, the item itself left out (leave-one-out, so they are out of sample like a
  cross-validated classifier's), handed to cleanlab's confident learning
  (:func:`cleanlab.filter.find_label_issues`), the well-kept implementation of that method;
- *outliers*: how far an item is from its k-th nearest neighbour (a k-NN density estimate:
  an item whose neighbourhood is empty is unusual);
- *representatives*: k-means clusters over the same vectors and how close each item lies to its
  cluster's centre (the most central images show what a cluster is).

Near-duplicate groups are :meth:`indexer.collection.Collection.duplicates`. This module only
computes; :mod:`indexer.curation_store` keeps the results in the collection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from indexer.analysis import kmeans_labels, l2_normalize

__all__ = [
    "CurationScores",
    "LabelIssue",
    "Neighbours",
    "find_label_issues",
    "knn_class_probabilities",
    "nearest_neighbours",
    "outlier_scores",
    "representativeness",
]

NEIGHBOURS = 30
"""k of the neighbour search, and the neighbours whose labels vote on an item's label. More votes
make a clean item's probabilities steadier, so confident learning's per-class thresholds (the
mean confidence of each class) separate the mislabelled items better: on 8 synthetic sets with
5% of the labels moved (tests/indexer/test_curation.py's generator), 10 votes found 81% of the
moved items, 20 found 88%, 30 found 94% and 50 found 96%, none flagging a clean item. 30 keeps
the search cheap."""

OUTLIER_K = 10
"""The neighbour whose distance scores an outlier (the 10th: a common choice for k-NN density
estimates; a pair of near-copies far from everything else still scores as unusual)."""

VOTE_TEMPERATURE = 0.1
"""Temperature of the similarity weights exp(sim / T) of the neighbours' votes, the same as the
weighted kNN classifier in :mod:`indexer.analysis`."""

PRIOR_SHARE = 0.02
"""Share of each item's probabilities spread over the classes by their frequency: no class gets
probability 0 (cleanlab needs none), and an item whose neighbours are all unlabelled gets the
class prior. Kept small so that a clear neighbourhood stays confident."""

MIN_LABELLED = 10
MIN_PER_CLASS = 2
"""Fewer labelled items, or a class with fewer members, gives confident learning nothing to
estimate its noise rates from: label issues are then not searched (and the reason is said)."""

SEARCH_CHUNK = 4096


@dataclass(frozen=True)
class Neighbours:
    """Each item's nearest neighbours, itself left out: positions (rows of the collection's
    vectors, -1 where fewer exist) and cosine similarities, best first."""

    positions: npt.NDArray[np.int64]
    similarities: npt.NDArray[np.float32]


def nearest_neighbours(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                       vectors: npt.ArrayLike, ids: npt.ArrayLike, k: int = NEIGHBOURS, *,
                       progress: Callable[[int], None] | None = None) -> Neighbours:
    """k nearest neighbours of every row through ``search`` (the index's ``search(q, k)`` giving
    (similarities, ids)), in chunks; ``progress(n)`` is called with the rows done per chunk."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    k = max(1, min(int(k), n - 1)) if n > 1 else 1
    order = np.argsort(ids)
    positions = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    data = vectors if hasattr(vectors, "shape") else np.asarray(vectors, dtype=np.float32)
    for start in range(0, n, SEARCH_CHUNK):
        q = np.ascontiguousarray(data[start:start + SEARCH_CHUNK], dtype=np.float32)
        found_sims, found_ids = search(q, min(k + 1, n))
        for row in range(len(q)):
            me = ids[start + row]
            keep = (found_ids[row] != me) & (found_ids[row] >= 0)
            hit_ids, hit_sims = found_ids[row][keep][:k], found_sims[row][keep][:k]
            where = np.searchsorted(ids, hit_ids, sorter=order)
            where = order[np.minimum(where, n - 1)]
            valid = ids[where] == hit_ids
            m = int(valid.sum())
            positions[start + row, :m] = where[valid]
            sims[start + row, :m] = hit_sims[valid]
        if progress is not None:
            progress(len(q))
    return Neighbours(positions, sims)


def knn_class_probabilities(neighbours: Neighbours, labels: npt.ArrayLike, num_classes: int, *,
                            temperature: float = VOTE_TEMPERATURE,
                            prior_share: float = PRIOR_SHARE) -> npt.NDArray[np.float64]:
    """Out-of-sample class probabilities (N x C) from the labelled neighbours' weighted votes;
    ``labels`` holds 0..C-1, or -1 for unlabelled items (which do not vote)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    prior = counts / counts.sum() if counts.sum() else np.full(num_classes, 1.0 / num_classes)
    votes = np.zeros((len(labels), num_classes))
    positions, sims = neighbours.positions, neighbours.similarities
    for j in range(positions.shape[1]):
        pos = positions[:, j]
        voter = np.where(pos >= 0, labels[np.maximum(pos, 0)], -1)
        has = voter >= 0
        weight = np.exp((sims[has, j].astype(np.float64) - 1.0) / temperature)  # shifted: no overflow
        np.add.at(votes, (np.flatnonzero(has), voter[has]), weight)
    total = votes.sum(axis=1, keepdims=True)
    share = np.divide(votes, total, out=np.tile(prior, (len(labels), 1)), where=total > 0)
    return (1.0 - prior_share) * share + prior_share * prior


@dataclass(frozen=True)
class LabelIssue:
    """A labelled item whose neighbours say it belongs elsewhere."""

    position: int  # row in the collection's vectors
    given: str
    suggested: str
    confidence: float  # the neighbours' probability of the suggested label
    quality: float  # cleanlab's label quality score of the given label (low: likely wrong)


def find_label_issues(probabilities: npt.NDArray[np.float64], labels: npt.ArrayLike,
                      class_names: Sequence[str]) -> tuple[list[LabelIssue], str]:
    """cleanlab's confident learning over the labelled rows: (issues, most likely mistakes
    first; a note, empty unless the search could not run and why)."""
    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    rows = np.flatnonzero(labels >= 0)
    present = np.unique(labels[rows])
    if len(rows) < MIN_LABELLED or len(present) < 2:
        return [], (f"label issues need at least {MIN_LABELLED} labelled items in two classes or more "
                    f"({len(rows)} labelled, {len(present)} classes)")
    small = [class_names[c] for c in present if np.sum(labels[rows] == c) < MIN_PER_CLASS]
    if small:
        return [], f"label issues need at least {MIN_PER_CLASS} items per label; too few: {', '.join(small[:5])}"
    # cleanlab wants labels 0..C'-1 over the classes present, and their probability columns.
    given = np.searchsorted(present, labels[rows])
    probs = probabilities[rows][:, present]
    probs = probs / probs.sum(axis=1, keepdims=True)
    ranked = cleanlab_find(labels=given, pred_probs=probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    issues = []
    for r in np.asarray(ranked, dtype=np.int64):
        best = int(np.argmax(probs[r]))
        if best == given[r]:
            continue  # flagged by the per-class noise estimate, yet its own label is still the likeliest
        issues.append(LabelIssue(position=int(rows[r]), given=class_names[present[given[r]]],
                                 suggested=class_names[present[best]], confidence=float(probs[r, best]),
                                 quality=float(quality[r])))
    return issues, ""


def outlier_scores(neighbours: Neighbours, k: int = OUTLIER_K) -> npt.NDArray[np.float32]:
    """Cosine distance to the k-th nearest neighbour (0: in a crowd; up to 2: alone); the last
    one found where fewer than k exist."""
    sims = neighbours.similarities[:, :max(1, k)]
    kth = np.where(np.isfinite(sims), sims, -1.0).min(axis=1) if sims.size else np.zeros(0)
    return (1.0 - kth).astype(np.float32)


def default_clusters(n: int, labelled_classes: int) -> int:
    """k of the k-means for representatives: the number of label classes when there are some,
    else about sqrt(n / 2) (a usual rule of thumb), at most 50 so each gallery stays browsable."""
    if labelled_classes >= 2:
        return min(labelled_classes, n)
    return max(1, min(50, round(math.sqrt(n / 2))))


def representativeness(vectors: npt.ArrayLike, clusters: int, *, seed: int = 0,
                       chunk: int = 65_536) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(cluster of each row, cosine similarity to its cluster's centre): high means typical."""
    data = vectors if hasattr(vectors, "shape") else np.asarray(vectors, dtype=np.float32)
    assigned = kmeans_labels(data, clusters, seed=seed, chunk=chunk)
    k = int(assigned.max()) + 1 if len(assigned) else 0
    sums = np.zeros((k, data.shape[1]), dtype=np.float64)
    for start in range(0, len(assigned), chunk):
        np.add.at(sums, assigned[start:start + chunk], np.asarray(data[start:start + chunk], dtype=np.float64))
    centres = l2_normalize(sums.astype(np.float32))
    score = np.empty(len(assigned), dtype=np.float32)
    for start in range(0, len(assigned), chunk):
        block = np.asarray(data[start:start + chunk], dtype=np.float32)
        score[start:start + chunk] = np.einsum("ij,ij->i", block, centres[assigned[start:start + chunk]])
    return assigned, score


@dataclass
class CurationScores:
    """Per-item scores of one generation (rows in the collection's id order) and the lists made
    from them. ``label_source`` is "folder" or "user"; ``note`` says why label issues are missing."""

    generation: int
    ids: npt.NDArray[np.int64]
    outlier: npt.NDArray[np.float32]
    cluster: npt.NDArray[np.int64]
    representative: npt.NDArray[np.float32]
    label_source: str
    label_issues: list[LabelIssue] = field(default_factory=list)
    duplicate_groups: list[list[int]] = field(default_factory=list)  # item ids, largest group first
    note: str = ""
