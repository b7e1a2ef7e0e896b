"""Classifiers and metrics over frozen embeddings: weighted kNN, linear probe, label propagation,
few-label top-1 and the standard report, plus k-means clustering of embeddings.

One implementation serves ``moco eval``, the kNN monitor during training, ``indexer eval`` and
the app, so a number printed by any of them means the same thing. Everything works on numpy
arrays: features are float32 rows, L2-normalised (the kNN re-normalises defensively), labels
are non-negative integer arrays. Accuracies are fractions in [0, 1].

This module is part of the torch-free base that ``moco`` imports, so it holds only what an
evaluation needs. The interactive few-label workflow built on top of it (budgets, per-seed runs,
curves, confusion matrices, suggestions) lives in :mod:`indexer.fewlabel`, which imports this
module and never the other way round.

scikit-learn is imported inside the functions that need it, so the kNN monitor (numpy only)
does not pay the import in every training process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CLASSIFIERS",
    "KMEANS_FIT_ROWS",
    "Classifier",
    "accuracy",
    "as_features",
    "as_labels",
    "class_scores",
    "evaluate_features",
    "few_label_top1",
    "kmeans_labels",
    "knn_top1",
    "l2_normalize",
    "label_propagation_scores",
    "linear_probe_top1",
    "logistic_regression_scores",
    "logistic_regression_top1",
    "sample_few_labels",
    "subset_scores",
    "weighted_knn_predict",
    "weighted_knn_scores",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Classifier = Literal["logreg", "knn", "label_propagation"]
CLASSIFIERS: tuple[Classifier, ...] = ("logreg", "knn", "label_propagation")

# Inverse regularisation strength of the logistic-regression probe, see
# logistic_regression_top1 for why this value.
DEFAULT_C = 0.1
# Enough for lbfgs to converge on standardised 50k x 512 features (typically a few hundred
# iterations, well under a minute on a laptop CPU); the cap only bounds pathological cases.
DEFAULT_MAX_ITER = 1000
# k-means is fitted on at most this many rows, then every row is assigned: the centres of a
# random 20k sample are as good for telling regions apart (the map's colours, the few-label
# suggestions), and fitting stays about a second at 100k rows (bench/app_map.py).
KMEANS_FIT_ROWS = 20_000


def l2_normalize(x: npt.ArrayLike, eps: float = 1e-12) -> FloatArray:
    """Return float32 rows scaled to unit L2 norm (a 1-D input is treated as one vector).

    Cosine similarity is a plain dot product only between unit vectors; all-zero rows stay
    zero instead of becoming NaN.
    """
    arr = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return arr / np.maximum(norms, eps)


def as_features(x: npt.ArrayLike, name: str) -> FloatArray:
    """``x`` as a float32 (rows x dims) array, or a ValueError naming ``name``: every function
    here and in :mod:`indexer.fewlabel` checks its inputs the same way, with the same message."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows = samples), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_labels(y: npt.ArrayLike, n: int, name: str) -> IntArray:
    """``y`` as ``n`` non-negative int64 class ids, or a ValueError naming ``name``."""
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
    train = l2_normalize(as_features(train_feats, "train_feats"))
    queries = l2_normalize(as_features(query_feats, "query_feats"))
    labels = as_labels(train_labels, train.shape[0], "train_labels")
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
    return accuracy(pred, truth)


