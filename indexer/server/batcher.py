"""Concurrent uploads batched through one model: one inference thread, natural batches.

Each request decodes its upload in its own thread (Pillow releases the GIL), then hands the
model-ready pixels to :class:`Batcher`. One thread runs the model: it takes the first waiting
image and every other one already waiting (up to ``max_batch``) and embeds them in one call.
Nothing waits for a batch to fill, so a lone request pays no delay, and under load the model
sees batches as large as the load makes them: one ONNX Runtime call for 16 images costs far
less than 16 calls, and the calls never compete for the same cores.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np
import numpy.typing as npt

from indexer.embed import EmbeddingModel

__all__ = ["Batcher"]

_STOP = object()


class Batcher:
    """Embed model-ready images (uint8 S x S x 3) one by one from many threads, in batches."""

    def __init__(self, model: EmbeddingModel, max_batch: int = 32) -> None:
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.batches = 0  # model calls made, and images embedded: what a test or a log can show
        self.images = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if self.max_batch > 1:
            self._thread = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
            self._thread.start()

    def embed(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """The embedding of one image (blocks the calling thread until its batch ran)."""
        if self._thread is None:
            self.batches += 1
            self.images += 1
            return self.model.embed(pixels[None])[0]
        done: Future[npt.NDArray[np.float32]] = Future()
        self._queue.put((pixels, done))
        return done.result()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(nxt)
            pixels = [p for p, _ in batch]  # type: ignore[misc]
            futures: list[Future[npt.NDArray[np.float32]]] = [f for _, f in batch]  # type: ignore[misc]
            try:
                out = self.model.embed(np.stack(pixels))
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the model's error
                for f in futures:
                    f.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            for f, vector in zip(futures, out):
                f.set_result(vector)

    def close(self) -> None:
        """Stop the inference thread once the images already queued are embedded."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
