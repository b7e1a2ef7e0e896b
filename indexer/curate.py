"""`python -m indexer curate`: compute a collection's curation scores, keep them, report them.

:mod:`indexer.curation` computes from the vectors, :mod:`indexer.curation_store` keeps the
result in the collection; this module joins them to a :class:`~indexer.collection.Collection`
(its labels, its index, its duplicate groups) and says the result as the JSON the command and
the app's Curate page share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from indexer import curation, curation_store
from indexer.collection import Collection

__all__ = ["LABEL_SOURCES", "curate", "label_array", "report", "stored"]

LABEL_SOURCES = ("auto", "folder", "user")
REPRESENTATIVES_PER_CLUSTER = 5


def label_array(collection: Collection, source: str) -> tuple[np.ndarray, list[str], str]:
    """(label index per live item, -1 where unlabelled; the label names; the source used).

    "folder": the first-level folder names; "user": labels people set in the app; "auto": the
    folder labels when there are any, else the people's."""
    items = collection.items
    user = collection.user_labels() if source in ("auto", "user") else {}
    folder_labels = [it.label for it in items]
    if source == "auto":
        source = "folder" if any(folder_labels) else "user"
    given = folder_labels if source == "folder" else [user.get(it.path) for it in items]
    names = sorted({g for g in given if g})
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup.get(g, -1) if g else -1 for g in given], dtype=np.int64), names, source


def curate(collection: Collection, *, labels: str = "auto", seed: int = 0, show_progress: bool = True,
           save: bool = True) -> curation.CurationScores:
    """Every score for the collection's current generation (one k-NN search of all items through
    its index), stored in the collection unless ``save`` is False."""
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_SOURCES)}, not {labels!r}")
    ids = collection.ids
    vectors = collection.vectors
    with tqdm(total=len(ids), desc="neighbours", unit="item", disable=not show_progress, dynamic_ncols=True) as bar:
        neighbours = curation.nearest_neighbours(collection.searcher.search, vectors, ids, progress=bar.update)
    label_index, names, source = label_array(collection, labels)
    probabilities = curation.knn_class_probabilities(neighbours, label_index, max(1, len(names)))
    issues, note = curation.find_label_issues(probabilities, label_index, names) if names else \
        ([], f"no {source} labels: label issues need labelled items")
    classes = len({int(c) for c in label_index if c >= 0})
    cluster, representative = curation.representativeness(
        vectors, curation.default_clusters(len(ids), classes), seed=seed)
    scores = curation.CurationScores(
        generation=collection.generation, ids=np.asarray(ids, dtype=np.int64),
        outlier=curation.outlier_scores(neighbours), cluster=cluster, representative=representative,
        label_source=source, label_issues=issues, duplicate_groups=collection.duplicates(), note=note)
    if save:
        curation_store.save(collection.directory, scores)
    return scores


def stored(collection: Collection) -> curation.CurationScores | None:
    """The scores kept for the collection's current generation, or None (then :func:`curate`)."""
    return curation_store.load(collection.directory, collection.generation, collection.ids)


def report(collection: Collection, scores: curation.CurationScores, *, top: int = 100) -> dict[str, Any]:
    """The one JSON object of ``curate --json`` (paths relative to the image root): label issues,
    most likely mistakes first; duplicate groups, exact copies (same content) marked; the ``top``
    outliers, most unusual first; the most representative images of each cluster."""
    items = collection.items
    by_id = {it.id: it for it in items}
    path = [it.path for it in items]
    issues = [{"id": int(scores.ids[i.position]), "path": path[i.position], "label": i.given,
               "suggested": i.suggested, "confidence": round(i.confidence, 4)} for i in scores.label_issues]
    groups = []
    for group in scores.duplicate_groups:
        hashes = [by_id[i].sha256 if i in by_id else None for i in group]
        groups.append([{"id": int(i), "path": by_id[i].path if i in by_id else None,
                        "exact": h is not None and hashes.count(h) > 1} for i, h in zip(group, hashes)])
    unusual = np.argsort(-scores.outlier, kind="stable")[:max(0, top)]
    outliers = [{"id": int(scores.ids[p]), "path": path[p], "score": round(float(scores.outlier[p]), 4)}
                for p in unusual]
    representative = []
    for c in np.unique(scores.cluster):
        members = np.flatnonzero(scores.cluster == c)
        best = members[np.argsort(-scores.representative[members], kind="stable")[:REPRESENTATIVES_PER_CLUSTER]]
        representative += [{"id": int(scores.ids[p]), "path": path[p], "cluster": int(c),
                            "score": round(float(scores.representative[p]), 4)} for p in best]
    out: dict[str, Any] = {"label_issues": issues, "duplicate_groups": groups, "outliers": outliers,
                           "representative": representative}
    out["generation"], out["label_source"] = scores.generation, scores.label_source
    if scores.note:
        out["note"] = scores.note
    return out
