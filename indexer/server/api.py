"""The endpoints: a FastAPI application over live collections, every bad input a one-line 4xx.

:func:`create_app` builds the application for one process (the collections are opened and
their models loaded once, here). Work that touches FAISS, SQLite or ONNX Runtime runs in a
thread, so the event loop keeps accepting requests; all of it releases the GIL. JSON searches,
the hot path, run in a pool of their own, a few threads per core (a cheaper hand-over than
AnyIO's pool, and no more FAISS searches at once than the cores can take), and reach it through
:class:`indexer.server.lane.JsonSearchLane` rather than FastAPI's routing (see there why). Error
answers are ``{"detail": "one line"}`` with a 4xx status (401 key, 404 unknown collection or
item, 413 too large, 415 not an image or not a body this API takes, 422 anything else that
is invalid); a collection found damaged while answering is a 503 and an unexpected failure a
500, each with one line, the details in the server's log
only. No endpoint takes a file path: uploads are bytes, items are ids, thumbnails come from
``items.sqlite``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
import pydantic_core
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from indexer import store
from indexer.server.auth import KeyCheck
from indexer.server.lane import JsonSearchLane
from indexer.server.live import Generation, LiveCollection
from indexer.server.options import ServeConfig
from indexer.server.schemas import (
    BatchSearchAnswer,
    CollectionInfo,
    CollectionList,
    EmbedAnswer,
    ErrorAnswer,
    Health,
    ItemOut,
    SearchAnswer,
    SearchRequest,
)
from indexer.server.uploads import BodyLimit, UploadRefused, decode_upload

__all__ = ["RequireKey", "create_app", "refusal", "search_threads"]

log = logging.getLogger("indexer.server")
T = TypeVar("T")

DESCRIPTION = """Search collections built by `python -m indexer build` by image, vector or item id.

Every error is `{"detail": "one line"}` with a 4xx status. With an API key set, every endpoint
except `/health` needs the header `Authorization: Bearer KEY`."""

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer, "description": text} for code, text in (
        (401, "missing or wrong API key"), (404, "unknown collection or item"), (413, "body over the size limit"),
        (415, "not an image, or a body this endpoint does not take"), (422, "invalid request"))}


class Refused(Exception):
    """A request this API answers with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequireKey:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer KEY`` when a key is set."""

    def __init__(self, app: Any, check: KeyCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.check.required or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if self.check.allows(header.decode("latin-1") if header is not None else None):
            await self.app(scope, receive, send)
            return
        body = b'{"detail": "missing or wrong API key: send the header Authorization: Bearer KEY"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def one_search_thread() -> None:
    """One FAISS (OpenMP) thread per search in this process: concurrent requests, not OpenMP
    teams, use the cores. With a team per request, 32 clients on 2 shared cores made one
    search of 10k vectors 34 ms instead of 2.8 ms (bench/serve_load.py)."""
    import faiss

    faiss.omp_set_num_threads(1)


def search_threads() -> int:
    """Threads for JSON searches: two per core this process may use (FAISS and SQLite release the
    GIL, so one search's Python part overlaps another's C part), at least four."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(4, 2 * cores)


def refusal(exc: Exception, where: str) -> tuple[int, str]:
    """The status and one-line detail that answer ``exc``, raised while serving ``where``
    ('POST /path'); a damaged collection (503) or an unexpected failure (500) is logged."""
    if isinstance(exc, (Refused, UploadRefused)):
        return exc.status, _one_line(exc)
    if isinstance(exc, store.CollectionError):
        log.error("%s: %s", where, store.one_line(exc))
        return 503, f"the collection cannot answer: {store.one_line(exc)}"
    log.error("%s failed", where, exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); see the server's log"


DEFAULT_K = 10
_K = TypeAdapter(int)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


def _validation_line(errors: list[dict[str, Any]]) -> str:
    """Pydantic's first complaint as one line: ``k: Input should be a valid integer``."""
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _one_line(f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}{more}")


