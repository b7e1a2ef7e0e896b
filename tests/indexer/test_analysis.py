"""Tests for indexer.analysis: weighted kNN, few-label sampling, the probes, label propagation,
the classifier report and k-means clustering."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from indexer.analysis import (
    class_scores,
    evaluate_features,
    few_label_top1,
    kmeans_labels,
    knn_top1,
    l2_normalize,
    label_propagation_scores,
    linear_probe_top1,
    logistic_regression_scores,
    logistic_regression_top1,
    sample_few_labels,
    subset_scores,
    weighted_knn_predict,
    weighted_knn_scores,
)


def _clusters(
    n_per_class: int, n_classes: int = 4, dim: int = 16, noise: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian clusters on the unit sphere (a stand-in for a good encoder)."""
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(n_classes, dim)))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    feats = centers[labels] + noise * rng.normal(size=(labels.size, dim)) / math.sqrt(dim)
    order = rng.permutation(labels.size)
    return l2_normalize(feats[order]), labels[order]


# Three training points on the unit circle and one query at (1, 0):
# similarities 1.0 (class 0), 0.0 (class 1) and 0.6 (class 1).
TRAIN = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
LABELS = np.array([0, 1, 1])
QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def test_knn_hand_computed() -> None:
    # k=2, T=1: neighbours sim 1.0 (class 0) and 0.6 (class 1); weights e^1 and e^0.6.
    scores = weighted_knn_scores(TRAIN, LABELS, QUERY, k=2, temperature=1.0)
    e1, e06 = math.exp(1.0), math.exp(0.6)
    np.testing.assert_allclose(scores, [[e1 / (e1 + e06), e06 / (e1 + e06)]], rtol=1e-5)
    # k=3, T=1: class 1 gets e^0 + e^0.6 = 2.82 > e^1 = 2.72, so two weaker votes win ...
    assert weighted_knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=1.0).tolist() == [1]
    scores3 = weighted_knn_scores(TRAIN, LABELS, QUERY, k=3, temperature=1.0)
    np.testing.assert_allclose(scores3[0, 1], (1 + e06) / (1 + e06 + e1), rtol=1e-5)
    # ... but with T=0.1 the closest neighbour dominates: e^10 vs 1 + e^6.
    assert weighted_knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=0.1).tolist() == [0]
    # k=1 is plain nearest neighbour.
    assert weighted_knn_predict(TRAIN, LABELS, QUERY, k=1).tolist() == [0]


def test_knn_scores_shape_and_normalisation() -> None:
    scores = weighted_knn_scores(TRAIN, LABELS, QUERY, k=3, temperature=0.01, num_classes=5)
    assert scores.shape == (1, 5) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(scores).all()  # no overflow for a tiny temperature
    assert scores[0, 2:].sum() == 0
    with pytest.raises(ValueError):
        weighted_knn_scores(TRAIN, LABELS, QUERY, num_classes=1)


def test_knn_k_is_capped() -> None:
    big = weighted_knn_scores(TRAIN, LABELS, QUERY, k=1000, temperature=1.0)
    exact = weighted_knn_scores(TRAIN, LABELS, QUERY, k=3, temperature=1.0)
    np.testing.assert_allclose(big, exact)


def test_knn_chunked_equals_unchunked() -> None:
    train, train_y = _clusters(60, n_classes=5, noise=2.0, seed=1)
    query, _ = _clusters(20, n_classes=5, noise=2.0, seed=2)
    whole = weighted_knn_scores(train, train_y, query, k=25, chunk=10_000)
    parts = weighted_knn_scores(train, train_y, query, k=25, chunk=7)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)
    assert (
        weighted_knn_predict(train, train_y, query, k=25, chunk=7)
        == weighted_knn_predict(train, train_y, query, k=25, chunk=10_000)
    ).all()


