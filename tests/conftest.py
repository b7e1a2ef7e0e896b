"""Suite-wide: keep every decoded-image cache inside the test's own temporary folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOCO_CACHE_DIR", str(tmp_path_factory.mktemp("decoded-cache")))
