"""Request bodies: a size limit enforced while the body arrives, and uploads decoded.

:class:`BodyLimit` refuses a request whose ``Content-Length`` is over the limit before reading
it, and stops one sent in chunks as soon as its bytes pass the limit, so an oversized upload
costs neither memory nor disk (Starlette would spool a whole multipart file before the
endpoint saw it). :func:`decode_upload` turns the bytes into the model's input through
:mod:`indexer.images`, the one decoding path (format from the content, header checked for
decompression bombs and extreme shapes before any pixel is decoded), with the same resize as
the collection's own images.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.embed import EmbeddingModel
from indexer.images import ImageDecodeError, load_rgb_bytes

__all__ = ["MAX_UPLOAD_PIXELS", "MULTIPART_SLACK", "BodyLimit", "BodyTooLarge", "UploadRefused", "decode_upload"]

MAX_UPLOAD_PIXELS = 50_000_000
"""A phone photo is 12-50 Mpx; beyond that an upload is more likely a decompression bomb (the
app's limit too)."""

MULTIPART_SLACK = 64 * 1024
"""Room for the multipart headers and boundaries around a file of exactly the limit."""


class UploadRefused(ValueError):
    """An upload that cannot be used: ``status`` (an HTTP 4xx) and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLarge(UploadRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit / 2**20:g} MB (--max-upload-mb)")


class BodyLimit:
    """ASGI middleware: at most ``limit`` bytes of request body (plus multipart framing)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.limit + MULTIPART_SLACK
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > allowed:
                    await _refuse(send, BodyTooLarge(self.limit))
                    return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > allowed:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


async def _refuse(send: Any, error: UploadRefused) -> None:
    body = json.dumps({"detail": str(error)}).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


REASONS = {
    "not an image": (415, "the upload is not an image this service reads (JPEG, PNG, WebP, BMP, TIFF, GIF)"),
    "empty file": (422, "the upload is empty"),
    "truncated": (422, "the image is truncated"),
    "corrupt": (422, "the image is damaged"),
    "decompression bomb": (422, f"the image has more than {MAX_UPLOAD_PIXELS // 1_000_000} million pixels "
                                "(decompression bomb guard)"),
    "extreme aspect ratio": (422, "the image is too long and thin to search by (extreme aspect ratio)"),
    "unsupported mode": (415, "the image's pixel format is not supported"),
    "out of memory": (422, "the image is too large to decode here"),
}


def decode_upload(data: bytes, model: EmbeddingModel, limit: int) -> npt.NDArray[np.uint8]:
    """The model-ready pixels (uint8 S x S x 3) of an uploaded image, or :class:`UploadRefused`."""
    if len(data) > limit:
        raise BodyTooLarge(limit)
    try:
        image = load_rgb_bytes(data, min_side=model.short_side, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageDecodeError as exc:
        status, message = REASONS.get(exc.reason, (422, f"the image cannot be read ({exc.reason})"))
        raise UploadRefused(status, message) from None
    return model.preprocess(image.convert("RGB"))
