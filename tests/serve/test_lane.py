"""The JSON search lane (indexer.server.lane): JSON searches answered beside FastAPI's routing
keep the API's answers and one-line errors; everything else still reaches FastAPI."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer import store
from indexer.collection import Collection
from indexer.server.api import Refused, create_app, refusal
from indexer.server.lane import content_type, query_k
from indexer.server.uploads import BodyTooLarge

from .conftest import KEY, config_for
from .test_api import refused


@pytest.fixture(scope="module")
def col(photos: Path):
    with Collection.open(photos, device="cpu") as c:
        yield c


def test_query_string_k_and_media_type_are_read_as_starlette_reads_them() -> None:
    assert query_k(b"") is None and query_k(b"top=3") is None
    assert query_k(b"k=3") == "3" and query_k(b"k=3&k=5") == "5" and query_k(b"x=1&k=") == ""
    assert content_type([(b"accept", b"*/*"), (b"content-type", b"Application/JSON; charset=utf-8")]) == \
        b"application/json"
    assert content_type([]) == b""


def test_json_answers_match_the_library_with_any_json_media_type(client: TestClient, col: Collection) -> None:
    vector = [float(x) for x in col.vector(int(col.ids[5]))]
    answer = client.post("/collections/photos/search", content=f'{{"vector": {vector}}}',
                         headers={"content-type": "application/json; charset=utf-8"}, params={"k": 3})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    expected = [h.to_json() for h in col.search_vector(vector, 3)]
    assert answer.json()["hits"] == expected  # k from the query string; the library's hits, whole


def test_bad_query_string_k_is_one_line(client: TestClient) -> None:
    refused(client.post("/collections/photos/search", json={"id": 1}, params={"k": "many"}), 422,
            "k: Input should be a valid integer")
    refused(client.post("/collections/photos/search", json={"id": 1}, params={"k": "0"}), 422,
            "k must be between 1 and 50, got 0")
    refused(client.post("/collections/nope/search", json={"id": 1}), 404, "no collection named 'nope'")


def test_a_key_guards_json_searches_too(photos: Path) -> None:
    with TestClient(create_app(config_for(photos), key=KEY)) as c:
        answer = c.post("/collections/photos/search", json={"id": 1, "k": 2})
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        good = c.post("/collections/photos/search", json={"id": 1, "k": 2}, headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200 and len(good.json()["hits"]) == 2


def test_refusal_maps_every_failure_to_one_line_and_logs_the_unexpected(caplog) -> None:
    assert refusal(Refused(404, "no such\n item"), "POST /x") == (404, "no such item")
    assert refusal(BodyTooLarge(2**20), "POST /x") == (413, str(BodyTooLarge(2**20)))
    with caplog.at_level(logging.ERROR, logger="indexer.server"):
        status, detail = refusal(store.CollectionError("items.sqlite is damaged"), "POST /x")
        assert status == 503 and "items.sqlite is damaged" in detail
        status, detail = refusal(RuntimeError("secret internals"), "POST /collections/a/search")
    assert status == 500 and detail == "internal error (RuntimeError); see the server's log"
    assert "POST /collections/a/search failed" in caplog.text and "secret internals" in caplog.text
