"""Which images to label next: covering picks while labels are few, then uncertain ones spread out;
and the replay of labelling rounds."""

from __future__ import annotations

import time

import numpy as np
import pytest

from indexer.analysis import l2_normalize
from indexer.fewlabel import suggest_to_label
from indexer.selection import active_suggestions, margins, next_picks, selection_curve, suggestion_phase


def two_blobs_and_a_bridge(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tight classes plus points on the path between them (class by the nearer end)."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(8, dtype=np.float32)[0], np.eye(8, dtype=np.float32)[1]
    blob_a = a + 0.05 * rng.normal(size=(60, 8))
    blob_b = b + 0.05 * rng.normal(size=(60, 8))
    t = rng.uniform(0.3, 0.7, size=(20, 1))
    bridge = (1 - t) * a + t * b + 0.02 * rng.normal(size=(20, 8))
    x = l2_normalize(np.vstack([blob_a, blob_b, bridge]).astype(np.float32))
    y = np.concatenate([np.zeros(60), np.ones(60), (t[:, 0] > 0.5).astype(float)]).astype(np.int64)
    return x, y


def test_margins():
    scores = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.7]])
    np.testing.assert_allclose(margins(scores), [0.8, 0.0, 0.5], atol=1e-6)


def test_active_picks_come_from_the_uncertain_bridge_and_differ():
    x, y = two_blobs_and_a_bridge()
    labelled = np.array([0, 1, 2, 3, 4, 60, 61, 62, 63, 64])  # five per class: past the coverage phase
    picks = active_suggestions(x, labelled, y[labelled], 4)
    assert len(picks) == 4 and len(set(picks.tolist())) == 4
    assert not set(picks.tolist()) & set(labelled.tolist())
    assert np.all(picks >= 120), "the uncertain images lie between the classes"


def test_active_starts_with_kmeans_centres():
    x, y = two_blobs_and_a_bridge()
    one_class = np.array([0, 1])
    np.testing.assert_array_equal(active_suggestions(x, one_class, y[one_class], 3),
                                  suggest_to_label(x, 3, exclude=one_class))
    first = next_picks("active", x, y, np.zeros(0, dtype=np.int64), 2, rng=np.random.default_rng(0), seed=5)
    np.testing.assert_array_equal(first, suggest_to_label(x, 2, seed=5))
    with pytest.raises(ValueError, match="unknown strategy"):
        next_picks("oracle", x, y, one_class, 2, rng=np.random.default_rng(0), seed=0)


def test_selection_curve_reports_every_strategy_and_round():
    x, y = two_blobs_and_a_bridge()
    curve = selection_curve(x, y, rounds=(1, 2, 3), seeds=(0, 1))
    assert {(r.strategy, r.labels_per_class) for r in curve} == {(s, n) for s in ("random", "kmeans", "active")
                                                                  for n in (1, 2, 3)}
    for r in curve:
        assert 0.0 <= r.mean <= 1.0 and r.std >= 0.0
    by = {(r.strategy, r.labels_per_class): r.mean for r in curve}
    assert by[("active", 1)] == by[("kmeans", 1)], "the first round of active selection is k-means centres"


def unequal_clusters_and_outliers(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four tight clusters of 300, 120, 60 and 30 rows, and 10 scattered outliers (cluster -1)."""
    rng = np.random.default_rng(seed)
    sizes = (300, 120, 60, 30)
    parts = [np.eye(16, dtype=np.float32)[c] + 0.1 * rng.normal(size=(size, 16)) for c, size in enumerate(sizes)]
    parts.append(rng.normal(size=(10, 16)))
    cluster = np.concatenate([np.full(size, c) for c, size in enumerate(sizes)] + [np.full(10, -1)])
    return l2_normalize(np.vstack(parts).astype(np.float32)), cluster.astype(np.int64)


def test_first_picks_cover_every_cluster_with_a_typical_image():
    x, cluster = unequal_clusters_and_outliers()
    nothing = np.zeros(0, dtype=np.int64)
    for seed in range(3):
        picks = active_suggestions(x, nothing, nothing, 4, seed=seed)
        assert sorted(cluster[picks].tolist()) == [0, 1, 2, 3], "one pick per cluster, the small ones too"
        for p in picks:
            members = np.flatnonzero(cluster == cluster[p])
            centre = x[members].mean(axis=0)
            assert x[p] @ centre >= np.median(x[members] @ centre), "a central image, not one from the fringe"


def test_coverage_until_five_labels_per_class_then_uncertainty():
    assert suggestion_phase([]) == "coverage"
    assert suggestion_phase([3] * 12) == "coverage", "one class: no margin to measure"
    assert suggestion_phase([0, 1, 2]) == "coverage"
    assert suggestion_phase([0] * 5 + [1] * 4) == "coverage"
    assert suggestion_phase([0] * 5 + [1] * 5) == "uncertainty"
    x, y = two_blobs_and_a_bridge()
    four_each = np.array([0, 1, 2, 3, 60, 61, 62, 63])
    np.testing.assert_array_equal(active_suggestions(x, four_each, y[four_each], 4),
                                  suggest_to_label(x, 4, exclude=four_each))
    five_each = np.array([0, 1, 2, 3, 4, 60, 61, 62, 63, 64])
    assert np.all(active_suggestions(x, five_each, y[five_each], 4) >= 120), "uncertain: the bridge"


def test_second_round_goes_to_the_clusters_without_a_label():
    x, cluster = unequal_clusters_and_outliers()
    labelled = np.array([0, 1])  # two labels, both in the largest cluster
    picks = active_suggestions(x, labelled, np.array([0, 1]), 3, seed=0)
    assert sorted(cluster[picks].tolist()) == [1, 2, 3]


def test_suggestions_are_deterministic_for_a_seed():
    x, y = two_blobs_and_a_bridge()
    for labelled in (np.zeros(0, dtype=np.int64), np.array([0, 60]), np.array([0, 1, 2, 3, 4, 60, 61, 62, 63, 64])):
        first = active_suggestions(x, labelled, y[labelled], 4, seed=7)
        np.testing.assert_array_equal(first, active_suggestions(x, labelled, y[labelled], 4, seed=7))
        assert not set(first.tolist()) & set(labelled.tolist())


def test_a_round_on_50k_rows_takes_seconds():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 512)).astype(np.float32)
    truth = rng.integers(0, 40, 50_000)
    x = centres[truth] + rng.normal(size=(50_000, 512)).astype(np.float32)
    labelled = np.zeros(0, dtype=np.int64)
    for _ in range(3):  # coverage (nothing labelled), coverage (one per class), uncertainty (two per class)
        start = time.perf_counter()
        picks = active_suggestions(x, labelled, truth[labelled], 40, seed=0)
        assert time.perf_counter() - start < 20.0, "an interactive round must not take minutes"
        assert picks.size == 40
        labelled = np.concatenate([labelled, picks])