def accuracy(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Top-1 accuracy (fraction) of predicted class ids against the true ones."""
    pred_arr, truth_arr = np.asarray(pred), np.asarray(truth)
    if pred_arr.shape != truth_arr.shape:
        raise ValueError(f"prediction shape {pred_arr.shape} differs from label shape {truth_arr.shape}")
    if truth_arr.size == 0:
        raise ValueError("cannot compute accuracy on an empty test set")
    return float(np.mean(pred_arr == truth_arr))


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

    x_train = as_features(train_feats, "train_feats")
    x_query = as_features(query_feats, "query_feats")
    y_train = as_labels(train_labels, x_train.shape[0], "train_labels")
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
    x_test = as_features(test_feats, "test_feats")
    y_test = as_labels(test_labels, x_test.shape[0], "test_labels")
    scores = logistic_regression_scores(train_feats, train_labels, x_test, seed=seed, C=C, max_iter=max_iter)
    return accuracy(scores.argmax(axis=1), y_test)


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

    x = l2_normalize(as_features(feats, "feats"))
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


# --------------------------------------------------------------------------------------------
# Few-label top-1
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


def subset_scores(
    pool: npt.ArrayLike,
    pool_labels: npt.ArrayLike,
    train: npt.ArrayLike,
    queries: npt.ArrayLike | None = None,
    *,
    classifier: Classifier,
    num_classes: int | None = None,
    seed: int = 0,
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> FloatArray:
    """Scores (rows x classes) of ``queries`` (or, when None, of the pool rows outside ``train``)
    by a classifier that knows only the labels of ``pool[train]``: one seed of a few-label run.

    The whole pool (and the queries) feed label propagation's graph; only the labelled rows feed
    the inductive classifiers. :func:`few_label_top1` and :func:`indexer.fewlabel.few_label_predictions`
    both score through here, so the report and the app's per-seed runs cannot disagree.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; use logreg, knn or label_propagation")
    x = as_features(pool, "pool")
    y = as_labels(pool_labels, x.shape[0], "pool_labels")
    chosen = np.asarray(train, dtype=np.int64)
    extra = None if queries is None else as_features(queries, "queries")
    n_classes = _num_classes(num_classes, y)
    rest = np.setdiff1d(np.arange(x.shape[0]), chosen)
    if classifier == "label_propagation":
        graph = x if extra is None else np.concatenate([x, extra], axis=0)
        partial = np.full(graph.shape[0], -1, dtype=np.int64)
        partial[chosen] = y[chosen]
        dist = label_propagation_scores(graph, partial, num_classes=n_classes)
        return dist[rest] if extra is None else dist[x.shape[0] :]
    target = x[rest] if extra is None else extra
    return class_scores(
        x[chosen], y[chosen], target, method=classifier, num_classes=n_classes, seed=seed,
        knn_k=knn_k, knn_t=knn_t,
    )


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
    x_train = as_features(train_feats, "train_feats")
    y_train = as_labels(train_labels, x_train.shape[0], "train_labels")
    x_test = as_features(test_feats, "test_feats")
    y_test = as_labels(test_labels, x_test.shape[0], "test_labels")
    if len(seeds) == 0:
        raise ValueError("give at least one seed")
    n_classes = _num_classes(None, y_train, y_test)
    accuracies = []
    for seed in map(int, seeds):
        train = sample_few_labels(y_train, fraction=fraction, seed=seed)
        scores = subset_scores(x_train, y_train, train, x_test, classifier=classifier, num_classes=n_classes,
                               seed=seed, knn_k=knn_k, knn_t=knn_t)
        accuracies.append(accuracy(scores.argmax(axis=1), y_test))
    return float(np.mean(accuracies)), float(np.std(accuracies))


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
    x_train = as_features(train_feats, "train_feats")
    x_test = as_features(test_feats, "test_feats")
    y_train = as_labels(train_labels, x_train.shape[0], "train_labels")
    y_test = as_labels(test_labels, x_test.shape[0], "test_labels")
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
# Clustering
# --------------------------------------------------------------------------------------------


def kmeans_labels(vectors: npt.ArrayLike, k: int, *, seed: int = 0, chunk: int = 65_536) -> IntArray:
    """k-means cluster id (0..k-1) of every row: MiniBatchKMeans fitted on at most
    :data:`KMEANS_FIT_ROWS` rows, then all rows assigned ``chunk`` at a time.

    The vectors are L2-normalised, so Euclidean k-means groups by cosine similarity, the same
    notion of "alike" the search uses. A memory-mapped array is read in chunks rather than
    copied whole. ``k`` is capped at the number of rows; the result is fixed for a seed.
    """
    from sklearn.cluster import MiniBatchKMeans

    data = vectors if hasattr(vectors, "shape") else np.asarray(vectors, dtype=np.float32)
    if len(data.shape) != 2 or data.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty 2-D array of vectors, got shape {tuple(data.shape)}")
    n = int(data.shape[0])
    k = max(1, min(int(k), n))
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:KMEANS_FIT_ROWS])
    sample = np.ascontiguousarray(data[rows], dtype=np.float32)
    model = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=3, random_state=seed).fit(sample)
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        out[start:start + chunk] = model.predict(np.ascontiguousarray(data[start:start + chunk], dtype=np.float32))
    return out
