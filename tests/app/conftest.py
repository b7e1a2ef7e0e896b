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
