"""Fixtures for the app tests: a small real collection (tiny ONNX model, generated pictures) and
an AppTest pointed at it.

The collection is built once per test session with the indexer itself, so pages are tested
against exactly what ``python -m indexer build`` writes (thumbnails, projection, labels).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from indexer.build import build
from tests.indexer.conftest import make_images, make_model

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
PER_CLASS = 12


@pytest.fixture(scope="session")
def collection_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class collection of 36 labelled pictures plus one unlabelled one."""
    base = tmp_path_factory.mktemp("app-collection")
    images = make_images(base / "photos", per_class=PER_CLASS)
    model = make_model(base / "tiny.onnx")
    out = base / "indexes" / "photos"
    build(images, out, model=model, device="cpu", progress=False).close()
    return out


# The trainer's quality records (moco.checkpoint's contract) that the app tests put into models.
MONITOR = "weighted kNN (k 200, T 0.1), 600 bank / 600 query images of digits"
QUALITY = {
    "not_learned": {"metric": "knn_top1", "monitor": MONITOR, "start": 0.433, "start_step": 0, "end": 0.385,
                    "end_step": 10, "best": 0.385, "best_step": 10, "shipped": "start", "shipped_score": 0.433,
                    "verdict": "not_learned", "reason": "kNN 0.433 at the random start, 0.385 at the end: too short"},
    "learned": {"metric": "knn_top1", "monitor": MONITOR, "start": 0.243, "start_step": 0, "end": 0.471,
                "end_step": 900, "best": 0.471, "best_step": 900, "shipped": "final", "shipped_score": 0.471,
                "verdict": "learned", "reason": "kNN 0.243 at the random start, 0.471 at the end: learned"},
}


@pytest.fixture(scope="session")
def quality_collections(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Verdict -> a small collection whose model records that quality; "unmeasured": a model
    exported before quality was recorded (no moco.quality at all)."""
    from indexer import quality

    base = tmp_path_factory.mktemp("quality-collections")
    images = make_images(base / "photos", per_class=4)
    made = {}
    for verdict in ("not_learned", "learned", "unmeasured"):
        props = {quality.PROP: quality.to_prop(QUALITY[verdict])} if verdict in QUALITY else None
        model = make_model(base / f"{verdict}.onnx", props=props)
        made[verdict] = base / "indexes" / verdict
        build(images, made[verdict], model=model, device="cpu", progress=False).close()
    return made


def make_app(collection: Path | None, monkeypatch: pytest.MonkeyPatch, *extra: str,
             timeout: float = 30) -> AppTest:
    """An AppTest of app/main.py opened on ``collection`` (or, with None, on ``extra`` alone)."""
    args = [f"--collection={collection}"] if collection is not None else []
    monkeypatch.setenv("MOCO_APP_ARGS", " ".join(shlex.quote(a) for a in [*args, *extra]))
    return AppTest.from_file(MAIN, default_timeout=timeout)


@pytest.fixture()
def app(collection_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    return make_app(collection_dir, monkeypatch)


def plain(markdown: str) -> str:
    """Escaped markdown as a person reads it: the pages escape every name and path they show
    (app/markup.py), so a test compares what is read, not the escapes."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")
