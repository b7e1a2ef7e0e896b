"""Tests for indexer.analysis: weighted kNN, few-label sampling and the classifier report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexer.analysis import (
    evaluate_features,
    few_label_top1,
    knn_top1,
    l2_normalize,
    linear_probe_top1,
    logistic_regression_top1,
    sample_few_labels,
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