def test_knn_normalises_inputs() -> None:
    a = weighted_knn_scores(TRAIN * 5, LABELS, QUERY * 0.1, k=3, temperature=1.0)
    b = weighted_knn_scores(TRAIN, LABELS, QUERY, k=3, temperature=1.0)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_l2_normalize() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_sample_few_labels_stratified_and_deterministic() -> None:
    labels = np.array([0] * 100 + [1] * 50 + [2] * 3)
    idx = sample_few_labels(labels, fraction=0.1, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 5, 1]  # round(0.3) = 0 -> at least one
    assert len(set(idx.tolist())) == idx.size and (np.diff(idx) > 0).all()
    assert (sample_few_labels(labels, fraction=0.1, seed=0) == idx).all()
    assert not np.array_equal(sample_few_labels(labels, fraction=0.1, seed=1), idx)
    per = sample_few_labels(labels, per_class=5, seed=3)
    assert np.bincount(labels[per]).tolist() == [5, 5, 3]
    with pytest.raises(ValueError):
        sample_few_labels(labels, seed=0)
    with pytest.raises(ValueError):
        sample_few_labels(labels, fraction=0.1, per_class=2, seed=0)
    with pytest.raises(ValueError):
        sample_few_labels(labels, fraction=0.0, seed=0)


def test_classifiers_beat_chance_on_clusters() -> None:
    x_train, y_train = _clusters(50, seed=3)
    x_test, y_test = _clusters(25, seed=3)  # same centers (seed), different noise below
    x_test = l2_normalize(x_test + 0.05 * np.random.default_rng(9).normal(size=x_test.shape))
    assert knn_top1(x_train, y_train, x_test, y_test, k=20) > 0.9
    assert linear_probe_top1(x_train, y_train, x_test, y_test) > 0.9
    assert logistic_regression_top1(x_train, y_train, x_test, y_test, seed=1) > 0.9
    for classifier in ("logreg", "knn", "label_propagation"):
        mean, std = few_label_top1(
            x_train, y_train, x_test, y_test, fraction=0.1, seeds=(0, 1), classifier=classifier
        )
        assert mean > 0.85, classifier
        assert 0.0 <= std <= 0.15


def test_classifiers_near_chance_on_noise() -> None:
    rng = np.random.default_rng(4)
    x_train, x_test = l2_normalize(rng.normal(size=(200, 16))), l2_normalize(rng.normal(size=(200, 16)))
    y_train, y_test = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    assert knn_top1(x_train, y_train, x_test, y_test, k=20) < 0.4
    assert linear_probe_top1(x_train, y_train, x_test, y_test) < 0.4
    mean, _ = few_label_top1(
        x_train, y_train, x_test, y_test, fraction=0.2, seeds=(0,), classifier="label_propagation"
    )
    assert mean < 0.4


def test_single_class_subset_does_not_crash() -> None:
    x, _ = _clusters(5, n_classes=2)
    assert logistic_regression_top1(x, np.zeros(10, int), x, np.zeros(10, int)) == 1.0


def test_evaluate_features_keys() -> None:
    x_train, y_train = _clusters(50, seed=5)
    x_test, y_test = _clusters(20, seed=6)
    report = evaluate_features(x_train, y_train, x_test, y_test, seeds=(0, 1), knn_k=20)
    assert list(report) == [
        "knn_top1",
        "knn_top1_std",
        "linear_top1",
        "linear_top1_std",
        "few_label_1pct",
        "few_label_1pct_std",
        "few_label_10pct",
        "few_label_10pct_std",
    ]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in report.values())
    assert report["knn_top1_std"] == 0.0 and report["linear_top1_std"] == 0.0


