"""Which images to label next: uncertain ones, spread out; and the replay of labelling rounds."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.analysis import l2_normalize
from indexer.fewlabel import suggest_to_label
from indexer.selection import active_suggestions, margins, next_picks, selection_curve


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
    labelled = np.array([0, 1, 60, 61])
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
