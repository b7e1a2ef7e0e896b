"""Uploaded query images: checked, decoded with the indexer's one decoding path, embedded.

Kept apart from the page so the upload rules (size limit, allowed formats, the message a
person sees for a bad file) are plain functions a test or benchmark can call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from indexer.collection import Collection
from indexer.images import ImageDecodeError, load_rgb_bytes, thumbnail_jpeg

UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp")
MAX_UPLOAD_MB = 20
"""Uploads above this are refused before decoding (also the server's limit, .streamlit/config.toml)."""
MAX_UPLOAD_PIXELS = 50_000_000
"""A phone photo is 12-50 Mpx; beyond that an upload is more likely a decompression bomb."""


class UploadError(ValueError):
    """A one-line reason an upload cannot be used, for the person who sent it."""


@dataclass(frozen=True)
class EmbeddedUpload:
    name: str
    vector: npt.NDArray[np.float32]
    thumbnail: bytes


def embed_upload(collection: Collection, name: str, data: bytes) -> EmbeddedUpload:
    """Decode and embed an uploaded file with the collection's own model.

    Raises :class:`UploadError` with a readable message for anything that is not a usable
    image; the content decides, not the file name, so a PNG named ``.jpg`` still works."""
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise UploadError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
    try:
        image = load_rgb_bytes(data, min_side=collection.model.short_side, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageDecodeError as exc:
        detail = {"not an image": "it is not an image the app can read (jpg, png or webp)",
                  "empty file": "the file is empty",
                  "truncated": "the file is truncated",
                  "decompression bomb": f"it has more than {MAX_UPLOAD_PIXELS // 1_000_000} Mpx"}
        raise UploadError(f"Cannot use {name}: {detail.get(exc.reason, exc.reason)}.") from None
    vector = collection.model.embed_image(image)
    return EmbeddedUpload(name, vector, thumbnail_jpeg(image))

