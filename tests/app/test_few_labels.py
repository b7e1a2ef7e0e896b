"""Tests for the Few-label page (AppTest on the session's small collection) and its helpers.

Tests that write labels work on a copy of the collection: the fixture is shared by every app test
of the session, and user labels live in its items.sqlite.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Button

from app import fewlabels
from indexer import fewlabel
from indexer.build import build
from indexer.collection import Collection
from indexer.fewlabel import LabelBudget
from tests.app.conftest import PER_CLASS, make_app, plain
from tests.indexer.conftest import make_images, make_model

PAGE = "views/few_labels.py"
SUGGESTIONS = 8  # the page's default number of suggestions


def open_page(collection: Path, monkeypatch: pytest.MonkeyPatch, mode: str | None = None) -> AppTest:
    at = make_app(collection, monkeypatch)
    at.run()
    at.switch_page(PAGE)
    at.run()
    if mode is not None:
        at.radio[0].set_value(mode).run()
    assert not at.exception, at.exception
    return at


def copy_collection(collection_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "photos"
    shutil.copytree(collection_dir, target)
    return target


def button(at: AppTest, label: str) -> Button:
    return next(b for b in at.button if b.label == label)


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(node.proto.spec) for node in at.get("plotly_chart")]


def array(value: object) -> np.ndarray:
    """A plotly data field: a list, or the base64 typed array plotly writes for numpy input."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in str(value.get("shape", flat.size)).split(",")])
    return np.asarray(value)


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


# ---------------------------------------------------------------------------------------------
# Evaluation mode
# ---------------------------------------------------------------------------------------------


