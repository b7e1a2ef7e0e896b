"""Curation scores: planted label mistakes are found, outliers and representatives rank right,
scores are kept per generation, and `python -m indexer curate` reports them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from indexer import curation, curation_store
from indexer.__main__ import main
from indexer.analysis import l2_normalize

from .conftest import picture


def brute_force(vectors: np.ndarray, ids: np.ndarray):
    """A `search(q, k)` over `vectors` that returns item ids, like the collection's index."""
    def search(q: np.ndarray, k: int):
        sims = q @ vectors.T
        order = np.argsort(-sims, axis=1)[:, :k]
        return np.take_along_axis(sims, order, 1), ids[order]
    return search


def clustered(n_per_class: int = 60, classes: int = 4, dim: int = 16, seed: int = 0):
    """Well separated classes on the unit sphere."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(classes, dim)).astype(np.float32))
    labels = np.repeat(np.arange(classes), n_per_class)
    vectors = l2_normalize(centres[labels] + 0.15 * rng.normal(size=(len(labels), dim)).astype(np.float32))
    return vectors, labels


def plant_mistakes(truth: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(given labels with `count` of them moved to another class, the moved rows)."""
    rng = np.random.default_rng(seed)
    moved = rng.choice(len(truth), size=count, replace=False)
    given = truth.copy()
    given[moved] = (truth[moved] + 1 + rng.integers(0, 3, size=count)) % 4
    return given, moved


def test_planted_label_mistakes_are_found_with_their_true_class():
    """5% of the labels moved in each of four sets: confident learning on the neighbours' votes
    finds most of them and flags almost nothing else, and suggests the true class."""
    names = ["a", "b", "c", "d"]
    found = planted = false_alarms = 0
    for seed in range(4):
        vectors, truth = clustered(seed=seed)
        ids = np.arange(100, 100 + len(truth), dtype=np.int64)  # ids are not rows
        given, moved = plant_mistakes(truth, 12, seed + 1)
        neighbours = curation.nearest_neighbours(brute_force(vectors, ids), vectors, ids)
        assert not np.any(neighbours.positions == np.arange(len(ids))[:, None]), "an item is not its own neighbour"
        probs = curation.knn_class_probabilities(neighbours, given, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
        issues, note = curation.find_label_issues(probs, given, names)
        assert note == ""
        flagged = {issue.position for issue in issues}
        found += len(flagged & set(moved.tolist()))
        false_alarms += len(flagged - set(moved.tolist()))
        planted += len(moved)
        for issue in issues:
            if issue.position in set(moved.tolist()):
                assert issue.suggested == names[truth[issue.position]]
                assert issue.given == names[given[issue.position]]
                assert 0.5 < issue.confidence <= 1.0
        ranks = [issue.quality for issue in issues]
        assert ranks == sorted(ranks), "most likely mistakes first"
    assert found >= 0.85 * planted, f"{found} of {planted} planted mistakes found"
    assert false_alarms <= 0.05 * found, f"{false_alarms} clean items flagged"


def test_too_few_labels_are_said_not_guessed():
    vectors, truth = clustered(n_per_class=3, classes=2)
    ids = np.arange(len(truth), dtype=np.int64)
    neighbours = curation.nearest_neighbours(brute_force(vectors, ids), vectors, ids, k=3)
    labels = np.full(len(truth), -1)
    labels[:4] = truth[:4]
    issues, note = curation.find_label_issues(curation.knn_class_probabilities(neighbours, labels, 2), labels,
                                              ["a", "b"])
    assert issues == [] and "at least" in note


def test_the_lonely_point_is_the_top_outlier_and_the_centre_the_most_representative():
    vectors, _ = clustered(n_per_class=50, classes=2)
    rng = np.random.default_rng(3)
    lonely = l2_normalize(rng.normal(size=(1, vectors.shape[1])).astype(np.float32))
    vectors = np.vstack([vectors, lonely])
    ids = np.arange(len(vectors), dtype=np.int64)
    scores = curation.outlier_scores(curation.nearest_neighbours(brute_force(vectors, ids), vectors, ids))
    assert int(np.argmax(scores)) == len(vectors) - 1
    assert scores.min() >= 0
    cluster, central = curation.representativeness(vectors[:-1], 2)
    for c in range(2):
        members = np.flatnonzero(cluster == c)
        centre = l2_normalize(vectors[members].mean(axis=0, keepdims=True))[0]
        assert members[np.argmax(central[members])] == members[np.argmax(vectors[members] @ centre)]


@pytest.fixture()
def collection_dir(tmp_path, tiny_model):
    """A small collection with a planted copy of one file under another class."""
    from indexer import build

    images = tmp_path / "photos"
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for c, color in enumerate(colors):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(8):
            picture(c * 100 + i, color).save(images / f"class{c}" / f"img{i}.png")
    shutil.copy(images / "class0" / "img0.png", images / "class0" / "copy.png")
    out = tmp_path / "col"
    build.build(images, out, model=tiny_model, device="cpu", progress=False)
    return out


def test_scores_are_kept_for_their_generation_only(collection_dir):
    from indexer.collection import Collection
    from indexer.curate import curate, stored

    with Collection.open(collection_dir, device="cpu") as col:
        assert stored(col) is None
        scores = curate(col, show_progress=False)
        again = stored(col)
        assert again is not None
        np.testing.assert_array_equal(again.ids, scores.ids)
        np.testing.assert_allclose(again.outlier, scores.outlier, rtol=1e-6)
        assert [i.position for i in again.label_issues] == [i.position for i in scores.label_issues]
        assert again.duplicate_groups == scores.duplicate_groups
        assert curation_store.load(col.directory, col.generation + 1, col.ids) is None


def test_curate_json_has_the_four_lists_with_relative_paths(collection_dir, capsys):
    assert main(["curate", str(collection_dir), "--json", "--no-progress", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"label_issues", "duplicate_groups", "outliers", "representative"} <= set(out)
    exact = [g for g in out["duplicate_groups"] if any(m["exact"] for m in g)]
    assert exact and {m["path"] for m in exact[0] if m["exact"]} == {"class0/img0.png", "class0/copy.png"}
    for entry in out["outliers"] + out["representative"]:
        assert not entry["path"].startswith("/") and entry["path"].endswith(".png")
    scores = [o["score"] for o in out["outliers"]]
    assert scores == sorted(scores, reverse=True)
    for issue in out["label_issues"]:
        assert {"id", "path", "label", "suggested", "confidence"} <= set(issue)
        assert issue["label"] != issue["suggested"]


def test_curate_bad_input_is_one_line(tmp_path, capsys):
    assert main(["curate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_update_recomputes_kept_scores_for_the_new_generation(collection_dir, capsys):
    from indexer.collection import Collection
    from indexer.curate import stored

    assert main(["curate", str(collection_dir), "--no-progress", "--device", "cpu"]) == 0
    with Collection.open(collection_dir, device="cpu") as col:
        images = col.image_root
    picture(777, (40, 200, 40)).save(images / "class1" / "new.png")
    assert main(["update", str(collection_dir), "--no-progress", "--device", "cpu"]) == 0
    assert "scores recomputed" in capsys.readouterr().out
    with Collection.open(collection_dir, device="cpu") as col:
        scores = stored(col)
        assert scores is not None and scores.generation == col.generation
        assert len(scores.ids) == len(col) and any(it.path == "class1/new.png" for it in col.items)
