"""Which images to label next: coverage while labels are few, then uncertainty with diversity.

While the classes have fewer than five labels each (on average over the classes seen so far), the
suggestions are k-means centres (:func:`indexer.fewlabel.suggest_to_label`: one typical image per
region, regions without a label first). A classifier trained on a few labels per class is too unsure
everywhere for its uncertainty to mean much (measured: :data:`COVERAGE_LABELS_PER_CLASS`), and the
literature on tiny budgets finds the same (Hacohen et al. 2022, "Active learning on a budget":
typical, covering picks win there; uncertainty sampling loses to random). From five labels per class
on, a classifier trained on the labels so far scores every unlabelled image; the ones it is least
sure of (smallest margin between its two likeliest classes) are where a label teaches it most, but
the least sure images of a collection are often near-copies of one confusing kind, so the
suggestions are spread over them: k-means over the uncertain candidates, the most uncertain image of
each cluster.

:func:`selection_curve` replays labelling rounds on a labelled collection (each round labels one
image per class on average, as a person would) to compare random picks, k-means picks and this
selection: accuracy on the images not labelled, after each round, over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from indexer.analysis import Classifier, accuracy, as_features, as_labels, class_scores, l2_normalize
from indexer.fewlabel import suggest_to_label

__all__ = [
    "COVERAGE_LABELS_PER_CLASS", "STRATEGIES", "RoundResult", "active_suggestions", "margins", "next_picks",
    "selection_curve", "suggestion_phase",
]

STRATEGIES = ("random", "kmeans", "active")

CANDIDATES_PER_PICK = 5
"""Uncertain candidates per suggestion: the n picks are spread over the 5n least certain images
(fewer candidates: near-copies of one confusion; many more: certainty stops mattering)."""

COVERAGE_LABELS_PER_CLASS = 5.0
"""Labels per labelled class below which suggestions cover the space (k-means centres) instead of
following the classifier's uncertainty. The margin only weighs the classes labelled so far, so
it cannot point at a class nobody has labelled yet; k-means centres of the regions without a
label can (a second round with all labels in one region goes to the others). And with only a
few labels per class the classifier's margins are mostly noise. Measured with
bench/active_labelling.py (weighted kNN on the unlabelled images, 5 seeds), accuracy at 5 and 10
labels per class when uncertainty takes over from 2 labels per class / from 5 / never (k-means
throughout): CIFAR-10 test set, model trained by the project, 0.249 / 0.273 / 0.273 and 0.276 /
0.298 / 0.303; flowers, trained model, 0.387 / 0.374 / 0.374 and 0.430 / 0.428 / 0.423; flowers,
random network, 0.236 / 0.252 / 0.252 and 0.290 / 0.297 / 0.279. From 2 it lost up to 2.7 points
to k-means on CIFAR-10; from 5 it is never worse beyond the spread over seeds (1-3 points) and
best or level at 10 labels per class (Hacohen et al. 2022: uncertainty pays only once the
budget is no longer tiny)."""

IntArray = npt.NDArray[np.int64]


def margins(scores: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Top-1 minus top-2 class score of each row (0: undecided, 1: certain)."""
    if scores.shape[1] < 2:
        return np.ones(scores.shape[0], dtype=np.float32)
    top2 = np.partition(scores, -2, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]).astype(np.float32)


def suggestion_phase(classes: npt.ArrayLike) -> str:
    """``"coverage"`` or ``"uncertainty"``: how :func:`active_suggestions` chooses, given the class
    of every row labelled so far. Coverage while fewer than two classes are labelled (there is no
    margin to measure) or while the labelled classes hold fewer than
    :data:`COVERAGE_LABELS_PER_CLASS` labels each on average."""
    y = np.asarray(classes, dtype=np.int64).ravel()
    seen = np.unique(y).size
    if seen < 2 or y.size / seen < COVERAGE_LABELS_PER_CLASS:
        return "coverage"
    return "uncertainty"