def test_few_label_top1_refuses_bad_settings() -> None:
    x, y = _clusters(10, n_classes=2)
    with pytest.raises(ValueError, match="unknown classifier"):
        few_label_top1(x, y, x, y, fraction=0.5, classifier="svm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        few_label_top1(x, y, x, y, fraction=0.5, seeds=())
    with pytest.raises(ValueError, match="fraction"):
        few_label_top1(x, y, x, y, fraction=0.0)


@pytest.mark.parametrize("classifier", ["knn", "logreg", "label_propagation"])
def test_subset_scores_score_the_unlabelled_rows_or_the_queries(classifier: str) -> None:
    x, y = _clusters(20, n_classes=3, noise=0.2, seed=4)
    train = sample_few_labels(y, per_class=2, seed=0)
    rest = np.setdiff1d(np.arange(y.size), train)
    scores = subset_scores(x, y, train, classifier=classifier)  # type: ignore[arg-type]
    assert scores.shape == (rest.size, 3)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(scores.argmax(axis=1) == y[rest]) > 0.95
    queries = subset_scores(x, y, train, x[:5], classifier=classifier, num_classes=6)  # type: ignore[arg-type]
    assert queries.shape == (5, 6) and (queries[:, 3:] == 0).all()
    assert (queries.argmax(axis=1) == y[:5]).all()


# ---------------------------------------------------------------------------------------------
# Inductive and transductive scores (moved with the classifiers from the few-label tests)
# ---------------------------------------------------------------------------------------------


def test_class_scores_refuses_transductive_method() -> None:
    x, y = _clusters(5, n_classes=2, seed=8)
    with pytest.raises(ValueError, match="inductive"):
        class_scores(x, y, x, method="label_propagation")


def test_logistic_regression_scores_single_class_and_layout() -> None:
    x, _ = _clusters(6, n_classes=2, seed=9)
    scores = logistic_regression_scores(x, np.full(12, 2), x[:3], num_classes=4)
    assert scores.tolist() == [[0.0, 0.0, 1.0, 0.0]] * 3
    two = logistic_regression_scores(x, np.array([1] * 6 + [3] * 6), x)
    assert two.shape == (12, 4) and (two[:, [0, 2]] == 0).all()
    np.testing.assert_allclose(two.sum(axis=1), 1.0, rtol=1e-6)


def test_label_propagation_scores() -> None:
    x, y = _clusters(25, n_classes=3, noise=0.2, seed=10)
    partial = np.full(y.size, -1)
    for c in range(3):
        partial[np.flatnonzero(y == c)[0]] = c
    dist = label_propagation_scores(x, partial)
    assert dist.shape == (75, 3)
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(dist.argmax(axis=1) == y) > 0.95
    labelled = partial >= 0
    assert (dist[labelled].argmax(axis=1) == partial[labelled]).all()
    single = label_propagation_scores(x, np.where(partial == 1, 1, -1), num_classes=3)
    assert (single.argmax(axis=1) == 1).all()
    with pytest.raises(ValueError):
        label_propagation_scores(x, np.full(y.size, -1))


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    return np.concatenate([c + rng.standard_normal((50, 8)).astype(np.float32) for c in centres])


def test_kmeans_labels_follow_the_vectors() -> None:
    clusters = kmeans_labels(_blobs(), 3)
    for block in range(3):
        assert len(set(clusters[block * 50:(block + 1) * 50])) == 1
    assert len(set(clusters)) == 3


def test_kmeans_labels_are_stable_in_chunks_and_from_a_memory_map(tmp_path: Path) -> None:
    vectors = _blobs()
    whole = kmeans_labels(vectors, 3, seed=1)
    assert whole.dtype == np.int64 and whole.shape == (150,)
    assert (kmeans_labels(vectors, 3, seed=1) == whole).all()  # fixed for a seed
    assert (kmeans_labels(vectors, 3, seed=1, chunk=7) == whole).all()
    mapped = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=vectors.shape)
    mapped[:] = vectors
    assert (kmeans_labels(mapped, 3, seed=1, chunk=16) == whole).all()
    assert (kmeans_labels(vectors.tolist(), 3, seed=1) == whole).all()  # a plain list works too


def test_kmeans_labels_caps_k_and_refuses_no_rows() -> None:
    few = _blobs()[::50]  # one row per blob
    assert sorted(kmeans_labels(few, 10).tolist()) == [0, 1, 2]
    assert kmeans_labels(few, 0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="non-empty"):
        kmeans_labels(np.zeros((0, 8), np.float32), 3)