def create_app(config: ServeConfig, *, key: str | None = None,
               served: dict[str, LiveCollection] | None = None) -> FastAPI:
    """The application for ``config``; ``key``: the API key (None: none required); ``served``:
    collections already opened (else each of ``config.collections`` is opened now)."""
    one_search_thread()
    if served is None:
        served = {}
        try:
            for name, directory in config.collections.items():
                served[name] = LiveCollection(name, directory, device=config.device,
                                              embed_batch=config.embed_batch)
        except BaseException:
            for live in served.values():
                live.close()
            raise

    searches = ThreadPoolExecutor(search_threads(), thread_name_prefix="search")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        searches.shutdown(wait=True)
        for live in served.values():
            live.close()

    app = FastAPI(title="moco-search", version="1", description=DESCRIPTION, lifespan=lifespan,
                  redoc_url=None, responses=ERRORS)
    # added first: the innermost of these three, so the key check and the body limit apply to it too
    app.add_middleware(JsonSearchLane, answer=lambda name, body, k: json_search(name, body, k),  # defined below
                       refusal=refusal)
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)  # outside the lane: it limits JSON bodies too
    app.add_middleware(RequireKey, check=KeyCheck(key))  # added last: runs first, before any body is read

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        status, detail = refusal(exc, f"{request.method} {request.url.path}")
        return JSONResponse({"detail": detail}, status_code=status)

    for kind in (Refused, UploadRefused, store.CollectionError, Exception):
        app.add_exception_handler(kind, refused)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_line(list(exc.errors()))}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def live(name: str) -> LiveCollection:
        found = served.get(name)
        if found is None:
            raise Refused(404, f"no collection named {name!r}; GET /collections lists them")
        return found

    async def with_generation(name: str, work: Callable[[Generation], T], pool: ThreadPoolExecutor | None = None) -> T:
        """Run ``work`` on the newest generation of ``name`` in ``pool`` (None: AnyIO's thread pool)."""
        collection = live(name)

        def run() -> T:
            with collection.use() as generation:
                return work(generation)

        if pool is None:
            return await run_in_threadpool(run)
        return await asyncio.get_running_loop().run_in_executor(pool, run)

    def check_k(k: int) -> int:
        if not 1 <= k <= config.max_k:
            raise Refused(422, f"k must be between 1 and {config.max_k}, got {k}")
        return k

    @app.get("/health", response_model=Health, summary="whether the service answers (no key needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/collections", response_model=CollectionList, summary="the names of the collections served")
    async def collections() -> dict[str, list[str]]:
        return {"collections": sorted(served)}

    @app.get("/collections/{name}", response_model=CollectionInfo,
             summary="count, model, index recipe with measured recall, generation")
    async def collection_info(name: str) -> dict[str, Any]:
        def work(g: Generation) -> dict[str, Any]:
            m = g.collection.manifest
            return {"name": name, "count": len(g.collection), "skipped": int(m["counts"]["skipped"]),
                    "dim": g.collection.dim, "generation": g.collection.generation, "updated": m["updated"],
                    "model": {"sha256": m["model"]["sha256"], "props": m["model"]["props"]},
                    "index": m["index"]["recipe"]}

        return await with_generation(name, work)

    search_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "the query image"}}}}}}}

    @app.post("/collections/{name}/search", response_model=SearchAnswer | BatchSearchAnswer,
              summary="the k most similar items to an uploaded image, a vector, an item, or a batch",
              description="Send either a multipart upload in the form field `image` (with `?k=`), or a JSON "
              "body with exactly one of `vector`, `id`, `vectors`, `ids`, and `k` (default: the query's `k`, "
              "else 10). A batch answers one list of hits per query.", openapi_extra=search_body)
    async def search(name: str, request: Request, k: int = Query(DEFAULT_K, description="hits per query")) -> Any:
        """Uploads; a JSON body is answered before this route, by :func:`json_search` (the lane)."""
        collection = live(name)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise Refused(415, "send the query image as the multipart form field 'image', or a JSON body "
                          "with one of vector, id, vectors, ids")
        data = await _upload(request)
        check_k(k)

        def by_image(g: Generation) -> dict[str, Any]:
            vector = g.batcher.embed(decode_upload(data, g.batcher.model, config.max_upload_bytes))
            return {"hits": [h.to_json() for h in g.collection.search_vector(vector, k)]}

        return await with_generation(collection.name, by_image)

    async def json_search(name: str, body: bytes, k_text: str | None) -> bytes:
        """The JSON answer to a JSON search body (``k_text``: the query string's ``k``, if any);
        what :class:`JsonSearchLane` sends. Bad input raises :class:`Refused`."""
        try:
            k = DEFAULT_K if k_text is None else _K.validate_python(k_text)
        except ValidationError as exc:
            raise Refused(422, _validation_line([{**e, "loc": ("query", "k")} for e in exc.errors()])) from None
        collection = live(name)
        try:
            query = SearchRequest.model_validate_json(body)
        except ValidationError as exc:
            raise Refused(422, _validation_line(list(exc.errors()))) from None
        given = [f for f in ("vector", "id", "vectors", "ids") if getattr(query, f) is not None]
        if len(given) != 1:
            raise Refused(422, "send exactly one of vector, id, vectors, ids" +
                          (f" (got {', '.join(given)})" if given else ""))
        k = check_k(query.k if "k" in query.model_fields_set else k)
        field = given[0]
        batch = field in ("vectors", "ids")
        queries: list[Any] = getattr(query, field) if batch else [getattr(query, field)]
        if batch and not 1 <= len(queries) <= config.max_batch:
            raise Refused(422, f"{field} must hold 1 to {config.max_batch} queries, got {len(queries)}")

        def by_query(g: Generation) -> dict[str, Any]:
            c = g.collection
            answers = []
            for i, q in enumerate(queries):
                where = f"{field}[{i}]" if batch else field
                if field in ("id", "ids"):
                    try:
                        hits = c.search_id(int(q), k)
                    except KeyError:
                        raise Refused(404, f"{where}: no indexed item with id {q} in {name!r}") from None
                else:
                    hits = c.search_vector(_query_vector(q, c.dim, where), k)
                answers.append([h.to_json() for h in hits])
            return {"hits": answers if batch else answers[0]}

        return pydantic_core.to_json(await with_generation(collection.name, by_query, searches))

    @app.post("/collections/{name}/embed", response_model=EmbedAnswer,
              summary="the embedding of an uploaded image (same model and decoding as the collection)",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["image"],
                  "properties": {"image": {"type": "string", "format": "binary"}}}}}}})
    async def embed(name: str, request: Request) -> dict[str, Any]:
        collection = live(name)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise Refused(415, "send the image as the multipart form field 'image'")
        data = await _upload(request)

        def work(g: Generation) -> dict[str, Any]:
            vector = g.batcher.embed(decode_upload(data, g.batcher.model, config.max_upload_bytes))
            return {"embedding": [float(x) for x in vector], "model_sha256": g.batcher.model.sha256}

        return await with_generation(collection.name, work)

    @app.get("/collections/{name}/items/{item_id}", response_model=ItemOut, summary="what is stored of an item")
    async def item(name: str, item_id: int) -> dict[str, Any]:
        def work(g: Generation) -> dict[str, Any]:
            try:
                found = g.collection.item(item_id)
            except KeyError:
                raise Refused(404, f"no indexed item with id {item_id} in {name!r}") from None
            return {f: getattr(found, f) for f in ItemOut.model_fields}

        return await with_generation(name, work)

    @app.get("/collections/{name}/items/{item_id}/thumbnail", response_class=Response,
             summary="the item's stored JPEG thumbnail",
             responses={200: {"content": {"image/jpeg": {}}, "description": "a small JPEG"}})
    async def thumbnail(name: str, item_id: int) -> Response:
        def work(g: Generation) -> bytes | None:
            return g.collection.thumbnail(item_id)

        jpeg = await with_generation(name, work)
        if jpeg is None:
            raise Refused(404, f"no indexed item with id {item_id} in {name!r}")
        return Response(jpeg, media_type="image/jpeg")

    app.state.served = served
    app.state.config = config
    return app


async def _upload(request: Request) -> bytes:
    """The bytes of the multipart form field ``image``."""
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise Refused(422, "send the query image in the multipart form field 'image'")
        return await upload.read()
    finally:
        await form.close()


def _query_vector(values: list[float], dim: int, where: str) -> np.ndarray:
    """A query vector checked: D finite numbers, not all zero."""
    if len(values) != dim:
        raise Refused(422, f"{where} has {len(values)} numbers; this collection's vectors have {dim}")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
        vector = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vector).all():
        bad = int(np.flatnonzero(~np.isfinite(vector))[0])
        raise Refused(422, f"{where}[{bad}] is {values[bad]}; a query vector holds finite float32 numbers only")
    if not vector.any():
        raise Refused(422, f"{where} is all zeros; it has no direction to search in")
    return vector
