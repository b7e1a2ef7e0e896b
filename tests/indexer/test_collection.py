"""Build, update, search, crash safety, writer lock, shard + merge, and the Collection API.

Every test builds tiny collections from generated pictures with the fixture model of conftest
(no torch, no training), so the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer import store
from indexer.build import NothingIndexed, build, update
from indexer.collection import Collection
from indexer.embed import EmbeddingModel
from indexer.merge import merge

from .conftest import COLORS, add_bad_files, make_model, picture

OPTS = {"device": "cpu", "workers": 2, "batch_size": 8}


def _build(image_dir: Path, out: Path, model: Path, **kw: object) -> Collection:
    return build(image_dir, out, model=model, **{**OPTS, **kw})


def _paths(col: Collection) -> dict[str, int]:
    return {it.path: it.id for it in col.items}


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def test_build_records_every_bad_file_and_indexes_the_rest(tmp_path, image_dir, tiny_model):
    expected = add_bad_files(image_dir)
    col = _build(image_dir, tmp_path / "col", tiny_model)
    assert len(col) == 19  # 3 classes x 6 + loose.jpg
    reasons = {s["path"]: s["reason"] for s in col.skipped}
    assert set(reasons) == set(expected)
    for path, want in expected.items():
        assert reasons[path] in want.split("|"), path
    assert all(s["error"] for s in col.skipped)
    summary = col.summary
    assert summary.indexed == 19 and summary.skipped == len(expected)
    assert sum(summary.skipped_by_reason.values()) == len(expected)
    m = col.manifest
    assert m["counts"]["indexed"] == 19 and m["index"]["recipe"]["recall_at_10"] == 1.0
    assert (tmp_path / "col" / "model.onnx").is_file()
    # thumbnails: small JPEGs for every indexed item
    for item in col.items:
        thumb = Image.open(io.BytesIO(col.thumbnail(item.id)))
        assert item.width == 48 and item.height == 40
        assert thumb.format == "JPEG" and thumb.size == (96, 80)  # small files enlarged 2x, pixel for pixel
    labels = {it.path: it.label for it in col.items}
    assert labels["class1/img00.jpg"] == "class1" and labels["loose.jpg"] is None


def test_vectors_match_the_query_path_and_exact_search_is_brute_force(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    model = EmbeddingModel(tiny_model, device="cpu")
    vectors, ids = np.asarray(col.vectors), col.ids
    assert vectors.shape == (len(col), 16) and list(ids) == sorted(ids)
    for item, vec in zip(col.items, vectors):
        np.testing.assert_allclose(vec, model.embed_image(image_dir / item.path), atol=1e-5)
    for item in col.items[:5]:
        query = model.embed_image(image_dir / item.path)
        hits = col.search_vector(query, k=7)
        order = np.argsort(-(vectors @ query), kind="stable")[:7]
        np.testing.assert_allclose([h.score for h in hits], (vectors @ query)[order], atol=1e-5)
        assert hits[0].id == item.id and hits[0].path == item.path
        image_hits = col.search_image(Image.open(image_dir / item.path), k=3)
        assert image_hits[0].id == item.id


def test_nothing_indexed_raises(tmp_path, tiny_model):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_bytes(b"not a png")
    with pytest.raises(NothingIndexed, match="no image could be indexed"):
        _build(root, tmp_path / "col", tiny_model)
    assert not (tmp_path / "col" / "manifest.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NothingIndexed, match="no image files"):
        _build(empty, tmp_path / "col2", tiny_model)


# ----------------------------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------------------------


def test_update_adds_changes_and_removes(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    before = _paths(col)
    old_vectors = {p: col.vector(i).copy() for p, i in before.items()}
    # added, modified (new content), deleted, and touched (same bytes, new mtime)
    picture(4242, COLORS[2]).save(image_dir / "class2" / "new.png")
    picture(777, COLORS[0]).save(image_dir / "class0" / "img00.jpg")
    (image_dir / "class1" / "img03.png").unlink()
    touched = image_dir / "class1" / "img01.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))

    new = update(col.directory, **OPTS)
    after = _paths(new)
    assert new.summary.embedded == 2 and new.summary.removed == 1
    assert set(after) == set(before) - {"class1/img03.png"} | {"class2/new.png"}
    assert after["class0/img00.jpg"] != before["class0/img00.jpg"]  # changed content -> new item
    assert after["class1/img01.png"] == before["class1/img01.png"]  # touched only -> same id
    for path, item_id in after.items():
        if path not in ("class0/img00.jpg", "class2/new.png"):
            assert item_id == before[path]
            np.testing.assert_array_equal(new.vector(item_id), old_vectors[path])
    model = EmbeddingModel(tiny_model, device="cpu")
    q = model.embed_image(image_dir / "class2" / "new.png")
    assert new.search_vector(q, 1)[0].path == "class2/new.png"
    assert len(new) == len(col)  # one added, one removed
    # the old reader still sees its generation, consistently
    assert _paths(col) == before and col.search_id(before["class1/img03.png"], 2)
    assert new.manifest["generation"] == col.generation + 1
    # a second update with nothing changed embeds nothing and keeps everything
    again = update(new.directory, **OPTS)
    assert again.summary.embedded == 0 and _paths(again) == after


def test_different_model_needs_rebuild(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    other = make_model(tmp_path / "other.onnx", dim=8, seed=3)
    with pytest.raises(store.CollectionError, match="--rebuild"):
        update(col.directory, model=other, **OPTS)
    rebuilt = update(col.directory, model=other, rebuild=True, **OPTS)
    assert rebuilt.dim == 8 and len(rebuilt) == len(col)
    assert np.asarray(rebuilt.vectors).shape == (len(col), 8)
    assert rebuilt.model.dim == 8
    assert col.search_id(col.ids[0], 3)  # the old generation still answers with its model


# ----------------------------------------------------------------------------------------------
# Crash safety and the writer lock
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["rows-removed", "vectors-written", "index-written", "projection-written",
                                  "manifest-written"])
def test_crash_between_write_steps_leaves_a_readable_collection(tmp_path, image_dir, tiny_model, monkeypatch, step):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    before = _paths(col)
    picture(31337, COLORS[1]).save(image_dir / "class1" / "added.jpg")
    (image_dir / "class0" / "img02.jpg").unlink()
    monkeypatch.setattr(store, "CRASH_AT", step)
    with pytest.raises(store.SimulatedCrash):
        update(col.directory, **OPTS)
    reopened = Collection.open(tmp_path / "col", device="cpu")
    expected = dict(before)
    if step == "manifest-written":  # the commit happened just before the crash
        expected.pop("class0/img02.jpg")
        assert set(_paths(reopened)) == set(expected) | {"class1/added.jpg"}
    else:
        assert _paths(reopened) == expected
    assert len(reopened) == len(reopened.items) == len(reopened.ids)
    assert np.asarray(reopened.vectors).shape == (len(reopened), 16)
    assert reopened.search_id(reopened.ids[0], 3)
    # the next writer repairs what the crashed one left and finishes the job
    monkeypatch.setattr(store, "CRASH_AT", None)
    done = update(reopened.directory, **OPTS)
    assert set(_paths(done)) == set(before) - {"class0/img02.jpg"} | {"class1/added.jpg"}
    ref = _build(image_dir, tmp_path / "fresh", tiny_model)
    ref_vec = {it.path: v for it, v in zip(ref.items, np.asarray(ref.vectors))}
    for it, v in zip(done.items, np.asarray(done.vectors)):
        np.testing.assert_allclose(v, ref_vec[it.path], atol=1e-6)


def test_killed_process_leaves_previous_collection(tmp_path, image_dir, tiny_model):
    """A real kill (os._exit at a crash point, no cleanup at all) in the middle of an update."""
    col = _build(image_dir, tmp_path / "col", tiny_model)
    before = _paths(col)
    picture(99, COLORS[0]).save(image_dir / "class0" / "late.png")
    env = {**os.environ, "INDEXER_CRASH_AT": "index-written", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-m", "indexer", "update", str(tmp_path / "col"), "--device", "cpu",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    assert _paths(Collection.open(tmp_path / "col")) == before
    after = update(tmp_path / "col", **OPTS)
    assert "class0/late.png" in _paths(after)


def test_second_writer_is_refused(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    with store.WriterLock(tmp_path / "col"):
        with pytest.raises(store.CollectionLocked, match="being written by pid"):
            update(col.directory, **OPTS)
        # readers keep working while the lock is held
        assert len(Collection.open(tmp_path / "col")) == len(col)
    assert update(col.directory, **OPTS).summary.embedded == 0  # the lock is free again


def test_newer_format_is_refused(tmp_path, image_dir, tiny_model):
    _build(image_dir, tmp_path / "col", tiny_model)
    manifest = json.loads((tmp_path / "col" / "manifest.json").read_text())
    manifest["format_version"] = store.FORMAT_VERSION + 1
    (tmp_path / "col" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.CollectionError, match="newer"):
        Collection.open(tmp_path / "col")


# ----------------------------------------------------------------------------------------------
# Shards and merge
# ----------------------------------------------------------------------------------------------


def test_shard_and_merge_equal_a_single_build(tmp_path, image_dir, tiny_model):
    add_bad_files(image_dir)
    single = _build(image_dir, tmp_path / "single", tiny_model)
    parts = [_build(image_dir, tmp_path / f"part{i}", tiny_model, shard=(i, 3)) for i in range(3)]
    assert sum(len(p) for p in parts) == len(single)
    assert all(len(p) > 0 for p in parts)
    with pytest.raises(store.CollectionError, match="missing"):
        merge([tmp_path / "part0", tmp_path / "part1"], tmp_path / "bad", device="cpu")
    merged = merge([tmp_path / f"part{i}" for i in range(3)], tmp_path / "merged", device="cpu")
    assert _paths(merged) == _paths(single)
    assert {s["path"]: s["reason"] for s in merged.skipped} == {s["path"]: s["reason"] for s in single.skipped}
    np.testing.assert_allclose(np.asarray(merged.vectors), np.asarray(single.vectors), atol=1e-6)
    for item_id in single.ids[:5]:
        assert [h.id for h in merged.search_id(item_id, 5)] == [h.id for h in single.search_id(item_id, 5)]
    assert merged.thumbnail(merged.ids[0]) == single.thumbnail(single.ids[0])


# ----------------------------------------------------------------------------------------------
# API, analysis
# ----------------------------------------------------------------------------------------------


def test_api_search_id_coords_duplicates_and_eval(tmp_path, image_dir, tiny_model):
    shutil.copy(image_dir / "class2" / "img01.png", image_dir / "class2" / "copy_of_img01.png")
    import indexer

    col = indexer.Collection.open(_build(image_dir, tmp_path / "col", tiny_model).directory, device="cpu")
    assert len(col) == 20 and len(col.items) == 20
    ids = _paths(col)
    hits = col.search_id(ids["class2/img01.png"], 3)
    assert ids["class2/img01.png"] not in [h.id for h in hits]
    assert hits[0].path == "class2/copy_of_img01.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.to_json()["path"] for h in hits][0] == "class2/copy_of_img01.png"
    coords = col.coords()
    assert coords.shape == (20, 2) and np.isfinite(coords).all()
    groups = col.duplicates(0.999)
    assert [sorted(col.item(i).path for i in g) for g in groups] == [["class2/copy_of_img01.png",
                                                                     "class2/img01.png"]]
    result = col.evaluate()
    assert result["classes"] == 3 and 0.0 <= result["knn_top1"] <= 1.0
    assert {"few_label_1pct", "few_label_10pct", "linear_top1"} <= set(result)
    assert col.reload() is col


def test_readers_see_the_new_version_after_a_build(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    picture(5, COLORS[1]).save(image_dir / "extra.png")
    update(tmp_path / "col", **OPTS)
    fresh = col.reload()
    assert fresh is not col and len(fresh) == len(col) + 1


def test_many_updates_compact_the_vectors_files(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    for i in range(10):
        picture(5000 + i, COLORS[i % 3]).save(image_dir / f"class{i % 3}" / f"more{i}.png")
        col = update(col.directory, **OPTS)
        assert len(col.manifest["vectors"]) <= 8
    for i in range(6):  # removing many items also compacts
        (image_dir / f"class{i % 3}" / f"more{i}.png").unlink()
    col = update(col.directory, **OPTS)
    assert len(col) == 19 + 4
    files = {p.name for p in (tmp_path / "col").iterdir() if p.name.startswith("vectors-")}
    assert len(files) <= 2 * 8  # old files are deleted once two generations old
    model = EmbeddingModel(tiny_model, device="cpu")
    for item, vec in zip(col.items, np.asarray(col.vectors)):
        np.testing.assert_allclose(vec, model.embed_image(image_dir / item.path), atol=1e-5)


def test_user_labels_are_set_in_bulk_cleared_and_survive_an_update(tmp_path, image_dir, tiny_model):
    col = _build(image_dir, tmp_path / "col", tiny_model)
    paths = [it.path for it in col.items][:3]
    col.set_user_labels({paths[0]: "cat", paths[1]: "dog", paths[2]: "cat"})
    col.set_user_labels({paths[1]: None, paths[2]: "bird"})
    assert col.user_labels() == {paths[0]: "cat", paths[2]: "bird"}
    reopened = update(col.directory, device="cpu")
    assert reopened.user_labels() == {paths[0]: "cat", paths[2]: "bird"}
