"""Every page that shows a collection says how good its model measured itself to be at training
time (`moco.quality`, through app.components.quality_banner): a warning when it is no better
than its random start, a caption with the monitor's numbers otherwise, a note when nothing was
measured; the Few labels page shows the random-network baseline beside its accuracy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import components, demo
from app.views import demo as demo_page
from tests.app.conftest import QUALITY, make_app, plain

PAGES = ["views/neighbours.py", "views/map.py", "views/few_labels.py", "views/collection.py"]
WARNING = "Careful: the model is the untrained random network its training started from"
CAPTION = "Model quality at training time: kNN top-1 on the training monitor: learned: 0.243 -> 0.471"
NOT_MEASURED = "Model quality not measured: the model records no quality"


def open_page(collection: Path, page: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    at = make_app(collection, monkeypatch)
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def read(markdown: str) -> str:
    """Markdown as a person reads it: no escapes, no bold markers."""
    return plain(markdown).replace("**", "")


def banners(at: AppTest) -> dict[str, list[str]]:
    """The page's quality banners by kind, as read."""
    return {"warning": [read(w.value) for w in at.warning if "Careful:" in w.value],
            "caption": [read(c.value) for c in at.caption if c.value.startswith("Model quality at training time")],
            "info": [read(i.value) for i in at.info if i.value.startswith("Model quality not measured")]}


@pytest.mark.parametrize("page", PAGES)
def test_each_page_warns_about_a_model_no_better_than_its_start(page: str, quality_collections: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    found = banners(open_page(quality_collections["not_learned"], page, monkeypatch))
    assert len(found["warning"]) == 1 and not found["caption"] and not found["info"], found
    text = found["warning"][0]
    assert text.startswith(WARNING)
    assert "random start 0.433, shipped 0.433 (the random start; final 0.385)" in text
    assert "what an untrained network gives" in text


@pytest.mark.parametrize("page", PAGES)
def test_each_page_captions_a_model_that_learned(page: str, quality_collections: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    found = banners(open_page(quality_collections["learned"], page, monkeypatch))
    assert len(found["caption"]) == 1 and not found["warning"] and not found["info"], found
    assert found["caption"][0].startswith(CAPTION) and QUALITY["learned"]["monitor"] in found["caption"][0]


@pytest.mark.parametrize("page", PAGES)
def test_each_page_says_when_quality_was_not_measured(page: str, quality_collections: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    found = banners(open_page(quality_collections["unmeasured"], page, monkeypatch))
    assert len(found["info"]) == 1 and not found["warning"] and not found["caption"], found
    assert found["info"][0].startswith(NOT_MEASURED) and "--val" in found["info"][0]


def _evaluate(collection: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    at = open_page(collection, "views/few_labels.py", monkeypatch)
    next(b for b in at.button if b.label == "Evaluate").click().run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize(("verdict", "shipped", "delta", "verdict_words"), [
    ("not_learned", "43.3%", "+0.0 points vs the random network (43.3%)", "Training did not beat the random start"),
    ("learned", "47.1%", "+22.8 points vs the random network (24.3%)", "this page's own measure"),
])
def test_few_labels_shows_the_random_network_baseline(verdict: str, shipped: str, delta: str, verdict_words: str,
                                                      quality_collections: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    at = _evaluate(quality_collections[verdict], monkeypatch)
    headline, baseline = at.metric
    assert headline.label.startswith("Accuracy on the remaining images")
    assert baseline.label == "Trainer's kNN monitor: shipped model"
    assert (baseline.value, baseline.delta) == (shipped, delta)
    caption = next(read(c.value) for c in at.caption if c.value.startswith("Baseline measured at training time"))
    assert f"gave the random network {QUALITY[verdict]['start']:.1%} and the shipped model" in caption
    assert "kNN top-1 monitor on its validation images" in caption and "not by this page" in caption
    assert verdict_words in caption


def test_few_labels_says_when_there_is_no_baseline(quality_collections: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    at = _evaluate(quality_collections["unmeasured"], monkeypatch)
    assert len(at.metric) == 1  # the page's own accuracy only: no number is made up
    assert any(c.value.startswith("No random-network baseline was measured") for c in at.caption)


def test_collection_page_lists_the_quality_in_its_model_table(quality_collections: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(quality_collections["not_learned"], "views/collection.py", monkeypatch)
    table = at.table[0]
    rows = {plain(k).strip("*"): plain(v) for k, v in table.value.itertuples(index=False)}
    assert rows["training quality"].endswith("not better than the random start")
    assert rows["quality monitor"] == QUALITY["not_learned"]["monitor"]
    assert table.proto.hide_header  # property names in bold instead of an empty header row


def test_demo_says_when_its_training_did_not_learn(tmp_path: Path, quality_collections: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After the demo's build, a model no better than its random start is named, with how to train
    longer; the note also goes into the banner of the page the app opens next."""
    paths = demo.DemoPaths(tmp_path)
    shutil.copytree(quality_collections["not_learned"], paths.collection)
    note = demo_page.not_learned_note(paths, 150)
    assert note is not None
    assert "150 s training did not beat its random start" in plain(note)
    assert "--demo-train-seconds 600" in note and "python -m app.demo --train-seconds 600" in note

    at = make_app(paths.collection, monkeypatch)
    at.session_state[components.QUALITY_NOTE] = (str(paths.collection.resolve()), note)
    at.run()
    assert not at.exception, at.exception
    (warning,) = banners(at)["warning"]
    assert "150 s training did not beat its random start" in warning

    learned = demo.DemoPaths(tmp_path / "learned")
    shutil.copytree(quality_collections["learned"], learned.collection)
    assert demo_page.not_learned_note(learned, 150) is None
