"""Near-duplicate groups (issue 17 item 5): thresholds that adapt to the model, groups that do not
chain a whole collection together, copies that always group, on a weak and a good model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer import ann
from indexer.__main__ import main
from indexer.build import build
from indexer.collection import Collection
from indexer.dupes import DEFAULT_THRESHOLD, choose_threshold, duplicate_groups, group_sizes
from indexer.scores import LEVELS, NeighbourStats

from .conftest import make_images, make_model
from .weak import make_weak_model

OPTS = {"device": "cpu", "workers": 2, "batch_size": 16}
COPIES = {  # copy -> original
    "class1/img01_resized.png": "class1/img01.png",
    "class0/img02_recompressed.jpg": "class0/img02.jpg",
    "class2/img03_identical.png": "class2/img03.png",
    "class0/img04_resized.jpg": "class0/img04.jpg",
}


def photos_with_copies(root: Path) -> Path:
    """37 distinct generated pictures plus resized, recompressed and byte-identical copies.

    The recompressed copy is a JPEG saved again as JPEG (how copies usually arise). The fixture
    models project raw pixels and these pictures are mostly per-pixel noise, which a first JPEG
    encoding of a PNG smooths away: such a copy moves 0.13-0.18 of a typical neighbour distance
    here, where a CNN moves 0.003 (BENCHMARKS.md)."""
    make_images(root, per_class=12)
    original = Image.open(root / "class1/img01.png")
    original.resize((96, 80), Image.Resampling.LANCZOS).save(root / "class1/img01_resized.png")
    Image.open(root / "class0/img02.jpg").save(root / "class0/img02_recompressed.jpg", quality=85)
    shutil.copy(root / "class2/img03.png", root / "class2/img03_identical.png")
    Image.open(root / "class0/img04.jpg").resize((72, 60), Image.Resampling.BICUBIC).save(
        root / "class0/img04_resized.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photos_with_copies(tmp_path_factory.mktemp("dupes") / "photos")


@pytest.fixture(scope="module")
def weak(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Collection:
    folder = tmp_path_factory.mktemp("weak")
    return build(photos, folder / "col", model=make_weak_model(folder / "weak.onnx"), **OPTS)


@pytest.fixture(scope="module")
def good(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Collection:
    folder = tmp_path_factory.mktemp("good")
    return build(photos, folder / "col", model=make_model(folder / "good.onnx"), **OPTS)


@pytest.fixture(params=["weak", "good"])
def collection(request: pytest.FixtureRequest) -> Collection:
    return request.getfixturevalue(request.param)


def named_groups(col: Collection, groups: list[list[int]]) -> list[set[str]]:
    paths = {it.id: it.path for it in col.items}
    return [{paths[i] for i in g} for g in groups]


def test_the_weak_model_is_weak(weak: Collection) -> None:
    """The premise: with it every pair is above the old fixed 0.95, which then joins almost all."""
    v = np.asarray(weak.vectors)
    assert (v @ v.T).min() > DEFAULT_THRESHOLD
    assert group_sizes(weak.duplicates(DEFAULT_THRESHOLD), len(weak))["largest"] > 0.8 * len(weak)


def test_copies_group_with_their_original_and_nothing_else_is_one_big_group(collection: Collection) -> None:
    groups = named_groups(collection, collection.duplicates())
    for copy, original in COPIES.items():
        assert any({copy, original} <= g for g in groups), (copy, groups)
    sizes = group_sizes(groups, len(collection))
    assert sizes["largest"] <= 4 and sizes["in_groups"] <= 0.3 * len(collection), sizes


def test_the_default_threshold_adapts_to_the_model(collection: Collection) -> None:
    chosen = collection.duplicate_threshold()
    stats = collection.neighbour_stats()
    assert stats is not None and chosen.adaptive
    assert chosen.similarity == pytest.approx(max(DEFAULT_THRESHOLD, 1 - 0.1 * stats.typical_distance()))
    assert chosen.similarity > stats.typical_nearest()  # stricter than an ordinary nearest neighbour
    given = collection.duplicate_threshold(0.97)
    assert given.similarity == 0.97 and not given.adaptive and "as given" in given.reason


def stats_with_median_distance(distance: float) -> NeighbourStats:
    nearest = tuple(np.linspace(1 - 2 * distance, 1.0, LEVELS).tolist())  # the median is 1 - distance
    return NeighbourStats(500, nearest, tuple(v - distance for v in nearest))


def test_choose_threshold_scale_floor_override_and_none() -> None:
    weak = choose_threshold(stats_with_median_distance(0.01))
    assert weak.similarity == pytest.approx(0.999) and "adapted" in weak.reason
    good = choose_threshold(stats_with_median_distance(0.25))  # 1 - 0.025 = 0.975
    assert good.similarity == pytest.approx(0.975)
    loose = choose_threshold(stats_with_median_distance(0.6))  # 0.94 would be looser than the floor
    assert loose.similarity == DEFAULT_THRESHOLD and "floor" in loose.reason
    assert choose_threshold(None).similarity == DEFAULT_THRESHOLD
    assert choose_threshold(stats_with_median_distance(0.01), 0.9).similarity == 0.9


def chain(n: int, step: float, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors along a path, each one ``step`` radians from the last: neighbours are close,
    the ends far apart."""
    rng = np.random.default_rng(seed)
    a, b = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
    angles = step * np.arange(n)
    return (np.cos(angles)[:, None] * a + np.sin(angles)[:, None] * b).astype(np.float32)


