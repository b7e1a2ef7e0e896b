"""Curate page: a planted label mistake is shown and its suggestion can be accepted as a person's
label; the duplicates' choice leaves as CSV; every gallery opens an image's neighbours."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import curating
from indexer.build import build
from indexer.collection import Collection
from indexer.curate import report, stored
from tests.app.conftest import make_app, plain
from tests.indexer.conftest import make_images, make_model

CURATE = "views/curate.py"
PLANTED = "class1/planted.png"


@pytest.fixture()
def planted(tmp_path: Path) -> Path:
    """A collection where one class0 picture was also filed, as a copy, under class1."""
    images = make_images(tmp_path / "photos", per_class=8)
    shutil.copy(images / "class0" / "img01.png", images / PLANTED)
    out = tmp_path / "indexes" / "photos"
    build(images, out, model=make_model(tmp_path / "tiny.onnx"), device="cpu", progress=False).close()
    return out


def curate_app(collection: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    curating.forget()  # the score cache is per process; each test has its own collection
    at = make_app(collection, monkeypatch)
    at.switch_page(CURATE).run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> list[str]:
    return [plain(c.value).replace("**", "") for c in at.caption]


def test_the_planted_mistake_is_shown_and_its_suggestion_accepted(planted, monkeypatch):
    at = curate_app(planted, monkeypatch)
    assert [t.label for t in at.tabs] == ["Label mistakes", "Duplicates", "Outliers", "Representative"]
    shown = [c for c in captions(at) if "looks like" in c]
    mine = [c for c in shown if "planted.png" in c]
    assert mine and "labelled class1, looks like class0" in mine[0]
    with Collection.open(planted, device="cpu") as col:
        planted_id = next(it.id for it in col.items if it.path == PLANTED)
    at.button(key=f"curate:accept:{planted_id}").click().run()
    assert not at.exception, at.exception
    with Collection.open(planted, device="cpu") as col:
        assert col.user_labels() == {PLANTED: "class0"}
    assert any("your label: class0" in c for c in captions(at))


def test_duplicates_choice_leaves_as_csv_and_nothing_is_deleted(planted, monkeypatch):
    at = curate_app(planted, monkeypatch)
    boxes = [b for b in at.checkbox if b.key.startswith("curate:keepbox:")]
    assert len(boxes) >= 2
    boxes[1].uncheck().run()
    assert not at.exception, at.exception
    with Collection.open(planted, device="cpu") as col:
        groups = report(col, stored(col))["duplicate_groups"]
    exact = next(g for g in groups if {m["path"] for m in g} >= {PLANTED, "class0/img01.png"})
    keep = {int(b.key.rsplit(":", 1)[1]): b.value for b in at.checkbox if b.key.startswith("curate:keepbox:")}
    rows = list(csv.DictReader(io.StringIO(curating.duplicates_csv(groups, keep))))
    assert {r["path"] for r in rows} >= {PLANTED, "class0/img01.png"}
    assert {r["exact_copy"] for r in rows if r["path"] in {m["path"] for m in exact}} == {"yes"}
    assert sum(r["keep"] == "no" for r in rows) == 1
    assert (planted.parent.parent / "photos" / PLANTED).is_file(), "the app never deletes a file"


def test_an_outlier_opens_its_neighbours(planted, monkeypatch):
    at = curate_app(planted, monkeypatch)
    button = next(b for b in at.button if b.key.startswith("curate:outliers:open:"))
    button.click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Neighbours"


def test_paging_and_label_filter():
    rows = [{"id": i, "path": f"{'a' if i % 2 else 'b'}/{i}.png"} for i in range(30)]
    labels = {r["path"]: r["path"][0] for r in rows}
    assert [r["id"] for r in curating.page(rows, 3)] == list(range(24, 30))
    assert curating.page(rows, 99) == curating.page(rows, 3)
    assert curating.page_count(0) == 1 and curating.page_count(25) == 3
    only_a = curating.with_label(rows, labels, ["a"])
    assert only_a and all(r["path"].startswith("a/") for r in only_a)
    assert curating.with_label(rows, labels, []) == rows