def active_suggestions(vectors: npt.ArrayLike, labelled: npt.ArrayLike, classes: npt.ArrayLike, n: int, *,
                       seed: int = 0, classifier: Classifier = "knn", knn_k: int = 200,
                       knn_t: float = 0.1) -> IntArray:
    """``n`` unlabelled rows to label next, given the rows labelled so far and their classes.

    In the coverage phase (:func:`suggestion_phase`) k-means centres of the regions with the
    fewest labels; after it the classifier's least certain rows, spread over the space."""
    from sklearn.cluster import KMeans

    x = l2_normalize(as_features(vectors, "vectors"))
    labelled = np.asarray(labelled, dtype=np.int64)
    y = as_labels(classes, labelled.size, "classes")
    free = np.ones(x.shape[0], dtype=bool)
    free[labelled] = False
    n = min(int(n), int(free.sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if suggestion_phase(y) == "coverage":
        return suggest_to_label(x, n, exclude=labelled, seed=seed)
    pool = np.flatnonzero(free)
    scores = class_scores(x[labelled], y, x[pool], method=classifier, num_classes=int(y.max()) + 1, seed=seed,
                          knn_k=knn_k, knn_t=knn_t)
    margin = margins(scores)
    candidates = pool[np.argsort(margin, kind="stable")[:CANDIDATES_PER_PICK * n]]
    candidate_margin = np.sort(margin, kind="stable")[:CANDIDATES_PER_PICK * n]
    if candidates.size <= n:
        return candidates
    clusters = KMeans(n_clusters=n, n_init=1, random_state=seed).fit_predict(x[candidates])
    picks = [candidates[clusters == c][np.argmin(candidate_margin[clusters == c])] for c in range(n)
             if np.any(clusters == c)]
    return np.asarray(picks, dtype=np.int64)


def next_picks(strategy: str, vectors: npt.NDArray[np.float32], truth: IntArray, labelled: IntArray, n: int, *,
               rng: np.random.Generator, seed: int, classifier: Classifier = "knn") -> IntArray:
    """One labelling round of ``strategy``: the ``n`` rows a person is asked to label next."""
    free = np.setdiff1d(np.arange(len(truth)), labelled)
    if strategy == "random":
        return rng.choice(free, size=min(n, free.size), replace=False).astype(np.int64)
    if strategy == "kmeans" or labelled.size == 0:  # the first round of "active" too
        return suggest_to_label(vectors, n, exclude=labelled, seed=seed)
    if strategy == "active":
        return active_suggestions(vectors, labelled, truth[labelled], n, seed=seed, classifier=classifier)
    raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class RoundResult:
    """Accuracy on the unlabelled rows after ``labels_per_class`` rounds of one strategy: mean and
    standard deviation over seeds."""

    strategy: str
    labels_per_class: int
    mean: float
    std: float


def selection_curve(vectors: npt.ArrayLike, truth: npt.ArrayLike, *, rounds: Sequence[int] = (1, 2, 5, 10),
                    strategies: Sequence[str] = STRATEGIES, seeds: Sequence[int] = (0, 1, 2),
                    classifier: Classifier = "knn") -> list[RoundResult]:
    """Replay labelling rounds of C images each (C classes) for every strategy and seed; report
    the accuracy of ``classifier`` on the images never labelled at each round in ``rounds``."""
    x = l2_normalize(as_features(vectors, "vectors"))
    y = as_labels(truth, x.shape[0], "truth")
    num_classes = int(y.max()) + 1
    results: list[RoundResult] = []
    for strategy in strategies:
        by_round: dict[int, list[float]] = {r: [] for r in rounds}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            labelled = np.zeros(0, dtype=np.int64)
            for done in range(1, max(rounds) + 1):
                picks = next_picks(strategy, x, y, labelled, num_classes, rng=rng, seed=seed + 1000 * done,
                                   classifier=classifier)
                labelled = np.concatenate([labelled, picks])
                if done in by_round:
                    rest = np.setdiff1d(np.arange(len(y)), labelled)
                    if np.unique(y[labelled]).size < 2:  # one class seen: everything is called that class
                        predicted = np.full(rest.size, y[labelled][0])
                    else:
                        predicted = class_scores(x[labelled], y[labelled], x[rest], method=classifier,
                                                 num_classes=num_classes, seed=seed).argmax(axis=1)
                    by_round[done].append(accuracy(predicted, y[rest]) if rest.size else 1.0)
        for r in rounds:
            values = np.asarray(by_round[r], dtype=np.float64)
            results.append(RoundResult(strategy, r, float(values.mean()), float(values.std())))
    return results
