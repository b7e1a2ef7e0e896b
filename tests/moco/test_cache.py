"""The decoded-image cache: decode once, reuse, refresh changed files, fall back when too big."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from indexer.images import scan_images
from moco import cache as cache_module
from moco import data as data_module
from moco.cache import CacheUnavailable, open_cache
from tests.moco.conftest import make_image_folder


def count_decodes(monkeypatch, module=cache_module) -> list[str]:
    """Record every decode made through `module` in this process."""
    calls: list[str] = []
    original = data_module.decode_working

    def counting(path, side):
        calls.append(str(path))
        return original(path, side)

    monkeypatch.setattr(module, "decode_working", counting)
    return calls


def test_images_are_decoded_once_and_reused(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=(60, 90))
    (root / "class0" / "bad.jpg").write_bytes(b"nope")
    calls = count_decodes(monkeypatch)
    refs = scan_images(root)
    cache = open_cache(root, refs, 37, cache_dir=tmp_path / "c", workers=0)
    assert len(calls) == len(refs) == 9
    failed = cache.failed()
    assert [refs[i].relpath for i in failed] == ["class0/bad.jpg"] and all(failed.values())
    good = next(i for i, r in enumerate(refs) if r.relpath != "class0/bad.jpg")
    pixels = cache.image(good)
    assert pixels.dtype == np.uint8 and min(pixels.shape[:2]) == 37 and pixels.shape[2] == 3
    np.testing.assert_array_equal(pixels, data_module.decode_working(refs[good].path, 37))
    calls.clear()
    again = open_cache(root, scan_images(root), 37, cache_dir=tmp_path / "c", workers=0)
    assert calls == []  # a second run decodes nothing
    np.testing.assert_array_equal(again.image(good), pixels)


def test_changed_and_new_files_are_decoded_again(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    open_cache(root, scan_images(root), 37, cache_dir=tmp_path / "c", workers=0)
    calls = count_decodes(monkeypatch)
    changed = root / "class1" / "img001.png"
    Image.new("RGB", (50, 50), (0, 0, 255)).save(changed)
    os.utime(changed, ns=(1, 1))
    Image.new("RGB", (50, 50), (0, 255, 0)).save(root / "class0" / "new.png")
    refs = scan_images(root)
    cache = open_cache(root, refs, 37, cache_dir=tmp_path / "c", workers=0)
    assert sorted(os.path.basename(c) for c in calls) == ["img001.png", "new.png"]
    i = next(i for i, r in enumerate(refs) if r.relpath == "class1/img001.png")
    assert tuple(cache.image(i)[0, 0]) == (0, 0, 255)


def test_a_cache_too_large_for_the_limit_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    with pytest.raises(CacheUnavailable, match="would need about"):
        open_cache(root, scan_images(root), 37, cache_dir=tmp_path / "c", max_bytes=100, workers=0)


def test_a_torn_cache_fill_leaves_a_usable_cache(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", classes=1, per_class=3)
    refs = scan_images(root)
    open_cache(root, refs, 37, cache_dir=tmp_path / "c", workers=0)
    folder = cache_module.cache_folder(root, 37, tmp_path / "c")
    with open(folder / "pixels.bin", "ab") as handle:  # a kill in the middle of appending
        handle.write(b"\x01" * 1000)
    cache = open_cache(root, refs, 37, cache_dir=tmp_path / "c", workers=0)
    assert all(cache.image(i).shape[2] == 3 for i in range(len(refs)))


def test_training_epochs_after_the_first_decode_nothing(tmp_path, monkeypatch):
    from moco.__main__ import main

    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=6)
    # The cache is filled by worker processes (uncounted here); the training loop runs in this one.
    calls = count_decodes(monkeypatch, data_module)
    args = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "4", "--workers", "0", "--no-channels-last"]
    assert main(["train", str(root), "--out", str(tmp_path / "run"), *args, "--epochs", "3"]) == 0
    assert calls == []  # three epochs read pixels from the cache only

    def no_decoding(path, side):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(data_module, "decode_working", no_decoding)
    monkeypatch.setattr(cache_module, "decode_working", no_decoding)
    assert main(["train", str(root), "--out", str(tmp_path / "run2"), *args, "--epochs", "1"]) == 0
    from moco.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run2")["progress"]["skipped"] == {}  # another run reuses the cache
