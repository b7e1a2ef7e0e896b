"""The few-label workflow: "if I label only a few images, how well are the others sorted, and
which images should I label next?".

Label budgets, per-seed runs that keep every prediction (for a confusion matrix and a list of
mistakes), accuracy-versus-labels curves, predictions with confidences from a person's labels,
and suggestions of images worth labelling. It is used by the app's Few-label page and built on
the classifiers of :mod:`indexer.analysis` (the same code as ``moco eval`` and ``indexer eval``,
so the page and the command line agree); this module imports analysis, never the reverse, and
like it needs nothing heavier than numpy and scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from indexer.analysis import (
    CLASSIFIERS,
    Classifier,
    accuracy,
    as_features,
    as_labels,
    class_scores,
    l2_normalize,
    sample_few_labels,
    subset_scores,
)

__all__ = [
    "CurvePoint",
    "FewLabelRun",
    "LabelBudget",
    "accuracy_curve",
    "classify_with_confidence",
    "confusion_matrix",
    "few_label_predictions",
    "has_label",
    "per_class_accuracy",
    "suggest_to_label",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

SUGGEST_RESTARTS = 10
"""k-means starts behind :func:`suggest_to_label` (the lowest-inertia one is kept)."""
SUGGEST_FIT_ROWS = 4_000
"""Rows the suggestion k-means is fitted on (a seeded sample of larger collections; every row is
then assigned): ten starts on 4,000 rows take seconds, where one start on 20,000 took as long."""


def has_label(value: object) -> bool:
    """A real label: a non-empty string. Files directly in the image root have none, which shows
    up as None from the collection, NaN once pandas has held the column, or "" from a CSV; all of
    them mean "unlabelled", and every page must agree on that."""
    return isinstance(value, str) and value != ""


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelBudget:
    """How many labels a few-label run may use: ``per_class`` images of every class, or a
    ``fraction`` of each class (see :func:`sample_few_labels`). Hashable, so a budget can key a
    cache and name a point of an accuracy curve."""

    per_class: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.per_class is None) == (self.fraction is None):
            raise ValueError("give exactly one of per_class= or fraction=")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    @property
    def name(self) -> str:
        if self.per_class is not None:
            return f"{self.per_class} per class"
        return f"{self.fraction * 100:g}%"  # type: ignore[operator]

    def sample(self, labels: npt.ArrayLike, seed: int) -> IntArray:
        return sample_few_labels(labels, fraction=self.fraction, per_class=self.per_class, seed=seed)


# --------------------------------------------------------------------------------------------
# Per-seed runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewLabelRun:
    """One seed of a few-label evaluation: which rows were labelled, and what became of the rest.

    ``train`` indexes the pool of labelled candidates; ``test`` indexes the held-out test set
    when one was given, else the pool rows left unlabelled. ``truth``, ``pred`` and
    ``confidence`` are aligned with ``test``, so a page can draw the confusion matrix and show
    the mistakes without recomputing anything.
    """

    seed: int
    train: IntArray
    test: IntArray
    truth: IntArray
    pred: IntArray
    confidence: FloatArray

    @property
    def accuracy(self) -> float:
        """Top-1 of this seed on its test rows (:func:`indexer.analysis.accuracy`)."""
        return accuracy(self.pred, self.truth)


def few_label_predictions(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    *,
    budget: LabelBudget,
    seeds: Sequence[int] = (0, 1, 2),
    classifier: Classifier = "logreg",
    test_feats: npt.ArrayLike | None = None,
    test_labels: npt.ArrayLike | None = None,
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> list[FewLabelRun]:
    """Per seed: label a stratified ``budget`` of the training rows, classify, keep the predictions.

    Without a test set the remaining (unlabelled) training rows are the test set: the question
    a person with a folder of images asks is "if I label this many, how well are the others
    sorted?". Each seed draws a different subset; the spread shows how much the answer depends
    on which few images happened to be labelled.
    """
    x_train = as_features(train_feats, "train_feats")
    y_train = as_labels(train_labels, x_train.shape[0], "train_labels")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; use logreg, knn or label_propagation")
    if len(seeds) == 0:
        raise ValueError("give at least one seed")
    if (test_feats is None) != (test_labels is None):
        raise ValueError("give both test_feats and test_labels, or neither")
    x_test = None if test_feats is None else as_features(test_feats, "test_feats")
    y_test = None if x_test is None else as_labels(test_labels, x_test.shape[0], "test_labels")
    n_classes = int(max(y_train.max(initial=0), 0 if y_test is None else y_test.max(initial=0))) + 1
    runs: list[FewLabelRun] = []
    for seed in map(int, seeds):
        train = budget.sample(y_train, seed)
        test = np.setdiff1d(np.arange(x_train.shape[0]), train) if x_test is None else np.arange(x_test.shape[0])
        truth = y_train[test] if y_test is None else y_test
        if test.size == 0:
            raise ValueError(f"{budget.name} labels every image: nothing is left to test on")
        scores = subset_scores(x_train, y_train, train, x_test, classifier=classifier, num_classes=n_classes,
                               seed=seed, knn_k=knn_k, knn_t=knn_t)
        pred = scores.argmax(axis=1).astype(np.int64)
        runs.append(FewLabelRun(seed, train, test, truth, pred, scores[np.arange(pred.size), pred]))
    return runs


# --------------------------------------------------------------------------------------------
# Curves and confusion matrices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurvePoint:
    """Accuracy of one classifier at one label budget: mean and std over seeds, and the mean
    number of images that were labelled (the x of the curve, comparable across budgets)."""

    classifier: str
    budget: LabelBudget
    labelled: float
    mean: float
    std: float


def accuracy_curve(
    feats: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    budgets: Sequence[LabelBudget],
    classifiers: Sequence[Classifier] = ("knn",),
    seeds: Sequence[int] = (0, 1, 2),
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> list[CurvePoint]:
    """Accuracy on the unlabelled rows versus the number of labels, for each classifier.

    Answers "how many images must I label before the rest sort themselves?"; budgets that would
    label every image (nothing left to test) are left out rather than failing the whole curve.
    """
    x = as_features(feats, "feats")
    y = as_labels(labels, x.shape[0], "labels")
    points: list[CurvePoint] = []
    for classifier in classifiers:
        for budget in budgets:
            if budget.sample(y, 0).size >= y.size:
                continue
            runs = few_label_predictions(x, y, budget=budget, seeds=seeds, classifier=classifier,
                                         knn_k=knn_k, knn_t=knn_t)
            accuracies = [run.accuracy for run in runs]
            labelled = float(np.mean([run.train.size for run in runs]))
            points.append(CurvePoint(classifier, budget, labelled, float(np.mean(accuracies)),
                                     float(np.std(accuracies))))
    return points


def confusion_matrix(truth: npt.ArrayLike, pred: npt.ArrayLike, num_classes: int) -> IntArray:
    """Counts (true class x predicted class); pooling runs is a sum of their matrices."""
    t = as_labels(truth, np.asarray(truth).shape[0], "truth")
    p = as_labels(pred, t.size, "pred")
    if t.size and max(int(t.max()), int(p.max())) >= num_classes:
        raise ValueError(f"class ids must be below num_classes={num_classes}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Recall of every class (diagonal over row sums); NaN for a class with no test images,
    which is "unknown", not "0% right"."""
    cm = np.asarray(confusion, dtype=np.float64)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


