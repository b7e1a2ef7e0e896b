"""A reader answers from one generation, completely, however many updates commit meanwhile.

The writer deletes rows removed two generations ago and files no longer named by the current
or the previous manifest, so a reader held open across two or more updates is exactly the case
that used to report the old length while searches came back short and thumbnails empty.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from indexer.build import build, update
from indexer.collection import Collection

from .conftest import COLORS, make_model, picture

OPTS = {"device": "cpu", "workers": 2, "batch_size": 8}


def _snapshot(col: Collection) -> dict:
    """Everything a reader can be asked, as plain values."""
    ids = [int(i) for i in col.ids]
    return {
        "len": len(col),
        "items": [(it.id, it.path, it.label) for it in col.items],
        "ids": ids,
        "vectors": np.asarray(col.vectors).copy(),
        "item": {i: col.item(i).path for i in ids},
        "vector": {i: col.vector(i).copy() for i in ids},
        "thumbnails": {i: col.thumbnail(i) for i in ids},
        "search_id": {i: [(h.id, h.path, round(h.score, 5)) for h in col.search_id(i, 5)] for i in ids},
        "search_vector": [(h.id, h.path) for h in col.search_vector(col.vector(ids[0]), len(ids))],
        "coords": col.coords().copy(),
        "skipped": col.skipped,
    }


def _assert_same(got: dict, want: dict) -> None:
    for key, value in want.items():
        if key in ("vectors", "coords"):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        elif key == "vector":
            assert set(got[key]) == set(value)
            for i, vec in value.items():
                np.testing.assert_array_equal(got[key][i], vec)
        else:
            assert got[key] == value, key


def _consistent(col: Collection) -> None:
    """Every view of a collection agrees with its length."""
    n = len(col)
    assert len(col.items) == len(col.ids) == np.asarray(col.vectors).shape[0] == n
    assert [it.id for it in col.items] == [int(i) for i in col.ids]
    assert all(col.thumbnail(int(i)) for i in col.ids)
    assert len(col.search_vector(col.vector(int(col.ids[0])), n)) == n
    for i in col.ids[:3]:
        assert len(col.search_id(int(i), n - 1)) == n - 1


def test_reader_held_across_updates_answers_from_its_generation(tmp_path, image_dir, tiny_model):
    old = build(image_dir, tmp_path / "col", model=tiny_model, **OPTS)
    before = _snapshot(old)
    removed = ["class0/img01.png", "class1/img02.jpg", "class2/img03.png"]
    # update 1: remove three files, add two, change one
    for path in removed:
        (image_dir / path).unlink()
    picture(901, COLORS[0]).save(image_dir / "class0" / "new1.png")
    picture(902, COLORS[1]).save(image_dir / "class1" / "new2.jpg")
    picture(903, COLORS[2]).save(image_dir / "class2" / "img00.jpg")
    update(tmp_path / "col", **OPTS).close()
    # update 2: remove more, add more; its commit deletes the rows update 1 removed
    (image_dir / "class1" / "img04.jpg").unlink()
    picture(904, COLORS[2]).save(image_dir / "class2" / "new3.png")
    newest = update(tmp_path / "col", **OPTS)
    # the rows the old reader needs are really gone from the file (so the test means something)
    conn = sqlite3.connect(tmp_path / "col" / "items.sqlite")
    paths = {r[0] for r in conn.execute("SELECT path FROM items")}
    conn.close()
    assert not set(removed) & paths
    # the old reader still answers everything from its generation, completely
    _assert_same(_snapshot(old), before)
    _consistent(old)
    assert old.reload() is not old
    # ... and a fresh reader sees the newest generation, just as completely
    _consistent(newest)
    assert {it.path for it in newest.items} == (
        {p for _, p, _ in before["items"]} - set(removed) - {"class1/img04.jpg"}
        | {"class0/new1.png", "class1/new2.jpg", "class2/new3.png"})
    assert newest.generation == old.generation + 2


def test_model_of_an_old_generation_loads_after_its_file_is_gone(tmp_path, image_dir, tiny_model):
    """Rebuilt with another model, twice committed since: the old reader still embeds queries
    with its own model (held open since it opened), and its searches still agree with its vectors."""
    old = build(image_dir, tmp_path / "col", model=tiny_model, **OPTS)
    other = make_model(tmp_path / "other.onnx", dim=8, seed=3)
    update(tmp_path / "col", model=other, rebuild=True, **OPTS).close()
    picture(77, COLORS[1]).save(image_dir / "class1" / "late.png")
    newest = update(tmp_path / "col", **OPTS)
    assert newest.dim == 8 and newest.manifest["model_file"] != old.manifest["model_file"]
    assert not (tmp_path / "col" / old.manifest["model_file"]).exists()  # deleted two commits later
    assert old.model.dim == 16
    hits = old.search_image(image_dir / "class2" / "img01.png", k=3)
    assert hits[0].path == "class2/img01.png" and len(hits) == 3
    assert newest.search_image(image_dir / "class2" / "img01.png", k=3)[0].path == "class2/img01.png"


def test_readers_opening_while_updates_commit_are_always_consistent(tmp_path, image_dir, tiny_model):
    build(image_dir, tmp_path / "col", model=tiny_model, **OPTS).close()
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for step in range(5):  # each update adds one file and removes the one the previous added
                picture(2000 + step, COLORS[step % 3]).save(image_dir / f"class{step % 3}" / f"w{step}.png")
                if step:
                    (image_dir / f"class{(step - 1) % 3}" / f"w{step - 1}.png").unlink()
                update(tmp_path / "col", **OPTS).close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer, daemon=True)  # a hung writer cannot hold pytest open
    thread.start()
    held: list[Collection] = []
    opened = 0
    deadline = time.monotonic() + 300  # five small updates take seconds; a hung writer fails here
    while not done.is_set() or opened < 3:
        assert time.monotonic() < deadline, "the updates did not finish within 300 s"
        col = Collection.open(tmp_path / "col", device="cpu")
        _consistent(col)
        held.append(col)  # kept open: each is checked again after all updates
        opened += 1
    thread.join(60)
    assert not thread.is_alive()
    assert not errors, errors
    generations = {col.generation for col in held}
    assert len(generations) >= 2, "the readers never overlapped a commit; the test proves nothing"
    for col in held:
        _consistent(col)


@pytest.mark.parametrize("closing", [True, False])
def test_closed_reader_lets_the_wal_fold_back(tmp_path, image_dir, tiny_model, closing):
    """The snapshot's documented cost: it pins the WAL only while the reader is open."""
    col = build(image_dir, tmp_path / "col", model=tiny_model, **OPTS)
    if closing:
        col.close()
    picture(3000, COLORS[0]).save(image_dir / "class0" / "wal.png")
    update(tmp_path / "col", **OPTS).close()
    wal = tmp_path / "col" / "items.sqlite-wal"
    if closing:  # the last connection folds the WAL into the main file and removes it
        assert not wal.exists() or wal.stat().st_size == 0
    else:
        assert wal.exists() and wal.stat().st_size > 0
        assert "class0/wal.png" not in {it.path for it in col.items}
        col.close()


def test_user_labels_are_read_fresh_by_an_open_reader(tmp_path, image_dir, tiny_model):
    col = build(image_dir, tmp_path / "col", model=tiny_model, **OPTS)
    other = Collection.open(tmp_path / "col")
    col.set_user_labels({"class0/img00.jpg": "cat"})
    assert other.user_labels() == {"class0/img00.jpg": "cat"}
