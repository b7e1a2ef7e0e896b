"""Classifiers over frozen embeddings: weighted kNN, linear probe, label propagation, few-label
evaluation (accuracy, curves, confusion matrices) and the choice of images worth labelling.

One implementation serves ``moco eval``, the kNN monitor during training, ``indexer eval`` and
the app, so a number printed by any of them means the same thing. Everything works on numpy
arrays: features are float32 rows, L2-normalised (the kNN re-normalises defensively), labels
are non-negative integer arrays. Accuracies are fractions in [0, 1].

scikit-learn is imported inside the functions that need it, so the kNN monitor (numpy only)
does not pay the import in every training process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CurvePoint",
    "FewLabelRun",
    "LabelBudget",
    "accuracy_curve",
    "class_scores",
    "classify_with_confidence",
    "confusion_matrix",
    "evaluate_features",
    "few_label_predictions",
    "few_label_top1",
    "knn_top1",
    "l2_normalize",
    "label_propagation_scores",
    "linear_probe_top1",
    "logistic_regression_scores",
    "logistic_regression_top1",
    "per_class_accuracy",
    "sample_few_labels",
    "suggest_to_label",
    "weighted_knn_predict",
    "weighted_knn_scores",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Classifier = Literal["logreg", "knn", "label_propagation"]

# Inverse regularisation strength of the logistic-regression probe, see
# logistic_regression_top1 for why this value.
DEFAULT_C = 0.1
# Enough for lbfgs to converge on standardised 50k x 512 features (typically a few hundred
# iterations, well under a minute on a laptop CPU); the cap only bounds pathological cases.
DEFAULT_MAX_ITER = 1000


def l2_normalize(x: npt.ArrayLike, eps: float = 1e-12) -> FloatArray:
    """Return float32 rows scaled to unit L2 norm (a 1-D input is treated as one vector).

    Cosine similarity is a plain dot product only between unit vectors; all-zero rows stay
    zero instead of becoming NaN.
    """
    arr = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return arr / np.maximum(norms, eps)


def _as_features(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows = samples), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_labels(y: npt.ArrayLike, n: int, name: str) -> IntArray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with {n} entries, got shape {arr.shape}")
    is_int = np.issubdtype(arr.dtype, np.integer)
    if arr.size and not is_int and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{name} must hold integer class ids")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative class ids")
    return arr


# --------------------------------------------------------------------------------------------
# Weighted kNN (InstDisc / MoCo monitor)
# --------------------------------------------------------------------------------------------


def weighted_knn_scores(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    query_feats: npt.ArrayLike,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 256,
) -> FloatArray:
    """Per-class vote matrix (queries x classes) of the weighted kNN, rows summing to 1.

    For each query: cosine similarities to all training rows, the top ``k`` (capped at the
    number of training rows), weights ``exp(sim / temperature)``, summed per class (Wu et al.
    2018, as in the MoCo kNN monitor). Normalised rows double as confidences. Weights are
    computed as ``exp((sim - max_sim) / T)``, which cancels in the normalisation but cannot
    overflow for small temperatures.

    Queries are processed ``chunk`` rows at a time: the float32 similarity block, the copy
    ``argpartition`` sorts and its int64 index array take about 16 bytes * chunk * n_train,
    i.e. ~200 MB for 256 x 50k (a 1024-row chunk would need ~800 MB), instead of gigabytes
    for 10k x 50k at once. Larger chunks are no faster: each block is already a big GEMM.
    """
    train = l2_normalize(_as_features(train_feats, "train_feats"))
    queries = l2_normalize(_as_features(query_feats, "query_feats"))
    labels = _as_labels(train_labels, train.shape[0], "train_labels")
    if train.shape[0] == 0:
        raise ValueError("weighted kNN needs at least one training row")
    if train.shape[1] != queries.shape[1]:
        raise ValueError(f"feature sizes differ: train {train.shape[1]}, query {queries.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if n_classes <= int(labels.max()):
        raise ValueError(f"num_classes={n_classes} but train_labels go up to {int(labels.max())}")
    k = min(k, train.shape[0])

    out = np.zeros((queries.shape[0], n_classes), dtype=np.float32)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk]
        sims = block @ train.T  # (b, n_train) cosine similarities
        if k < train.shape[0]:
            idx = np.argpartition(sims, -k, axis=1)[:, -k:]
            top = np.take_along_axis(sims, idx, axis=1)
        else:
            idx = np.broadcast_to(np.arange(train.shape[0]), sims.shape)
            top = sims
        weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature).astype(np.float64)
        rows = np.repeat(np.arange(block.shape[0]), k)
        flat = rows * n_classes + labels[idx].reshape(-1)
        votes = np.bincount(flat, weights=weights.reshape(-1), minlength=block.shape[0] * n_classes)
        votes = votes.reshape(block.shape[0], n_classes)
        out[start : start + block.shape[0]] = votes / votes.sum(axis=1, keepdims=True)
    return out


def weighted_knn_predict(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    query_feats: npt.ArrayLike,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 256,
) -> IntArray:
    """Predicted class per query row: argmax of :func:`weighted_knn_scores` (ties -> lower id)."""
    scores = weighted_knn_scores(
        train_feats,
        train_labels,
        query_feats,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk=chunk,
    )
    return scores.argmax(axis=1).astype(np.int64)


def knn_top1(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_feats: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 256,
) -> float:
    """Top-1 accuracy (fraction) of the weighted kNN on a labelled test set."""
    truth = np.asarray(test_labels).astype(np.int64)
    pred = weighted_knn_predict(
        train_feats,
        train_labels,
        test_feats,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk=chunk,
    )
    return _accuracy(pred, truth)


def _accuracy(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    pred_arr, truth_arr = np.asarray(pred), np.asarray(truth)
    if pred_arr.shape != truth_arr.shape:
        raise ValueError(f"prediction shape {pred_arr.shape} differs from label shape {truth_arr.shape}")
    if truth_arr.size == 0:
        raise ValueError("cannot compute accuracy on an empty test set")
    return float(np.mean(pred_arr == truth_arr))


# --------------------------------------------------------------------------------------------
# Few-label subsets
# --------------------------------------------------------------------------------------------


def sample_few_labels(
    labels: npt.ArrayLike,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int,
) -> IntArray:
    """Indices (sorted) of a stratified labelled subset: the same share of every class.

    Give exactly one of ``fraction`` (per class ``max(1, round(fraction * count))``) or
    ``per_class`` (capped at the class size). Every class keeps at least one example, so a
    classifier trained on the subset can predict every class. Deterministic for a seed: the
    classes are visited in sorted order with one ``numpy.random.default_rng(seed)``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction= or per_class=")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        if fraction is not None:
            n = max(1, round(fraction * members.size))
        else:
            n = min(int(per_class), members.size)  # type: ignore[arg-type]
        chosen.append(rng.choice(members, size=n, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


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
# Linear probe
# --------------------------------------------------------------------------------------------


def _spread_columns(probs: npt.NDArray[np.floating], present: npt.ArrayLike, num_classes: int) -> FloatArray:
    """Place per-present-class columns (scikit-learn's ``classes_``) at their class ids, so every
    classifier returns the same (rows x num_classes) layout whatever subset of classes it saw."""
    out = np.zeros((probs.shape[0], num_classes), dtype=np.float32)
    out[:, np.asarray(present, dtype=np.int64)] = probs
    return out


def _num_classes(num_classes: int | None, *labels: IntArray) -> int:
    top = max((int(y.max()) for y in labels if y.size), default=0)
    n = top + 1 if num_classes is None else int(num_classes)
    if n <= top:
        raise ValueError(f"num_classes={n} but the labels go up to {top}")
    return n


def logistic_regression_scores(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    query_feats: npt.ArrayLike,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    C: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
) -> FloatArray:
    """Class probabilities (queries x classes) of multinomial logistic regression on standardised
    frozen features; classes absent from the training rows get probability 0.

    StandardScaler first: embeddings are L2-normalised, so raw coordinates are tiny (~1/sqrt(D))
    and a shared C would mean very different regularisation per model; unit variance per
    dimension makes one C meaningful across models and improves lbfgs conditioning.

    ``C=0.1`` (moderately strong L2): scikit-learn's loss is ``0.5 * |w|^2 + C * sum(losses)``,
    so the penalty weakens automatically as the number of labelled samples grows. With 50k
    samples the probe is nearly unregularised, while with 1% labels (a few hundred samples in
    512 dimensions, linearly separable) the default C=1 lets weights grow to fit noise and
    converges slowly. 0.1 is a single value that behaved well at both ends; pass ``C`` to sweep.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = _as_features(train_feats, "train_feats")
    x_query = _as_features(query_feats, "query_feats")
    y_train = _as_labels(train_labels, x_train.shape[0], "train_labels")
    if x_train.shape[1] != x_query.shape[1]:
        raise ValueError(f"feature sizes differ: train {x_train.shape[1]}, query {x_query.shape[1]}")
    n_classes = _num_classes(num_classes, y_train)
    classes = np.unique(y_train)
    if classes.size == 0:
        raise ValueError("logistic regression needs at least one training row")
    if classes.size == 1:
        # scikit-learn refuses one-class problems; the only sensible classifier predicts it.
        return _spread_columns(np.ones((x_query.shape[0], 1)), classes, n_classes)
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed),
    )
    model.fit(x_train, y_train)
    return _spread_columns(model.predict_proba(x_query), model.classes_, n_classes)


def logistic_regression_top1(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_feats: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    seed: int = 0,
    C: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
) -> float:
    """Top-1 accuracy of :func:`logistic_regression_scores` on a labelled test set."""
    x_test = _as_features(test_feats, "test_feats")
    y_test = _as_labels(test_labels, x_test.shape[0], "test_labels")
    scores = logistic_regression_scores(train_feats, train_labels, x_test, seed=seed, C=C, max_iter=max_iter)
    return _accuracy(scores.argmax(axis=1), y_test)


def linear_probe_top1(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_feats: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    seed: int = 0,
) -> float:
    """Linear-probe accuracy: :func:`logistic_regression_top1` trained on every train label."""
    return logistic_regression_top1(train_feats, train_labels, test_feats, test_labels, seed=seed)


# --------------------------------------------------------------------------------------------
# Label propagation and the classifier switch
# --------------------------------------------------------------------------------------------


def label_propagation_scores(
    feats: npt.ArrayLike,
    partial_labels: npt.ArrayLike,
    *,
    num_classes: int | None = None,
    n_neighbors: int = 20,
    alpha: float = 0.99,
) -> FloatArray:
    """Transductive LabelSpreading (knn kernel): class distribution (rows x classes) of every row.

    ``partial_labels`` holds a class id for labelled rows and -1 for the rest; the unlabelled
    rows take part in the graph, which is the point of semi-supervised learning. The graph is
    built on L2-normalised features, where Euclidean neighbours are cosine neighbours. A row no
    label reaches gets a uniform distribution over the labelled classes (so its argmax is the
    lowest labelled class, as scikit-learn's ``transduction_``).

    ``alpha=0.99`` (Zhou et al. 2004; Iscen et al. 2019) instead of scikit-learn's 0.2: each
    hop multiplies a propagated label by alpha, so with 0.2 a label barely travels two hops
    and, with 1% labels, far-away points keep weak or no votes. On clustered synthetic 10-class
    data (10k + 2k rows, 512-d, 1% labels) 0.2 / 10 neighbours gave 94.8%, 0.99 / 20 neighbours
    99.5% (linear probe 98.0%). On features where neighbours are mostly noise, propagation
    cannot help and trails the linear probe whatever the setting. The cost is the exact kNN
    graph: about 3 minutes for 50k + 10k rows of 512-d on two CPU cores.
    """
    from sklearn.semi_supervised import LabelSpreading

    x = l2_normalize(_as_features(feats, "feats"))
    y = np.asarray(partial_labels).astype(np.int64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"partial_labels must be a 1-D array with {x.shape[0]} entries, got shape {y.shape}")
    classes = np.unique(y[y >= 0])
    if classes.size == 0:
        raise ValueError("label propagation needs at least one labelled row")
    n_classes = _num_classes(num_classes, classes)
    if classes.size == 1:
        return _spread_columns(np.ones((x.shape[0], 1)), classes, n_classes)
    model = LabelSpreading(kernel="knn", n_neighbors=min(n_neighbors, x.shape[0] - 1), alpha=alpha, max_iter=1000)
    model.fit(x, np.where(y >= 0, y, -1))
    dist = np.nan_to_num(np.asarray(model.label_distributions_, dtype=np.float64))
    dist[dist.sum(axis=1) == 0] = 1.0 / classes.size
    return _spread_columns(dist, model.classes_, n_classes)


def class_scores(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    query_feats: npt.ArrayLike,
    *,
    method: Classifier = "knn",
    num_classes: int | None = None,
    seed: int = 0,
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> FloatArray:
    """Scores (queries x classes, rows summing to 1) of an inductive classifier: ``"knn"``
    (weighted kNN votes) or ``"logreg"`` (probabilities). Label propagation is transductive
    (it needs the queries inside its graph), see :func:`label_propagation_scores`."""
    if method == "knn":
        return weighted_knn_scores(
            train_feats, train_labels, query_feats, k=knn_k, temperature=knn_t, num_classes=num_classes
        )
    if method == "logreg":
        return logistic_regression_scores(train_feats, train_labels, query_feats, num_classes=num_classes, seed=seed)
    raise ValueError(f"unknown inductive classifier {method!r}; use knn or logreg")


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


# --------------------------------------------------------------------------------------------
# Few-label evaluation
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
        return _accuracy(self.pred, self.truth)


def _subset_scores(
    pool: FloatArray,
    pool_labels: IntArray,
    train: IntArray,
    queries: FloatArray | None,
    *,
    classifier: Classifier,
    num_classes: int,
    seed: int,
    knn_k: int,
    knn_t: float,
) -> FloatArray:
    """Scores of ``queries`` (or, when None, of the pool rows outside ``train``) by a classifier
    that knows only the labels of ``pool[train]``. The whole pool (and the queries) feed label
    propagation's graph; only the labelled rows feed the inductive classifiers."""
    rest = np.setdiff1d(np.arange(pool.shape[0]), train)
    if classifier == "label_propagation":
        graph = pool if queries is None else np.concatenate([pool, queries], axis=0)
        partial = np.full(graph.shape[0], -1, dtype=np.int64)
        partial[train] = pool_labels[train]
        dist = label_propagation_scores(graph, partial, num_classes=num_classes)
        return dist[rest] if queries is None else dist[pool.shape[0] :]
    target = pool[rest] if queries is None else queries
    return class_scores(
        pool[train], pool_labels[train], target, method=classifier, num_classes=num_classes, seed=seed,
        knn_k=knn_k, knn_t=knn_t,
    )


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
    x_train = _as_features(train_feats, "train_feats")
    y_train = _as_labels(train_labels, x_train.shape[0], "train_labels")
    if classifier not in ("logreg", "knn", "label_propagation"):
        raise ValueError(f"unknown classifier {classifier!r}; use logreg, knn or label_propagation")
    if len(seeds) == 0:
        raise ValueError("give at least one seed")
    if (test_feats is None) != (test_labels is None):
        raise ValueError("give both test_feats and test_labels, or neither")
    x_test = None if test_feats is None else _as_features(test_feats, "test_feats")
    y_test = None if x_test is None else _as_labels(test_labels, x_test.shape[0], "test_labels")
    n_classes = _num_classes(None, y_train, *(() if y_test is None else (y_test,)))
    runs: list[FewLabelRun] = []
    for seed in map(int, seeds):
        train = budget.sample(y_train, seed)
        test = np.setdiff1d(np.arange(x_train.shape[0]), train) if x_test is None else np.arange(x_test.shape[0])
        truth = y_train[test] if y_test is None else y_test
        if test.size == 0:
            raise ValueError(f"{budget.name} labels every image: nothing is left to test on")
        scores = _subset_scores(x_train, y_train, train, x_test, classifier=classifier, num_classes=n_classes,
                                seed=seed, knn_k=knn_k, knn_t=knn_t)
        pred = scores.argmax(axis=1).astype(np.int64)
        runs.append(FewLabelRun(seed, train, test, truth, pred, scores[np.arange(pred.size), pred]))
    return runs


def few_label_top1(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_feats: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    fraction: float,
    seeds: Sequence[int] = (0, 1, 2),
    classifier: Classifier = "logreg",
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> tuple[float, float]:
    """Mean and standard deviation (over ``seeds``) of top-1 with only ``fraction`` of labels.

    Each seed draws a different stratified subset (:func:`sample_few_labels`); the spread
    shows how much the number depends on which few images happened to be labelled. The std is
    the population std (ddof=0), so a single seed gives 0.0 rather than NaN.
    ``classifier``: ``"logreg"`` (linear probe on the subset), ``"knn"`` (weighted kNN with
    the subset as memory bank) or ``"label_propagation"`` (LabelSpreading over train + test,
    transductive).
    """
    runs = few_label_predictions(
        train_feats, train_labels, budget=LabelBudget(fraction=fraction), seeds=seeds, classifier=classifier,
        test_feats=test_feats, test_labels=test_labels, knn_k=knn_k, knn_t=knn_t,
    )
    return _mean_std([run.accuracy for run in runs])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


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
    x = _as_features(feats, "feats")
    y = _as_labels(labels, x.shape[0], "labels")
    points: list[CurvePoint] = []
    for classifier in classifiers:
        for budget in budgets:
            if budget.sample(y, 0).size >= y.size:
                continue
            runs = few_label_predictions(x, y, budget=budget, seeds=seeds, classifier=classifier,
                                         knn_k=knn_k, knn_t=knn_t)
            mean, std = _mean_std([run.accuracy for run in runs])
            labelled = float(np.mean([run.train.size for run in runs]))
            points.append(CurvePoint(classifier, budget, labelled, mean, std))
    return points


def confusion_matrix(truth: npt.ArrayLike, pred: npt.ArrayLike, num_classes: int) -> IntArray:
    """Counts (true class x predicted class); pooling runs is a sum of their matrices."""
    t = _as_labels(truth, np.asarray(truth).shape[0], "truth")
    p = _as_labels(pred, t.size, "pred")
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


def evaluate_features(
    train_feats: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_feats: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> dict[str, float]:
    """The standard report for a set of frozen features; every value is a fraction in [0, 1].

    Keys: ``knn_top1`` (weighted kNN, all train labels), ``linear_top1`` (logistic regression,
    all train labels), ``few_label_1pct`` and ``few_label_10pct`` (logistic regression on 1% /
    10% stratified label subsets, mean over ``seeds``), each with a ``*_std``. kNN and the
    full linear probe (lbfgs) are deterministic, so their std is 0.0 and they run once.
    """
    x_train = _as_features(train_feats, "train_feats")
    x_test = _as_features(test_feats, "test_feats")
    y_train = _as_labels(train_labels, x_train.shape[0], "train_labels")
    y_test = _as_labels(test_labels, x_test.shape[0], "test_labels")
    n_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    first_seed = int(seeds[0]) if len(seeds) else 0
    knn = knn_top1(x_train, y_train, x_test, y_test, k=knn_k, temperature=knn_t, num_classes=n_classes)
    linear = linear_probe_top1(x_train, y_train, x_test, y_test, seed=first_seed)
    few1, few1_std = few_label_top1(x_train, y_train, x_test, y_test, fraction=0.01, seeds=seeds)
    few10, few10_std = few_label_top1(x_train, y_train, x_test, y_test, fraction=0.10, seeds=seeds)
    return {
        "knn_top1": knn,
        "knn_top1_std": 0.0,
        "linear_top1": linear,
        "linear_top1_std": 0.0,
        "few_label_1pct": few1,
        "few_label_1pct_std": few1_std,
        "few_label_10pct": few10,
        "few_label_10pct_std": few10_std,
    }


# --------------------------------------------------------------------------------------------
# Which images to label next
# --------------------------------------------------------------------------------------------

# k-means is fitted on at most this many rows: the centres of a random 20k sample of a large
# collection are as good for choosing a handful of images, and fitting stays around a second.
SUGGEST_FIT_ROWS = 20_000


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

    x = l2_normalize(_as_features(vectors, "vectors"))
    taken = np.zeros(x.shape[0], dtype=bool)
    taken[np.asarray(exclude, dtype=np.int64)] = True
    n = min(int(n), int((~taken).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fit = x if x.shape[0] <= SUGGEST_FIT_ROWS else x[rng.choice(x.shape[0], SUGGEST_FIT_ROWS, replace=False)]
    k = min(n + int(taken.sum()), 8 * n, fit.shape[0])
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(fit)
    assigned = km.predict(x)
    size = np.bincount(assigned, minlength=k)
    labelled = np.bincount(assigned[taken], minlength=k)
    order = np.lexsort((-size, labelled))  # last key is primary: fewest labelled, then largest
    chosen: list[int] = []
    for cluster in order[:n]:
        # Rows are unit vectors, so the nearest row to a centre is the one with the largest dot product.
        sims = np.where(taken, -np.inf, x @ km.cluster_centers_[cluster].astype(np.float32))
        best = int(np.argmax(sims))
        chosen.append(best)
        taken[best] = True
    return np.asarray(chosen, dtype=np.int64)
