"""Files -> embeddings with ONNX Runtime: the model of Contract 2 and the decode/infer pipeline.

Decoding (Pillow, which releases the GIL while decoding and resizing) runs in a thread pool
while the main thread runs ONNX Runtime (which releases it too), so the two overlap without
pickling pixels between processes. At most ``window`` files are in flight, so memory stays
bounded whatever the number of files: results stream out batch by batch in input order.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from indexer import runtime
from indexer.files import sha256_file
from indexer.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    THUMBNAIL_SIZE,
    ImageDecodeError,
    apply_resize,
    load_rgb,
    load_rgb_bytes,
    parse_resize_recipe,
    read_image,
    thumbnail_jpeg,
    to_uint8_array,
)

__all__ = ["Decoded", "EmbeddingModel", "ModelError", "decode_file", "embed_files"]

REQUIRED_PROPS = ("moco.format_version", "moco.image_size", "moco.embedding_dim", "moco.resize")


class ModelError(ValueError):
    """A model that is missing or does not follow Contract 2; one line for the user."""


MODEL_FORMAT_VERSION = 1
"""The newest ``moco.format_version`` of Contract 2 this indexer reads."""


def _shape(shape: Sequence[Any]) -> str:
    """An ORT shape for people: [N,32,32,3], symbolic or unknown sizes by name or '?'."""
    return "[" + ",".join(str(s) if s is not None else "?" for s in shape) + "]"


class EmbeddingModel:
    """An ONNX embedding model of Contract 2: uint8 [N,S,S,3] in, L2-normalised [N,D] out."""

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", threads: int | None = None,
                 spin: bool | None = None, data: bytes | None = None) -> None:
        """Load and check a model. ``data``: the file's bytes, read by a caller that holds the file
        open because its name may be gone by now (a reader of an older collection generation);
        ``path`` then only names it in messages. The session is :func:`indexer.runtime.make_session`'s,
        the one export verification runs on too; ``spin``: see :func:`indexer.runtime.session_options`."""
        self.path = Path(path)
        self._data_sha256 = hashlib.sha256(data).hexdigest() if data is not None else None
        if data is None and not self.path.is_file():
            raise ModelError(f"model not found: {self.path}")
        try:
            runtime.providers_for(device)  # an unusable device is the user's error, not the file's
        except runtime.RuntimeUnavailable as exc:
            raise ModelError(str(exc)) from None
        try:
            self.session = runtime.make_session(self.path if data is None else data, device, threads=threads,
                                                spin=spin)
        except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad files
            raise ModelError(f"{self.path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        self.props: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [key for key in REQUIRED_PROPS if key not in self.props]
        if missing:
            raise ModelError(f"{self.path} lacks the metadata {', '.join(missing)}; export it with "
                             "'python -m exports CHECKPOINT -o MODEL.onnx'")
        try:
            version = int(self.props["moco.format_version"])
            self.image_size = int(self.props["moco.image_size"])
            self.dim = int(self.props["moco.embedding_dim"])
            self.resize = self.props["moco.resize"]
            self.short_side = parse_resize_recipe(self.resize)["short_side"]
        except ValueError as exc:
            raise ModelError(f"{self.path}: bad moco.* metadata: {exc}") from None
        if version > MODEL_FORMAT_VERSION:
            raise ModelError(f"{self.path} is a model of format {version}, newer than this indexer reads "
                             f"({MODEL_FORMAT_VERSION}); upgrade the indexer")
        if version < 1:  # formats start at 1: anything below was not written by 'python -m exports'
            raise ModelError(f"{self.path}: moco.format_version {version} is not a format this indexer knows "
                             f"(1 to {MODEL_FORMAT_VERSION}); export it again with 'python -m exports'")
        if self.image_size < 1 or self.dim < 1:
            raise ModelError(f"{self.path}: bad moco.* metadata: image size {self.image_size}, "
                             f"embedding dimension {self.dim}")
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        self._check_graph()

    def _check_graph(self) -> None:
        """Check the graph's real input and output against the metadata (Contract 2).

        Why: everything downstream trusts ``moco.image_size`` and ``moco.embedding_dim`` (the
        decoder resizes to S, the index is made for D). A model whose metadata disagrees with
        its graph would fail at the first batch or, worse, build a collection of vectors of
        another width than its manifest says. Static shapes are compared directly; where the
        graph leaves a size open, one probe image of the declared size is run through it.
        """
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        s, d = self.image_size, self.dim
        if len(inputs) != 1 or not outputs:
            raise ModelError(f"{self.path}: expected one input (uint8 [N,{s},{s},3]) and an output "
                             f"[N,{d}], the graph has {len(inputs)} inputs and {len(outputs)} outputs")
        x, y = inputs[0], outputs[0]
        if x.type != "tensor(uint8)" or len(x.shape) != 4 or y.type not in ("tensor(float)", "tensor(float16)") \
                or len(y.shape) != 2:
            raise ModelError(f"{self.path}: the graph takes {x.type} {_shape(x.shape)} and gives {y.type} "
                             f"{_shape(y.shape)}; Contract 2 is uint8 [N,{s},{s},3] in, float32 [N,{d}] out")
        checks = (((None, s, s, 3), x.shape, "takes images of shape"), ((None, d), y.shape, "gives vectors of shape"))
        for want, got, what in checks:
            static = [(g, w) for g, w in zip(got, want) if w is not None and isinstance(g, int)]
            if any(g != w for g, w in static):
                raise ModelError(f"{self.path}: the metadata says moco.image_size {s} and moco.embedding_dim {d}, "
                                 f"but the graph {what} {_shape(got)}; re-export the model")
        if all(isinstance(g, int) for g in (*x.shape[1:], y.shape[1])):
            return
        try:
            out = self.embed(np.zeros((1, s, s, 3), dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001 - ORT raises several types for a shape it refuses
            raise ModelError(f"{self.path}: the graph does not run on a [1,{s},{s},3] image as moco.image_size "
                             f"says: {str(exc).splitlines()[0]}") from None
        if out.shape != (1, d):
            raise ModelError(f"{self.path}: the metadata says moco.embedding_dim {d}, but the graph gives "
                             f"vectors of shape {list(out.shape)}; re-export the model")

    @functools.cached_property
    def sha256(self) -> str:
        return self._data_sha256 or sha256_file(self.path)

    def embed(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Embed a uint8 [N,S,S,3] batch; float32 [N,D]."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(images)})[0]
        return np.asarray(out, dtype=np.float32)

    def preprocess(self, img: Image.Image) -> npt.NDArray[np.uint8]:
        """One decoded RGB image -> the model's S x S x 3 uint8 input."""
        return to_uint8_array(apply_resize(img, self.resize))

    def embed_image(self, img: Image.Image | str | os.PathLike[str] | bytes) -> npt.NDArray[np.float32]:
        """Embed one query image (a PIL image, a path or encoded bytes); float32 [D]."""
        if isinstance(img, (bytes, bytearray)):
            img = load_rgb_bytes(bytes(img), min_side=self.short_side)
        elif not isinstance(img, Image.Image):
            img = load_rgb(img, min_side=self.short_side)
        return self.embed(self.preprocess(img.convert("RGB"))[None])[0]


