"""Live collections: a committed generation is answered from on the next request, requests in
flight finish on theirs, and the old one is closed once the last of them is done."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import update
from indexer.server.api import create_app
from indexer.server.live import LiveCollection
from tests.indexer.conftest import encode, picture

from .conftest import config_for


def add_pictures(collection: Path, count: int, seed: int = 500) -> list[Path]:
    """New files in the collection's image folder (a new label folder), as a person would add them."""
    root = Path(json.loads((collection / "manifest.json").read_text())["image_root"]) / f"new{seed}"
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"added{i}.jpg"
        path.write_bytes(encode(picture(seed + i, (250, 250, 20)), "JPEG"))
        paths.append(path)
    return paths


def test_next_request_answers_from_the_new_generation(fresh: Path) -> None:
    with TestClient(create_app(config_for(fresh))) as client:
        before = client.get("/collections/fresh").json()
        added = add_pictures(fresh, 3)
        update(fresh, device="cpu")
        after = client.get("/collections/fresh").json()
        assert after["generation"] == before["generation"] + 1 and after["count"] == before["count"] + 3
        hits = client.post("/collections/fresh/search", params={"k": 1},
                           files={"image": ("q.jpg", added[1].read_bytes(), "image/jpeg")}).json()["hits"]
        assert hits[0]["path"] == f"{added[1].parent.name}/{added[1].name}"


def test_requests_in_flight_keep_their_generation_until_done(fresh: Path) -> None:
    live = LiveCollection("fresh", fresh, device="cpu")
    try:
        with live.use() as old:
            first = int(old.collection.ids[0])
            add_pictures(fresh, 2)
            update(fresh, device="cpu")
            with live.use() as new:
                assert new.collection.generation == old.collection.generation + 1
                assert len(new.collection) == len(old.collection) + 2
                assert new.batcher is old.batcher  # same model: loaded once, kept across generations
            assert old.retired and old.collection.search_id(first, 2)  # still answers, from its own rows
        with pytest.raises(sqlite3.ProgrammingError):  # closed once its last user was done
            old.collection.item(first)
        assert live.switches == 1
    finally:
        live.close()


def test_a_generation_that_cannot_be_opened_leaves_the_old_one_serving(fresh: Path, caplog) -> None:
    live = LiveCollection("fresh", fresh, device="cpu")
    try:
        generation = live.generation
        manifest = json.loads((fresh / "manifest.json").read_text())
        manifest["generation"] += 1
        manifest["index"]["file"] = "index-missing.faiss"
        tmp = fresh / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest))
        tmp.replace(fresh / "manifest.json")  # as a writer commits: a new file under the name
        with caplog.at_level(logging.WARNING, logger="indexer.server"), live.use() as g:
            assert g.collection.generation == generation and g.collection.search_id(int(g.collection.ids[0]), 1)
        assert "keeps serving generation" in caplog.text and "index-missing.faiss" in caplog.text
    finally:
        live.close()
