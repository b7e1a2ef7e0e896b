"""The endpoints through FastAPI's TestClient: answers checked against the library's own, and
every bad input of issue 20 answered by a one-line 4xx (never a 500, never a traceback)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.collection import Collection
from indexer.server.schemas import BatchSearchAnswer, CollectionInfo, EmbedAnswer, ItemOut, SearchAnswer
from tests.indexer.conftest import encode, picture


def refused(response, status: int, needle: str) -> None:
    """A 4xx whose body is ``{"detail": one line}`` holding ``needle``."""
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    assert needle in detail, detail


def upload(client: TestClient, data: bytes, path: str = "/collections/photos/search", **params: object):
    return client.post(path, params=params, files={"image": ("q.jpg", data, "image/jpeg")})


@pytest.fixture(scope="module")
def col(photos: Path):
    with Collection.open(photos, device="cpu") as c:
        yield c


def test_health_list_and_info(client: TestClient, col: Collection) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/collections").json() == {"collections": ["photos"]}
    info = CollectionInfo.model_validate(client.get("/collections/photos").json())
    assert (info.name, info.count, info.dim, info.generation) == ("photos", len(col), col.dim, col.generation)
    assert info.index["recall_at_10"] == col.recipe["recall_at_10"]
    assert info.model["sha256"] == col.manifest["model"]["sha256"]
    assert info.model["props"]["moco.embedding_dim"] == str(col.dim)


def test_search_by_upload_finds_the_same_picture_first(client: TestClient, col: Collection, photos: Path) -> None:
    item = col.items[4]
    data = (Path(col.manifest["image_root"]) / item.path).read_bytes()
    answer = upload(client, data, k=5)
    assert answer.status_code == 200, answer.text
    hits = SearchAnswer.model_validate(answer.json()).hits
    assert len(hits) == 5 and hits[0].id == item.id and hits[0].path == item.path
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert [h.id for h in hits] == [h.id for h in col.search_image(data, 5)]
    for raw in answer.json()["hits"]:
        assert {"id", "path", "score", "label"} <= set(raw)


def test_search_by_vector_id_and_batches_match_the_library(client: TestClient, col: Collection) -> None:
    ids = [int(i) for i in col.ids[:3]]
    vector = [float(x) for x in col.vector(ids[0]) * 3.0]  # any scale
    one = client.post("/collections/photos/search", json={"vector": vector, "k": 4}).json()["hits"]
    assert [h["id"] for h in one] == [h.id for h in col.search_vector(vector, 4)] and one[0]["id"] == ids[0]
    by_id = client.post("/collections/photos/search", json={"id": ids[1]}, params={"k": 3}).json()["hits"]
    assert [h["id"] for h in by_id] == [h.id for h in col.search_id(ids[1], 3)] and ids[1] not in \
        [h["id"] for h in by_id]  # k from the query string when the body has none; the item left out
    batch = BatchSearchAnswer.model_validate(
        client.post("/collections/photos/search", json={"ids": ids, "k": 2}).json()).hits
    assert [[h.id for h in hits] for hits in batch] == [[h.id for h in col.search_id(i, 2)] for i in ids]
    vectors = [[float(x) for x in col.vector(i)] for i in ids]
    batch = client.post("/collections/photos/search", json={"vectors": vectors, "k": 1}).json()["hits"]
    assert [hits[0]["id"] for hits in batch] == ids


def test_embed_items_and_thumbnails(client: TestClient, col: Collection) -> None:
    item = col.items[2]
    data = (Path(col.manifest["image_root"]) / item.path).read_bytes()
    answer = EmbedAnswer.model_validate(upload(client, data, "/collections/photos/embed").json())
    assert answer.model_sha256 == col.manifest["model"]["sha256"]
    np.testing.assert_allclose(answer.embedding, col.model.embed_image(data), atol=1e-5)
    np.testing.assert_allclose(answer.embedding, col.vector(item.id), atol=1e-4)  # decoded as when indexed
    meta = ItemOut.model_validate(client.get(f"/collections/photos/items/{item.id}").json())
    assert (meta.path, meta.label, meta.width, meta.sha256) == (item.path, item.label, item.width, item.sha256)
    thumb = client.get(f"/collections/photos/items/{item.id}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content == col.thumbnail(item.id)
    assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"


def test_openapi_page_names_every_endpoint(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/collections", "/collections/{name}", "/collections/{name}/search",
            "/collections/{name}/embed", "/collections/{name}/items/{item_id}",
            "/collections/{name}/items/{item_id}/thumbnail"} == set(paths)
    body = paths["/collections/{name}/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)


def test_bad_images(client: TestClient) -> None:
    refused(upload(client, b"this is not an image\n" * 20), 415, "not an image")
    refused(upload(client, b""), 422, "empty")
    full = encode(picture(3, size=(200, 160)), "JPEG")
    refused(upload(client, full[: len(full) // 3]), 422, "truncated")
    bomb = encode(Image.new("L", (12000, 10000)), "PNG", optimize=True)  # 120 Mpx in a few kB
    assert len(bomb) < 1_000_000
    refused(upload(client, bomb), 422, "decompression bomb")
    refused(upload(client, bomb, "/collections/photos/embed"), 422, "decompression bomb")


def test_uploads_over_the_size_limit(client: TestClient) -> None:
    big = np.random.default_rng(0).integers(0, 256, 1_300_000, dtype=np.uint8).tobytes()  # limit: 1 MB
    refused(upload(client, big), 413, "limit of 1 MB")

    def chunks():  # no Content-Length: the limit is applied while the body arrives
        for _ in range(40):
            yield b"x" * 65536

    answer = client.post("/collections/photos/search", content=chunks(),
                         headers={"content-type": "application/json"})
    refused(answer, 413, "limit of 1 MB")


@pytest.mark.parametrize("body, needle", [
    ({"vector": [1.0, 2.0]}, "has 2 numbers"),
    ({"vector": [0.0] * 16}, "all zeros"),
    ({"vector": [1.0] * 15 + [1e39]}, "finite"),
    ({"vectors": [[1.0] * 16, [1.0] * 3]}, "vectors[1] has 3 numbers"),
    ({"k": 3}, "exactly one of"),
    ({"id": 1, "vector": [1.0] * 16}, "exactly one of"),
    ({"id": "one"}, "id:"),
    ({"ids": []}, "1 to 8 queries"),
    ({"ids": list(range(1, 10))}, "1 to 8 queries"),
    ({"id": 1, "colour": "red"}, "colour"),
    ({"id": 1, "k": 0}, "k must be between 1 and 50, got 0"),
    ({"id": 1, "k": 51}, "k must be between 1 and 50, got 51"),
])
def test_bad_json_queries(client: TestClient, body: dict, needle: str) -> None:
    refused(client.post("/collections/photos/search", json=body), 422, needle)


def test_nan_and_broken_json(client: TestClient) -> None:
    nan_body = '{"vector": [' + ", ".join(["1.0"] * 15 + ["NaN"]) + "]}"
    refused(client.post("/collections/photos/search", content=nan_body,
                        headers={"content-type": "application/json"}), 422, "vector")
    refused(client.post("/collections/photos/search", content="{not json",
                        headers={"content-type": "application/json"}), 422, "JSON")


def test_bad_k_unknown_names_and_bodies(client: TestClient, col: Collection) -> None:
    data = encode(picture(1), "JPEG")
    refused(upload(client, data, k=0), 422, "k must be between 1 and 50")
    refused(upload(client, data, k=51), 422, "got 51")
    refused(upload(client, data, k="many"), 422, "k:")
    refused(upload(client, data, "/collections/nope/search"), 404, "no collection named 'nope'")
    refused(client.get("/collections/nope"), 404, "no collection named")
    missing = int(col.ids.max()) + 1000
    refused(client.post("/collections/photos/search", json={"id": missing}), 404, f"no indexed item with id {missing}")
    refused(client.post("/collections/photos/search", json={"ids": [int(col.ids[0]), missing]}), 404, "ids[1]")
    refused(client.get(f"/collections/photos/items/{missing}"), 404, "no indexed item")
    refused(client.get(f"/collections/photos/items/{missing}/thumbnail"), 404, "no indexed item")
    refused(client.get("/collections/photos/items/abc"), 422, "item_id")
    refused(client.post("/collections/photos/search", content=b"hello", headers={"content-type": "text/plain"}),
            415, "multipart form field 'image'")
    refused(client.post("/collections/photos/search", files={"picture": ("q.jpg", data, "image/jpeg")}), 422,
            "field 'image'")
    refused(client.post("/collections/photos/embed", json={"id": 1}), 415, "multipart")


def test_hits_keep_fields_the_library_adds(client: TestClient, col: Collection) -> None:
    """The answer is the library's Hit, whole: whatever fields it grows reach clients."""
    hit = client.post("/collections/photos/search", json={"id": int(col.ids[0]), "k": 1}).json()["hits"][0]
    assert set(hit) == set(col.search_id(int(col.ids[0]), 1)[0].to_json())
    assert json.loads(json.dumps(hit)) == hit