# --------------------------------------------------------------------------------------------
# Labelling by hand: predictions with confidences, and which images to label next
# --------------------------------------------------------------------------------------------


def classify_with_confidence(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    all_feats: npt.ArrayLike,
    method: Classifier = "knn",
    *,
    num_classes: int | None = None,
    seed: int = 0,
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> tuple[IntArray, FloatArray]:
    """Predicted class and its score (in [0, 1]) for every row of ``all_feats``.

    The score is the winning class's share of the kNN votes or its logistic probability, so
    sorting or filtering by it puts the predictions a person should check first at the bottom.
    """
    scores = class_scores(
        train_feats, train_labels, all_feats, method=method, num_classes=num_classes, seed=seed,
        knn_k=knn_k, knn_t=knn_t,
    )
    pred = scores.argmax(axis=1).astype(np.int64)
    return pred, np.clip(scores[np.arange(pred.size), pred], 0.0, 1.0).astype(np.float32)


def suggest_to_label(
    vectors: npt.ArrayLike,
    n: int,
    exclude: npt.ArrayLike | Sequence[int] = (),
    seed: int = 0,
) -> IntArray:
    """Rows worth labelling next: one per region of the embedding space, unlabelled regions first.

    k-means with ``n`` clusters plus one per already-labelled row (capped at 8n, so a large
    import cannot make it slow) splits the space finer as labels accumulate; clusters are ranked
    by how many labelled rows they hold (fewest first), then by size, and each of the first ``n``
    gives its nearest unlabelled row. With nothing labelled this is "the image nearest to each
    of n k-means centres": one typical image per region instead of n near-duplicates of the
    commonest kind, so a handful of labels already covers most classes.
    """
    from sklearn.cluster import KMeans

    x = l2_normalize(as_features(vectors, "vectors"))
    taken = np.zeros(x.shape[0], dtype=bool)
    taken[np.asarray(exclude, dtype=np.int64)] = True
    n = min(int(n), int((~taken).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    # k-means is fitted on a sample: the centres of a random few thousand rows of a large
    # collection are as good for choosing a handful of images, and the sample is what lets it
    # take the best of SUGGEST_RESTARTS starts (lower inertia) in seconds. One start left
    # clusters that split one class and merged others; ten raised the accuracy after 1 and 2
    # labels per class by 1-3 points on flowers and a CIFAR-10 subset (BENCHMARKS.md, "Active labelling").
    rng = np.random.default_rng(seed)
    fit = x if x.shape[0] <= SUGGEST_FIT_ROWS else x[rng.choice(x.shape[0], SUGGEST_FIT_ROWS, replace=False)]
    k = min(n + int(taken.sum()), 8 * n, fit.shape[0])
    # float64: sklearn's k-means++ start upcasts float32 distances chunk by chunk, 3x slower.
    km = KMeans(n_clusters=k, n_init=SUGGEST_RESTARTS, random_state=seed).fit(fit.astype(np.float64))
    centres = km.cluster_centers_.astype(np.float32)
    assigned = np.argmin((centres**2).sum(axis=1) - 2.0 * (x @ centres.T), axis=1)  # nearest centre, float32
    size = np.bincount(assigned, minlength=k)
    labelled = np.bincount(assigned[taken], minlength=k)
    order = np.lexsort((-size, labelled))  # last key is primary: fewest labelled, then largest
    chosen: list[int] = []
    for cluster in order[:n]:
        # Rows are unit vectors, so the nearest row to a centre is the one with the largest dot product.
        sims = np.where(taken, -np.inf, x @ centres[cluster])
        best = int(np.argmax(sims))
        chosen.append(best)
        taken[best] = True
    return np.asarray(chosen, dtype=np.int64)
