"""Tests for indexer.fewlabel, the few-label workflow: budgets, per-seed predictions, curves,
confusion matrices, confidences, the choice of images to label next and the label predicate
(used by the app's Few-label and Map pages)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexer.analysis import class_scores, few_label_top1, l2_normalize
from indexer.fewlabel import (
    LabelBudget,
    accuracy_curve,
    classify_with_confidence,
    confusion_matrix,
    few_label_predictions,
    has_label,
    per_class_accuracy,
    suggest_to_label,
)

CLASSIFIERS = ("knn", "logreg", "label_propagation")


def _clusters(sizes: list[int], dim: int = 16, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around random unit centres; ``noise`` sets how much they overlap."""
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(len(sizes), dim)))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    feats = centers[labels] + noise * rng.normal(size=(labels.size, dim)) / math.sqrt(dim)
    order = rng.permutation(labels.size)
    return l2_normalize(feats[order]), labels[order]


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


def test_label_budget_names_and_validation() -> None:
    assert LabelBudget(per_class=5).name == "5 per class"
    assert LabelBudget(fraction=0.01).name == "1%"
    assert LabelBudget(fraction=0.1).name == "10%"
    assert len({LabelBudget(per_class=5), LabelBudget(per_class=5)}) == 1  # usable as a cache key
    for bad in ({}, {"per_class": 1, "fraction": 0.1}, {"per_class": 0}, {"fraction": 0.0}, {"fraction": 1.5}):
        with pytest.raises(ValueError):
            LabelBudget(**bad)
    labels = np.array([0] * 30 + [1] * 10)
    assert np.bincount(labels[LabelBudget(per_class=3).sample(labels, 0)]).tolist() == [3, 3]
    assert np.bincount(labels[LabelBudget(fraction=0.1).sample(labels, 0)]).tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------
# Few-label predictions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_predictions_on_separable_clusters(classifier: str) -> None:
    x, y = _clusters([40, 30, 30, 20], noise=0.2, seed=1)
    runs = few_label_predictions(x, y, budget=LabelBudget(per_class=2), seeds=(0, 1, 2), classifier=classifier)
    assert [run.seed for run in runs] == [0, 1, 2]
    for run in runs:
        # The labelled rows and the scored rows split the pool exactly.
        assert np.intersect1d(run.train, run.test).size == 0
        assert np.union1d(run.train, run.test).tolist() == list(range(y.size))
        assert np.bincount(y[run.train]).tolist() == [2, 2, 2, 2]
        assert (run.truth == y[run.test]).all()
        assert run.pred.shape == run.truth.shape == run.confidence.shape
        assert ((run.confidence >= 0) & (run.confidence <= 1 + 1e-6)).all()
        assert run.accuracy > 0.95, classifier
        cm = confusion_matrix(run.truth, run.pred, 4)
        assert cm.sum() == run.test.size
        assert np.trace(cm) / cm.sum() == pytest.approx(run.accuracy)
        assert (np.diag(cm) >= 0.9 * cm.sum(axis=1)).all()  # every class mostly right, not only the big one
    assert not np.array_equal(runs[0].train, runs[1].train)  # seeds draw different subsets


def test_predictions_are_deterministic_per_seed() -> None:
    x, y = _clusters([20, 20, 20], noise=1.5, seed=2)
    a = few_label_predictions(x, y, budget=LabelBudget(per_class=3), seeds=(7,), classifier="logreg")[0]
    b = few_label_predictions(x, y, budget=LabelBudget(per_class=3), seeds=(7,), classifier="logreg")[0]
    assert np.array_equal(a.train, b.train) and np.array_equal(a.pred, b.pred)
    np.testing.assert_allclose(a.confidence, b.confidence)


def test_predictions_on_a_held_out_test_set() -> None:
    x, y = _clusters([30, 30, 30], noise=0.2, seed=3)
    xt, yt = x[:20] + 0.01, y[:20]
    runs = few_label_predictions(x, y, budget=LabelBudget(fraction=0.1), seeds=(0, 1), classifier="knn",
                                 test_feats=xt, test_labels=yt)
    for run in runs:
        assert run.test.tolist() == list(range(20))
        assert (run.truth == yt).all()
        assert run.accuracy > 0.95
    with pytest.raises(ValueError):
        few_label_predictions(x, y, budget=LabelBudget(per_class=1), test_feats=xt)


def test_noise_gives_chance_accuracy_and_mistakes() -> None:
    rng = np.random.default_rng(4)
    x, y = l2_normalize(rng.normal(size=(300, 16))), rng.integers(0, 3, 300)
    for classifier in CLASSIFIERS:
        runs = few_label_predictions(x, y, budget=LabelBudget(per_class=5), seeds=(0, 1), classifier=classifier)
        assert np.mean([run.accuracy for run in runs]) < 0.5, classifier
        cm = sum(confusion_matrix(run.truth, run.pred, 3) for run in runs)
        assert cm.sum() - np.trace(cm) > 100  # plenty of off-diagonal mistakes to show


def test_few_label_top1_is_the_mean_of_the_runs_on_a_test_set() -> None:
    # The report (analysis.few_label_top1, what moco eval prints) and the page's per-seed runs
    # score through the same code, so they give the same numbers.
    x, y = _clusters([30, 20, 25], noise=1.2, seed=14)
    xt, yt = _clusters([10, 10, 10], noise=1.2, seed=14)
    for classifier in CLASSIFIERS:
        runs = few_label_predictions(x, y, budget=LabelBudget(fraction=0.1), seeds=(0, 1, 2), classifier=classifier,
                                     test_feats=xt, test_labels=yt)
        accuracies = [run.accuracy for run in runs]
        mean, std = few_label_top1(x, y, xt, yt, fraction=0.1, seeds=(0, 1, 2), classifier=classifier)
        assert mean == pytest.approx(np.mean(accuracies)) and std == pytest.approx(np.std(accuracies))
        assert 0.0 < mean < 1.0, classifier  # overlapping clusters: a real number, not a trivial one