@dataclass
class Decoded:
    """What a decode worker returns for one file: pixels for the model, or why not."""

    array: npt.NDArray[np.uint8] | None = None
    width: int = 0
    height: int = 0
    sha256: str | None = None
    thumbnail: bytes | None = None
    reason: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _text(message: str) -> str:
    """Error text safe to store and print: undecodable name bytes (surrogates) as \\udcNN."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def decode_file(path: Path, resize: str, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                thumbnail_size: int = THUMBNAIL_SIZE, max_aspect: float = DEFAULT_MAX_ASPECT) -> Decoded:
    """Open, identify, decode (JPEG draft to ``short_side``), hash, thumbnail and resize one file.

    Through :func:`indexer.images.read_image`, the one decoding path: the file is opened once
    (never a FIFO or device), identified from its first bytes (a 2 GB non-image costs one 8 kB
    read) and decoded from the handle; only a file that decoded is hashed to the end (1 MB
    chunks, for ``update``). Memory is bounded by the model's input, whatever the file's size or
    shape. Every failure becomes ``reason``/``error``; nothing raises, so one bad file never
    stops a build.
    """
    try:
        loaded = read_image(path, min_side=short_side, max_pixels=max_pixels, max_aspect=max_aspect, sha256=True)
        thumbnail = thumbnail_jpeg(loaded.image, thumbnail_size, file_size=(loaded.width, loaded.height))
        array = to_uint8_array(apply_resize(loaded.image, resize))
        return Decoded(array=array, width=loaded.width, height=loaded.height, sha256=loaded.sha256,
                       thumbnail=thumbnail)
    except ImageDecodeError as exc:
        return Decoded(reason=exc.reason, error=_text(f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason))
    except Exception as exc:  # noqa: BLE001 - anything else is still "this file is bad"
        return Decoded(reason="corrupt", error=_text(f"{type(exc).__name__}: {exc}"))


def embed_files(
    paths: Iterable[Path],
    model: EmbeddingModel,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: int | None = None,
) -> Iterator[list[tuple[Decoded, npt.NDArray[np.float32] | None]]]:
    """Stream ``paths`` through decode workers and the model, yielding chunks in input order.

    Each chunk is a list of ``(decoded, vector or None)`` pairs, at most ``batch_size`` long
    (bad files carry no vector). ``window`` bounds the files in flight (default 4 batches):
    the pool decodes the next batches while ONNX Runtime runs the current one.
    """
    workers = workers or runtime.physical_cores()
    window = window or max(2 * batch_size, 4 * batch_size)
    decode = functools.partial(decode_file, resize=model.resize, short_side=model.short_side,
                               max_pixels=max_pixels)
    pending: deque[Future[Decoded]] = deque()
    iterator = iter(paths)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        path = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(pool.submit(decode, path))
                if not pending:
                    return
                chunk = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
                yield _infer(model, chunk)
        finally:
            for future in pending:
                future.cancel()


def _infer(model: EmbeddingModel, chunk: Sequence[Decoded]) -> list[tuple[Decoded, npt.NDArray[np.float32] | None]]:
    """Run the good images of one chunk through the model; bad ones pass through without a vector."""
    good = [i for i, d in enumerate(chunk) if d.array is not None]
    vectors: dict[int, npt.NDArray[np.float32]] = {}
    if good:
        batch = np.stack([chunk[i].array for i in good])  # type: ignore[misc]
        out = model.embed(batch)
        vectors = {i: out[j] for j, i in enumerate(good)}
    result = []
    for i, decoded in enumerate(chunk):
        decoded.array = None  # the pixels are no longer needed: free them now
        result.append((decoded, vectors.get(i)))
    return result
