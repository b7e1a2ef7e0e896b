"""JSON searches answered beside FastAPI's routing: the one request a client sends by the thousand.

``POST /collections/{name}/search`` with a JSON body is the service's hot path (issue 20 asks
for 1,000 vector queries a second on two cores). Through FastAPI's route, its routing,
dependency solving, exception middleware, AnyIO's thread hand-over and response-model
validation cost about 0.35 ms of CPU a request on the benchmark machine (0.65 ms against 0.3
with the search itself stubbed out), a fifth of what the search of a 100,000-item collection
costs there. :class:`JsonSearchLane` is a pure ASGI middleware that answers exactly
those requests itself: it reads the body, hands it to the API's own JSON search (the same
checks, messages and answers; see :func:`indexer.server.api.create_app`) and writes the bytes it
gets back, or the one-line ``{"detail": ...}`` of the error. It sits inside the API-key check
and the body limit, so both still apply; everything else (uploads to the same path, every
other endpoint, ``/docs``) goes on to FastAPI, whose route still documents the JSON body.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import pydantic_core

__all__ = ["SEARCH_PATH", "JsonSearchLane", "content_type"]

SEARCH_PATH = re.compile(r"/collections/([^/]+)/search")
"""The search endpoint's path; ``{name}`` as Starlette's default convertor matches it."""

Answer = Callable[[str, bytes, "str | None"], Awaitable[bytes]]
"""(collection name, request body, the query string's ``k`` or None) -> the JSON answer."""
Refusal = Callable[[Exception, str], "tuple[int, str]"]
"""(exception, 'METHOD path') -> (HTTP status, one-line detail); it logs what needs logging."""


class ClientGone(Exception):
    """The client closed the connection before its body arrived: there is no one to answer."""


def content_type(headers: Any) -> bytes:
    """The media type of a request (``application/json``), lower case, without parameters."""
    for name, value in headers:
        if name == b"content-type":
            return bytes(value).split(b";", 1)[0].strip().lower()
    return b""


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    """The whole request body (the body limit's ``receive`` raises once it is too large)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def query_k(query_string: bytes) -> str | None:
    """The ``k`` of the query string (the last one, as Starlette reads it), or None."""
    if b"k=" not in query_string:
        return None
    found = None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name == "k":
            found = value
    return found


class JsonSearchLane:
    """ASGI middleware: JSON bodies POSTed to the search path are answered by ``answer``; errors
    become ``refusal``'s status and one line. Any other request goes on to ``app``."""

    def __init__(self, app: Any, answer: Answer, refusal: Refusal) -> None:
        self.app = app
        self.answer = answer
        self.refusal = refusal

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = SEARCH_PATH.fullmatch(scope["path"])
        if match is None or content_type(scope["headers"]) != b"application/json":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
            status, answer = 200, await self.answer(match.group(1), body, query_k(scope["query_string"]))
        except ClientGone:
            return
        except Exception as exc:  # noqa: BLE001 - every failure is answered by one line (and logged there)
            status, detail = self.refusal(exc, f"POST {scope['path']}")
            answer = pydantic_core.to_json({"detail": detail})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})