def test_budget_that_labels_everything_is_refused() -> None:
    x, y = _clusters([5, 5], seed=5)
    with pytest.raises(ValueError, match="nothing is left"):
        few_label_predictions(x, y, budget=LabelBudget(per_class=5), seeds=(0,))
    with pytest.raises(ValueError):
        few_label_predictions(x, y, budget=LabelBudget(per_class=1), classifier="svm")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        few_label_predictions(x, y, budget=LabelBudget(per_class=1), seeds=())


# ---------------------------------------------------------------------------------------------
# Curves and confusion matrices
# ---------------------------------------------------------------------------------------------


def test_accuracy_curve_grows_with_labels() -> None:
    x, y = _clusters([60, 60, 60, 60], noise=1.6, seed=6)  # overlapping: one label is not enough
    budgets = [LabelBudget(per_class=1), LabelBudget(per_class=20), LabelBudget(per_class=60)]
    points = accuracy_curve(x, y, budgets=budgets, classifiers=("knn", "logreg"), seeds=(0, 1, 2, 3, 4))
    # The budget that labels every image has nothing left to test, so it is left out.
    assert [(p.classifier, p.budget) for p in points] == [
        ("knn", budgets[0]), ("knn", budgets[1]), ("logreg", budgets[0]), ("logreg", budgets[1])]
    for p in points:
        assert 0.0 <= p.mean <= 1.0 and p.std >= 0.0
    assert [p.labelled for p in points] == [4.0, 80.0, 4.0, 80.0]
    for first, second in (points[0:2], points[2:4]):
        assert second.mean > first.mean + 0.05, first.classifier
        assert second.std < first.std  # more labels, less luck of the draw


def test_confusion_matrix_and_per_class_accuracy_by_hand() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    cm = confusion_matrix(truth, pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    acc = per_class_accuracy(cm)
    np.testing.assert_allclose(acc[:3], [2 / 3, 0.5, 1.0])
    assert math.isnan(acc[3])  # no test image of class 3: unknown, not 0%
    with pytest.raises(ValueError):
        confusion_matrix(truth, pred, 2)


# ---------------------------------------------------------------------------------------------
# Scores and confidences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["knn", "logreg"])
def test_classify_with_confidence(method: str) -> None:
    x, y = _clusters([30, 30, 30], noise=0.8, seed=7)
    train = np.array([np.flatnonzero(y == c)[i] for c in range(3) for i in range(3)])
    pred, conf = classify_with_confidence(x[train], y[train], x, method, num_classes=5)
    scores = class_scores(x[train], y[train], x, method=method, num_classes=5)
    assert scores.shape == (90, 5)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert (scores[:, 3:] == 0).all()  # classes nobody labelled are never predicted
    assert (pred == scores.argmax(axis=1)).all()
    np.testing.assert_allclose(conf, scores.max(axis=1), rtol=1e-6)
    assert conf.dtype == np.float32 and ((conf >= 1 / 3 - 1e-6) & (conf <= 1)).all()
    assert np.mean(pred == y) > 0.85
    # The confident predictions are the better ones: that is what the page's filter relies on.
    confident = conf >= np.median(conf)
    assert np.mean(pred[confident] == y[confident]) >= np.mean(pred[~confident] == y[~confident])


# ---------------------------------------------------------------------------------------------
# Suggestions
# ---------------------------------------------------------------------------------------------


def test_suggestions_cover_every_cluster() -> None:
    # Unequal sizes: picking at random would mostly show the big cluster.
    x, y = _clusters([200, 60, 20, 10, 10], noise=0.1, seed=11)
    picked = suggest_to_label(x, 5, seed=0)
    assert picked.dtype == np.int64 and len(set(picked.tolist())) == 5
    assert sorted(y[picked].tolist()) == [0, 1, 2, 3, 4]
    assert (suggest_to_label(x, 5, seed=0) == picked).all()  # deterministic for a seed


def test_suggestions_skip_labelled_and_prefer_unlabelled_regions() -> None:
    x, y = _clusters([50, 50, 50, 50], noise=0.1, seed=12)
    labelled = np.concatenate([np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:3]])
    picked = suggest_to_label(x, 2, exclude=labelled, seed=0)
    assert np.intersect1d(picked, labelled).size == 0
    assert sorted(y[picked].tolist()) == [2, 3]  # the two classes nobody has labelled yet


def test_suggestions_when_few_candidates_remain() -> None:
    x, _ = _clusters([4, 4], seed=13)
    picked = suggest_to_label(x, 10, exclude=np.arange(5), seed=0)
    assert sorted(picked.tolist()) == [5, 6, 7]
    assert suggest_to_label(x, 3, exclude=np.arange(8)).size == 0
    assert suggest_to_label(x, 0).size == 0


# ---------------------------------------------------------------------------------------------
# The label predicate
# ---------------------------------------------------------------------------------------------


def test_has_label() -> None:
    assert has_label("cat") and has_label(" ")
    for missing in (None, float("nan"), np.nan, "", 0, b"cat"):
        assert not has_label(missing), missing