def flat_searcher(x: np.ndarray, ids: np.ndarray) -> ann.Searcher:
    index, recipe = ann.build_index(x, ids, ann.Recipe("flat", "Flat"), use_gpu=False)
    return ann.Searcher(index, recipe.params, use_gpu=False)


def test_a_chain_is_cut_into_groups_of_bounded_spread() -> None:
    x = chain(60, step=0.05)  # consecutive cosine 0.99875; the ends are 3 radians apart
    ids = np.arange(500, 560, dtype=np.int64)
    threshold = 0.998
    groups = duplicate_groups(flat_searcher(x, ids), x, ids, threshold)
    assert len(groups) > 1 and all(len(g) < 60 for g in groups)
    assert sum(map(len, groups)) >= 50  # cut, not dissolved
    radius = 2 * (1 - threshold)
    for g in groups:
        v = x[np.asarray(g) - 500]
        sims = v @ v.T
        assert sims.max(axis=0).min() > 0  # sanity
        # some member (the centre) is within the radius of every other member
        assert (sims >= 1 - radius - 1e-6).all(axis=1).any()
    unlimited = duplicate_groups(flat_searcher(x, ids), x, ids, threshold, spread=float("inf"))
    assert unlimited == [list(range(500, 560))]  # plain connected components: one chain


def test_identical_files_group_whatever_their_vectors_say() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(20, dtype=np.int64)
    keys: list[str | None] = [f"h{i}" for i in range(20)]
    keys[4] = keys[15] = "same"
    keys[7] = None
    assert duplicate_groups(flat_searcher(x, ids), x, ids, 0.999) == []
    assert duplicate_groups(flat_searcher(x, ids), x, ids, 0.999, same_file=keys) == [[4, 15]]


def test_cli_says_which_threshold_and_why(weak: Collection, capsys: pytest.CaptureFixture[str]) -> None:
    col = weak
    assert main(["dupes", str(col.directory)]) == 0
    out, err = capsys.readouterr()
    assert "threshold 0.99" in err and "adapted to the model" in err and "the largest" in err
    assert "class2/img03.png  class2/img03_identical.png" in out
    assert main(["dupes", str(col.directory), "--threshold", "0.95", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "0.95, as given" in err and max(map(len, json.loads(out))) > 0.8 * len(col)
