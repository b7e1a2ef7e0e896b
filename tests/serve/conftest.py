"""Fixtures for the service's tests: tiny collections (the indexer tests' model and pictures)
and FastAPI's TestClient over them. A real server is started by the tests that need one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import build
from indexer.server.api import create_app
from indexer.server.options import ServeConfig
from tests.indexer.conftest import make_images, make_model

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A collection named ``photos`` of 19 pictures in three label folders (read-only in tests)."""
    root = tmp_path_factory.mktemp("served")
    images = make_images(root / "images")
    build(images, root / "photos", model=tiny_model, device="cpu", projection_fit_max=50)
    return root / "photos"


@pytest.fixture()
def fresh(tmp_path: Path, tiny_model: Path) -> Path:
    """A collection of the test's own, which the test may update (its images are beside it)."""
    images = make_images(tmp_path / "images", per_class=3)
    build(images, tmp_path / "fresh", model=tiny_model, device="cpu", projection_fit_max=50)
    return tmp_path / "fresh"


def config_for(*directories: Path, **options: object) -> ServeConfig:
    return ServeConfig(collections={d.name: str(d) for d in directories}, device="cpu", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def client(photos: Path) -> Iterator[TestClient]:
    with TestClient(create_app(config_for(photos, max_upload_mb=1, max_k=50, max_batch=8))) as c:
        yield c
