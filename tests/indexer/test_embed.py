"""The embedding pipeline (bounded, ordered, bad files pass through) and a real exported model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from indexer.embed import EmbeddingModel, decode_file, embed_files

from .conftest import add_bad_files, make_images


def test_pipeline_is_ordered_bounded_and_survives_bad_files(tmp_path, tiny_model):
    root = make_images(tmp_path / "photos", per_class=10)
    add_bad_files(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    model = EmbeddingModel(tiny_model, device="cpu")
    consumed = 0

    def counting():
        nonlocal consumed
        for p in paths:
            consumed += 1
            yield p

    chunks = embed_files(counting(), model, batch_size=4, workers=2, window=8)
    first = next(chunks)
    assert len(first) == 4 and consumed <= 8 + 4  # never more than the window read ahead
    results = first + [pair for chunk in chunks for pair in chunk]
    assert len(results) == len(paths)
    for path, (decoded, vector) in zip(paths, results):
        if vector is None:
            assert decoded.reason and decoded.error
        else:
            np.testing.assert_allclose(vector, model.embed_image(path), atol=1e-5)
            assert decoded.sha256 and decoded.thumbnail and decoded.array is None  # pixels freed


def test_decode_reports_original_size_and_max_pixels(tmp_path, tiny_model):
    from PIL import Image

    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "a.jpg")
    model = EmbeddingModel(tiny_model, device="cpu")
    ok = decode_file(tmp_path / "a.jpg", model.resize, model.short_side)
    assert (ok.width, ok.height) == (300, 200) and ok.array.shape == (32, 32, 3)
    refused = decode_file(tmp_path / "a.jpg", model.resize, model.short_side, max_pixels=1000)
    assert refused.reason == "decompression bomb" and refused.array is None


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "moco", "exports")),
                    reason="needs torch, moco and exports")
def test_with_a_real_exported_model(tmp_path):
    """Train one tiny epoch, export, build, search: the whole pipeline with a real network."""
    from exports.__main__ import main as export_main
    from indexer.build import build
    from moco.__main__ import main as moco_main

    data = make_images(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    assert moco_main(["train", str(data), "--out", str(run), "--epochs", "1", "--image-size", "32", "--stem",
                      "imagenet", "--workers", "0", "--batch-size", "8", "--no-channels-last"]) == 0
    model = tmp_path / "m.onnx"
    assert export_main([str(run / "checkpoint.pt"), "-o", str(model), "--device", "cpu"]) == 0
    col = build(data, tmp_path / "col", model=model, device="cpu", workers=2)
    assert len(col) == 25
    first = col.items[0]
    assert col.search_image(Path(data / first.path), 1)[0].id == first.id
    assert col.manifest["model"]["props"]["moco.arch"]