def test_evaluation_shows_accuracy_curve_confusion_and_mistakes(collection_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(collection_dir, monkeypatch)
    assert at.radio[0].value == "Evaluate with folder labels"
    assert not at.metric  # nothing is trained before the user asks
    budget_box = next(s for s in at.selectbox if s.label == "Labels per class")
    budget_box.set_value(LabelBudget(per_class=2))
    next(s for s in at.selectbox if s.label == "Classifier").set_value("logreg")
    at.number_input[0].set_value(2)
    button(at, "Evaluate").click().run()
    assert not at.exception, at.exception

    # The headline is exactly what indexer.fewlabel computes on the same vectors.
    with Collection.open(collection_dir) as collection:
        labels = [it.label for it in collection.items]
        rows = [i for i, lab in enumerate(labels) if lab]
        names = sorted({labels[i] for i in rows})
        y = np.array([names.index(labels[i]) for i in rows])
        runs = fewlabel.few_label_predictions(collection.vectors[rows], y, budget=LabelBudget(per_class=2),
                                              seeds=(0, 1), classifier="logreg")
    expected = np.mean([r.accuracy for r in runs])
    assert [m.value for m in at.metric] == [f"{expected:.1%}"]
    assert "2 per class" in at.metric[0].label
    assert "over 2 seeds" in captions(at) and "6 images labelled, 30 classified" in captions(at)

    specs = plotly_specs(at)
    assert len(specs) == 2
    curve, heatmap = specs
    assert [t["name"] for t in curve["data"]] == ["logistic regression"]
    xs = array(curve["data"][0]["x"]).tolist()
    assert xs == sorted(xs) and len(xs) >= 4  # distinct budgets, left to right
    assert "error_y" in curve["data"][0]
    assert heatmap["data"][0]["type"] == "heatmap"
    counts = array(heatmap["data"][0]["text"])
    assert counts.shape == (3, 3) and counts.sum() == 2 * 30  # pooled over both seeds

    per_class = at.dataframe[0].value
    assert per_class["class"].tolist() == ["class0", "class1", "class2"]
    assert per_class["tested"].tolist() == [10, 10, 10]
    # The gallery shows the first seed's mistakes, each with its true and predicted folder.
    first = runs[0]
    wrong = {(names[t], names[p]) for t, p in zip(first.truth, first.pred) if t != p}
    tiles = [c.value for c in at.caption if c.value.startswith("true **")]
    assert len(tiles) == min(int((first.truth != first.pred).sum()), 15)
    assert {tuple(part.split("**")[1] for part in tile.split("\n")) for tile in tiles} == wrong
    if not wrong:
        assert "No mistakes" in captions(at)

    # A visit to the other mode keeps the settings and the result.
    at.radio[0].set_value("Label interactively").run()
    assert not at.metric
    at.radio[0].set_value("Evaluate with folder labels").run()
    assert [m.value for m in at.metric] == [f"{expected:.1%}"]
    assert next(s for s in at.selectbox if s.label == "Classifier").value == "logreg"


def test_evaluation_compares_classifiers_and_is_cached(collection_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("few_label_predictions", "accuracy_curve"):
        original = getattr(fewlabel, name)

        def counted(*args: object, _original=original, _name=name, **kwargs: object) -> object:
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fewlabel, name, counted)
    at = open_page(collection_dir, monkeypatch)
    assert calls == []
    next(s for s in at.selectbox if s.label == "Classifier").set_value("label_propagation")
    at.checkbox[0].check()
    button(at, "Evaluate").click().run()
    assert not at.exception, at.exception
    curve = plotly_specs(at)[0]
    assert [t["name"] for t in curve["data"]] == ["weighted kNN", "logistic regression", "label propagation"]
    assert calls[0] == "few_label_predictions" and calls.count("accuracy_curve") == 1
    trained = len(calls)
    first = at.metric[0].value
    at.run()  # any rerun redraws from the cache, with the same numbers and no training
    assert at.metric[0].value == first and len(plotly_specs(at)) == 2
    assert len(calls) == trained


def test_one_folder_class_offers_only_interactive_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_images(tmp_path / "photos", per_class=3)
    for extra in ("class1", "class2"):
        shutil.rmtree(images / extra)
    out = tmp_path / "one-class"
    build(images, out, model=make_model(tmp_path / "tiny.onnx"), device="cpu", progress=False).close()
    at = open_page(out, monkeypatch)
    assert not at.radio and not at.metric
    assert any("Fewer than two folder labels" in i.value for i in at.info)
    assert len(at.text_input) == 4  # every image suggested: 3 in class0 plus the loose one


# ---------------------------------------------------------------------------------------------
# Interactive mode
# ---------------------------------------------------------------------------------------------


def suggested_paths(at: AppTest, collection: Path) -> list[str]:
    """The paths of the suggested images, from the item ids in their text inputs' keys."""
    ids = [int(t.key.split(":")[2]) for t in at.text_input]
    with Collection.open(collection) as opened:
        return [opened.item(i).path for i in ids]


def test_typed_labels_are_saved_in_the_collection(collection_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_collection(collection_dir, tmp_path)
    at = open_page(copy, monkeypatch, "Label interactively")
    suggested = suggested_paths(at, copy)
    assert len(suggested) == SUGGESTIONS and len(set(suggested)) == SUGGESTIONS
    assert {p.split("/")[0] for p in suggested if "/" in p} == {"class0", "class1", "class2"}  # spread out
    assert any("at least two classes" in i.value for i in at.info)
    assert not at.download_button

    at.text_input[0].input("first")
    at.text_input[1].input(" second ")
    button(at, "Save labels").click().run()
    assert not at.exception, at.exception
    assert any("Saved 2 labels" in s.value for s in at.success)
    expected = {suggested[0]: "first", suggested[1]: "second"}
    with Collection.open(copy) as reopened:
        assert reopened.user_labels() == expected
    # The labelled images are no longer suggested, and two classes are enough to classify.
    assert not set(expected) & set(suggested_paths(at, copy))
    assert at.dataframe and at.download_button
    table = at.dataframe[0].value.set_index("path")
    assert set(table["predicted_label"]) <= {"first", "second"}
    assert table.loc[suggested[0], "user_label"] == "first"
    assert table.loc[suggested[0], "predicted_label"] == "first"

    # A fresh session (a reload) finds the labels in the collection.
    again = open_page(copy, monkeypatch, "Label interactively")
    assert "first (1)" in captions(again) and again.download_button


def test_the_grid_holds_still_until_saved_and_each_label_lands_on_its_image(
        collection_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17.7: labels changing under the grid (an import here; a save by Enter before) must
    not move the images under the boxes, and every label typed is stored on its box's image."""
    copy = copy_collection(collection_dir, tmp_path)
    at = open_page(copy, monkeypatch, "Label interactively")
    shown = suggested_paths(at, copy)
    with Collection.open(copy) as opened:
        other = next(it.path for it in opened.items if it.path not in shown)
    at.file_uploader[0].set_value(("one.csv", f"path,label\n{other},imported\n".encode(), "text/csv")).run()
    assert not at.exception, at.exception
    assert suggested_paths(at, copy) == shown  # the labels changed, the grid did not

    at.run()  # any other rerun keeps it too
    assert suggested_paths(at, copy) == shown
    for n, box in enumerate(at.text_input):
        box.input(f"label-{n}")
    button(at, "Save labels").click().run()
    assert not at.exception, at.exception
    with Collection.open(copy) as reopened:
        assert reopened.user_labels() == {other: "imported", **{p: f"label-{n}" for n, p in enumerate(shown)}}
    after = suggested_paths(at, copy)  # a save brings new images, none of those just labelled
    assert after and not set(after) & set(shown) and other not in after
    assert all(t.value == "" for t in at.text_input)


def test_enter_in_a_label_box_does_not_submit(collection_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Enter in a box would save at once and bring the next grid under the person's cursor."""
    at = open_page(collection_dir, monkeypatch, "Label interactively")
    forms = at.get("form")
    assert len(forms) == 1 and forms[0].proto.form.enter_to_submit is False


def test_classification_table_filters_and_download(collection_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_collection(collection_dir, tmp_path)
    with Collection.open(copy) as collection:
        by_class = {it.path: it.label for it in collection.items}
        for cls in ("class0", "class1", "class2"):
            for path in [p for p, lab in by_class.items() if lab == cls][:2]:
                collection.set_user_label(path, cls.replace("class", "c"))
    at = open_page(copy, monkeypatch, "Label interactively")
    assert not at.exception, at.exception
    assert "c0 (2)" in captions(at)
    table = at.dataframe[0].value
    assert len(table) == 3 * PER_CLASS + 1 and list(table.columns) == list(fewlabels.CSV_COLUMNS)
    assert ((table["confidence"] >= 0) & (table["confidence"] <= 1)).all()
    labelled = table[table["path"].map(by_class).notna()]
    truth = labelled["path"].map(by_class).str.replace("class", "c")
    assert (labelled["predicted_label"] == truth).mean() > 0.8  # the tiny model separates the colours
    assert at.download_button[0].label == "Download CSV"

    at.multiselect[0].select("c1").run()
    assert set(at.dataframe[0].value["predicted_label"]) == {"c1"}
    at.slider[0].set_value(1.0).run()
    assert len(at.dataframe[0].value) < len(table)
    assert f"of {len(table)} images" in captions(at)

    at.selectbox[0].set_value("logreg").run()
    assert not at.exception, at.exception


def test_csv_import_reports_unknown_paths_and_bad_files(collection_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_collection(collection_dir, tmp_path)
    at = open_page(copy, monkeypatch, "Label interactively")
    at.file_uploader[0].set_value(("labels.csv", b"\x89PNG\r\n\x1a\n\x00\x00binary", "text/csv")).run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and plain(at.error[0].value).startswith("Cannot import labels.csv:")

    good = b"path,label\nclass0/img00.jpg,red\nclass1/img01.png,green\nnope/missing.jpg,blue\n"
    at.file_uploader[0].set_value(("good.csv", good, "text/csv")).run()
    assert not at.exception, at.exception
    assert not at.error
    message = " ".join(plain(s.value) for s in at.success)
    assert "Imported 2 labels" in message and "1 path not in the collection (e.g. nope/missing.jpg)" in message
    with Collection.open(copy) as reopened:
        assert reopened.user_labels() == {"class0/img00.jpg": "red", "class1/img01.png": "green"}
    assert at.download_button  # two classes now: the collection is classified

    at.file_uploader[0].set_value(("none.csv", b"path,label\nelsewhere/a.jpg,x\n", "text/csv")).run()
    assert plain(at.warning[0].value) == ("Imported 0 labels. 1 path not in the collection (e.g. elsewhere/a.jpg) "
                                          "skipped.")

    at.file_uploader[0].set_value(("wrong.csv", b"file,class\na,b\n", "text/csv")).run()
    assert plain(at.error[0].value) == "Cannot import wrong.csv: the header must name the columns path and label " \
                                "(found: file, class)"


# ---------------------------------------------------------------------------------------------
# Helpers (no AppTest)
# ---------------------------------------------------------------------------------------------


def test_parse_label_csv() -> None:
    data = "\ufeffLabel, Path ,note\ncat,a/1.jpg,x\n,a/2.jpg,\ndog,,\nbird,b/3.jpg\nshort\n".encode()
    assert fewlabels.parse_label_csv(data) == [("a/1.jpg", "cat"), ("b/3.jpg", "bird")]
    for bad in (b"", b"\xff\xfe\x00a", b"a,b\n1,2\n", b"path;label\nx;y\n"):
        with pytest.raises(fewlabels.LabelCsvError):
            fewlabels.parse_label_csv(bad)


def test_normalise_path(tmp_path: Path) -> None:
    assert fewlabels.normalise_path("a\\b\\c.jpg", tmp_path) == "a/b/c.jpg"
    assert fewlabels.normalise_path("./a/c.jpg", tmp_path) == "a/c.jpg"
    assert fewlabels.normalise_path(str(tmp_path / "x" / "y.png"), tmp_path) == "x/y.png"
    assert fewlabels.normalise_path("/elsewhere/y.png", tmp_path) == "/elsewhere/y.png"


def test_budgets_and_predictions_csv() -> None:
    budgets = fewlabels.budgets_for([12, 30, 40])
    assert [b.name for b in budgets] == ["1 per class", "2 per class", "5 per class", "10 per class", "1%", "10%"]
    assert fewlabels.labelled_count(LabelBudget(fraction=0.1), [12, 30, 40]) == 1 + 3 + 4
    distinct = fewlabels.distinct_budgets(budgets, [12, 30, 40])
    assert [b.name for b in distinct] == ["1 per class", "2 per class", "10%", "5 per class", "10 per class"]
    frame = pd.DataFrame({"id": [1, 2], "path": ["a.jpg", "b.jpg"], "predicted_label": ["x", "y"],
                          "confidence": [0.51234, 1.0], "user_label": ["", "y"]})
    assert fewlabels.predictions_csv(frame).decode().splitlines() == [
        "path,predicted_label,confidence,user_label", "a.jpg,x,0.5123,", "b.jpg,y,1.0000,y"]
    assert fewlabels.filter_predictions(frame, [], 0.6)["path"].tolist() == ["b.jpg"]
    assert fewlabels.filter_predictions(frame, ["x"], 0.0)["path"].tolist() == ["a.jpg"]
