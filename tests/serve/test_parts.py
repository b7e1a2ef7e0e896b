"""The service's parts on their own: the key check, the upload batcher, the body limit's message."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import UsageError
from indexer.embed import EmbeddingModel
from indexer.server.auth import KeyCheck, read_key
from indexer.server.batcher import Batcher

from .conftest import KEY


def test_key_check() -> None:
    check = KeyCheck(KEY)
    assert check.required and check.allows(f"Bearer {KEY}") and check.allows(f"bearer  {KEY} ")
    for header in (None, "", "Bearer", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}"):
        assert not check.allows(header), header
    assert KEY not in repr(check)
    assert KeyCheck(None).allows(None) and not KeyCheck(None).required


def test_read_key(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_text(f"  {KEY}\n")
    assert read_key(good) == KEY
    for text, needle in (("short\n", "at least 16"), ("", "at least 16"), ("two words here okay\n", "without spaces")):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(UsageError, match=needle) as info:
            read_key(tmp_path / "bad")
        assert text.strip() == "" or text.strip() not in str(info.value)  # the message never shows the key
    (tmp_path / "bin").write_bytes(b"\xff\xfe" * 20)
    with pytest.raises(UsageError, match="not UTF-8"):
        read_key(tmp_path / "bin")
    with pytest.raises(UsageError, match="cannot read"):
        read_key(tmp_path / "missing")


def test_concurrent_embeds_are_batched_and_each_gets_its_own(tiny_model: Path) -> None:
    model = EmbeddingModel(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, model.image_size, model.image_size, 3), dtype=np.uint8)
    expected = model.embed(images)
    batcher = Batcher(model, max_batch=8)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(images))

    def one(i: int) -> None:
        start.wait()
        results[i] = batcher.embed(images[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i in range(len(images)):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)
    assert batcher.images == len(images) and batcher.batches < len(images)  # some ran together
    unbatched = Batcher(model, max_batch=1)
    np.testing.assert_allclose(unbatched.embed(images[3]), expected[3], atol=1e-5)
    assert unbatched.batches == 1
