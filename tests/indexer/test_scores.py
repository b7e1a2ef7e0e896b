"""Scores that mean something (issue 17 item 5): the neighbour-similarity distribution measured at
build, closeness of hits, words for people, collections written before the statistics existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer import store
from indexer.__main__ import main
from indexer.build import build
from indexer.collection import Collection, Hit
from indexer.scores import LEVELS, NeighbourStats, check_entry, measure

from .conftest import make_images, make_model
from .weak import make_weak_model

OPTS = {"device": "cpu", "workers": 2, "batch_size": 16}


def exact_search(x: np.ndarray, ids: np.ndarray):
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = q @ x.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, axis=1), ids[order]
    return search


def unit(n: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_measure_matches_a_brute_force_count_and_skips_self_and_exact_copies() -> None:
    x = unit(300)
    x[250:] = x[:50]  # 50 exact copies: their twin must not count as their nearest neighbour
    ids = np.arange(1000, 1300, dtype=np.int64)
    stats = measure(exact_search(x, ids), x, ids)
    assert stats is not None and stats.sample == 300 and stats.k == 10
    assert len(stats.nearest) == len(stats.kth) == LEVELS
    assert list(stats.nearest) == sorted(stats.nearest) and stats.typical_kth() < stats.typical_nearest() < 1
    sims = x @ x.T
    sims[sims >= 1 - 1e-6] = -2  # self and exact copies
    nearest = np.sort(sims, axis=1)[:, -1]
    assert stats.typical_nearest() == pytest.approx(float(np.median(nearest)), abs=1e-6)
    for score in (0.3, 0.5, float(np.quantile(nearest, 0.9))):
        assert stats.closeness(score) == pytest.approx(float(np.mean(nearest <= score)), abs=0.02)


def test_measure_samples_large_collections_and_needs_two_items() -> None:
    x = unit(3000, seed=1)
    ids = np.arange(3000, dtype=np.int64)
    assert measure(exact_search(x, ids), x, ids, sample=400).sample == 400
    assert measure(exact_search(x[:1], ids[:1]), x[:1], ids[:1]) is None
    same = np.repeat(x[:1], 5, axis=0)  # nothing but copies of one picture
    assert measure(exact_search(same, ids[:5]), same, ids[:5]) is None


def test_closeness_is_a_share_that_grows_with_the_score() -> None:
    x = unit(500, seed=2)
    ids = np.arange(500, dtype=np.int64)
    stats = measure(exact_search(x, ids), x, ids)
    scores = np.linspace(-1, 1, 401)
    shares = [stats.closeness(float(s)) for s in scores]
    assert all(0.0 <= c <= 1.0 for c in shares) and shares == sorted(shares)
    assert shares[0] == 0.0 and shares[-1] == 1.0
    plateau = NeighbourStats(10, (0.5,) * 60 + (0.9,) * 41, (0.2,) * LEVELS)
    assert plateau.closeness(0.5) == pytest.approx(0.59) and plateau.closeness(0.95) == 1.0


def test_words_for_people() -> None:
    stats = NeighbourStats(100, tuple(np.linspace(0.90, 0.99, LEVELS)), tuple(np.linspace(0.80, 0.95, LEVELS)))
    assert stats.describe(0.988) == "closer than 97% of nearest neighbours"
    assert stats.describe(0.999) == "closer than 99% of nearest neighbours"
    assert stats.describe(0.93) == "a typical neighbour"  # below most nearest, above most 10th neighbours
    assert stats.describe(0.85) == "weaker than most neighbours"
    assert stats.describe(1.0) == "identical embedding"


def test_manifest_entry_round_trip_and_damage() -> None:
    stats = NeighbourStats(100, tuple(np.linspace(0.9, 0.99, LEVELS)), tuple(np.linspace(0.8, 0.95, LEVELS)))
    entry = json.loads(json.dumps(stats.to_json()))
    assert check_entry(entry) is None
    assert NeighbourStats.from_json(entry).closeness(0.95) == pytest.approx(stats.closeness(0.95), abs=1e-5)
    assert "nearest" in check_entry({**entry, "nearest": entry["nearest"][::-1]})
    assert "kth" in check_entry({**entry, "kth": entry["kth"][:5]})
    assert "sample" in check_entry({**entry, "sample": True})
    assert "version" in check_entry({**entry, "version": 99})
    with pytest.raises(ValueError, match="neighbour_stats"):
        NeighbourStats.from_json([1, 2])


@pytest.fixture(scope="module", params=["weak", "good"])
def collection(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Collection:
    folder = tmp_path_factory.mktemp(request.param)
    photos = make_images(folder / "photos", per_class=10)
    model = make_weak_model(folder / "m.onnx") if request.param == "weak" else make_model(folder / "m.onnx")
    return build(photos, folder / "col", model=model, **OPTS)


def test_build_stores_the_statistics_and_hits_carry_closeness(collection: Collection) -> None:
    entry = collection.manifest["neighbour_stats"]
    assert check_entry(entry) is None and entry["sample"] == len(collection)
    item = collection.items[3]
    hits = collection.search_id(item.id, 10)
    closeness = [h.closeness for h in hits]
    assert all(c is not None and 0.0 <= c <= 1.0 for c in closeness)
    assert closeness == sorted(closeness, reverse=True)  # best first, like the scores
    stats = collection.neighbour_stats()
    assert [h.closeness for h in hits] == [pytest.approx(stats.closeness(h.score), abs=1e-4) for h in hits]
    # An item's own nearest neighbour sits inside the distribution, not beyond it.
    assert 0.0 < hits[0].closeness <= 1.0 and hits[-1].closeness < hits[0].closeness
    assert set(hits[0].to_json()) == {"id", "path", "score", "label", "closeness"}


def test_scores_of_a_weak_model_are_all_high_but_closeness_spreads(tmp_path: Path) -> None:
    photos = make_images(tmp_path / "photos", per_class=10)
    collection = build(photos, tmp_path / "col", model=make_weak_model(tmp_path / "m.onnx"), **OPTS)
    v = np.asarray(collection.vectors)
    sims = v @ v.T
    np.fill_diagonal(sims, np.nan)
    assert np.nanmin(sims) > 0.95  # raw cosines say nothing: everything looks like a match
    shares = [h.closeness for i in collection.ids[:12] for h in collection.search_id(int(i), 10)]
    assert min(shares) < 0.2 and max(shares) > 0.8


def test_hits_keep_working_when_built_the_old_way() -> None:
    hit = Hit(1, "a.jpg", 0.5, None)
    assert hit.closeness is None and hit.to_json()["closeness"] is None


def test_collections_without_the_statistics_measure_them_when_read(tmp_path: Path) -> None:
    photos = make_images(tmp_path / "photos", per_class=8)
    built = build(photos, tmp_path / "col", model=make_model(tmp_path / "m.onnx"), **OPTS)
    stored = built.neighbour_stats()
    old = {k: v for k, v in built.manifest.items() if k != "neighbour_stats"}  # as written before issue 17
    store.write_manifest(built.directory, old)
    before = (built.directory / store.MANIFEST).read_bytes()
    col = Collection.open(built.directory, device="cpu")
    measured = col.neighbour_stats()
    assert measured is not None and measured.nearest == pytest.approx(stored.nearest, abs=1e-5)
    hits = col.search_id(col.items[0].id, 5)
    assert all(h.closeness is not None for h in hits)
    assert col.duplicate_threshold().adaptive and isinstance(col.duplicates(), list)
    assert (built.directory / store.MANIFEST).read_bytes() == before  # a reader never writes


def test_a_damaged_entry_is_refused_on_open_with_its_name(tmp_path: Path) -> None:
    photos = make_images(tmp_path / "photos", per_class=4)
    built = build(photos, tmp_path / "col", model=make_model(tmp_path / "m.onnx"), **OPTS)
    broken = {**built.manifest, "neighbour_stats": {**built.manifest["neighbour_stats"], "nearest": [0.5]}}
    store.write_manifest(built.directory, broken)
    with pytest.raises(store.CollectionError, match="neighbour_stats.nearest"):
        Collection.open(built.directory, device="cpu")


def test_cli_search_prints_closeness_and_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = make_images(tmp_path / "photos", per_class=8)
    build(photos, tmp_path / "col", model=make_weak_model(tmp_path / "m.onnx"), **OPTS)
    query = str(photos / "class1" / "img02.jpg")
    assert main(["search", str(tmp_path / "col"), query, "-k", "3"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0].split()
    assert first[2] == "100%" and first[3] == "class1/img02.jpg" and "closeness" in err
    assert "(identical embedding)" in out.splitlines()[0]
    assert main(["search", str(tmp_path / "col"), query, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["closeness"] == 1.0 and hits[1]["closeness"] < 1.0
