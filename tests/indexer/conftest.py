"""Fixtures for the indexer tests: a tiny Contract-2 ONNX model built with onnx.helper, and images.

The model (centre pixels minus 127.5, a fixed random projection, L2 norm) is not a trained
network, but it keeps every property the indexer relies on: uint8 [N,S,S,3] in, L2-normalised
float32 [N,D] out, the moco.* metadata, and similar pictures giving similar vectors. It builds
in milliseconds, so the tests need neither torch nor a training run.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.files import sha256_file

IMAGE_SIZE = 32
DIM = 16
COLORS = [(200, 40, 40), (40, 180, 60), (50, 60, 210)]


def make_model(path: Path, *, image_size: int = IMAGE_SIZE, dim: int = DIM, seed: int = 0,
               props: dict[str, str] | None = None) -> Path:
    """Write a tiny embedding model of Contract 2 to ``path``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    flat = image_size * image_size * 3
    weight = (rng.standard_normal((flat, dim)) / np.sqrt(flat)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["xf", "offset"], ["xc"]),
        helper.make_node("Reshape", ["xc", "shape"], ["xr"]),
        helper.make_node("MatMul", ["xr", "weight"], ["y"]),
        helper.make_node("ReduceL2", ["y"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe"]),
        helper.make_node("Div", ["y", "safe"], ["embeddings"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(127.5, np.float32), "offset"),
        numpy_helper.from_array(np.array([-1, flat], np.int64), "shape"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", image_size, image_size, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    meta = {
        "moco.format_version": "1", "moco.image_size": str(image_size), "moco.embedding_dim": str(dim),
        "moco.arch": "tiny-projection", "moco.preset": "test",
        "moco.resize": f"short_side={round(image_size / 0.875)};center_crop={image_size}",
        "moco.mean": "0.5,0.5,0.5", "moco.std": "0.5,0.5,0.5", "moco.checkpoint_sha256": "0" * 64,
        "moco.train_data": "none (test fixture)",
    }
    meta.update(props or {})
    helper.set_model_props(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def picture(seed: int, color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A noisy background with a coloured rectangle: distinct per seed, similar within a colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 70, (h, w, 3)).astype(np.int16)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y:y + h // 2, x:x + w // 2] += np.array(color, np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_images(root: Path, *, per_class: int = 6, seed: int = 0) -> Path:
    """Three class folders of generated pictures (JPEG and PNG) plus one unlabeled file in the root."""
    for c, color in enumerate(COLORS):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = picture(seed * 1000 + c * 100 + i, color)
            img.save(folder / (f"img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg"))
    picture(seed * 1000 + 999).save(root / "loose.jpg")
    return root


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def add_bad_files(root: Path) -> dict[str, str]:
    """Every kind of bad input of issue 5 item 5; returns relpath -> expected reason."""
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    (bad / "empty.jpg").write_bytes(b"")
    expected["bad/empty.jpg"] = "empty file"
    full = encode(picture(5, size=(200, 160)), "JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 3])
    expected["bad/truncated.jpg"] = "truncated"
    (bad / "text.png").write_bytes(b"this is not an image at all\n" * 10)
    expected["bad/text.png"] = "not an image"
    (bad / "wrong_ext.gif").write_bytes(b"%PDF-1.4\n" + b"0" * 200)  # a PDF named like an image
    expected["bad/wrong_ext.gif"] = "not an image"
    Image.new("L", (12000, 10000)).save(bad / "bomb.png", optimize=True)  # 120 Mpx, a few kB
    expected["bad/bomb.png"] = "decompression bomb"
    (bad / "two_channel_16bit.tif").write_bytes(_two_sample_tiff())  # a pixel layout Pillow cannot read
    expected["bad/two_channel_16bit.tif"] = "unsupported mode|not an image"
    os.symlink(bad / "does-not-exist.jpg", bad / "dangling.jpg")
    expected["bad/dangling.jpg"] = "broken symlink"
    if os.geteuid() != 0:
        locked = bad / "locked.jpg"
        picture(7).save(locked)
        locked.chmod(0)
        expected["bad/locked.jpg"] = "permission denied"
    return expected


def _two_sample_tiff(w: int = 4, h: int = 4) -> bytes:
    """A valid little-endian TIFF with 2 samples of 16 bits per pixel (grey + extra), no Pillow mode."""
    data = b"\x00" * (w * h * 4)
    tags = [(256, 3, w), (257, 3, h), (258, 3, None), (259, 3, 1), (262, 3, 1), (273, 4, None), (277, 3, 2),
            (278, 3, h), (279, 4, len(data))]
    ifd_off = 8
    bps_off = ifd_off + 2 + len(tags) * 12 + 4
    data_off = bps_off + 4
    out = b"II*\x00" + struct.pack("<I", ifd_off) + struct.pack("<H", len(tags))
    for tag, typ, val in tags:
        if tag == 258:
            out += struct.pack("<HHII", tag, typ, 2, bps_off)
        elif tag == 273:
            out += struct.pack("<HHII", tag, typ, 1, data_off)
        elif typ == 3:
            out += struct.pack("<HHIHH", tag, typ, 1, val, 0)
        else:
            out += struct.pack("<HHII", tag, typ, 1, val)
    return out + struct.pack("<I", 0) + struct.pack("<HH", 16, 16) + data


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    return make_images(tmp_path / "photos")


# -- an fp32 model and its verified int8 sibling (issue 18 item 3) ------------------------------

VNNI = frozenset({"fpu", "avx512_vnni", "amx_int8"})


def int8_pair(folder: Path, image_dir: Path, *, passed: bool = True, sha: str | None = None) -> tuple[Path, Path]:
    """models/photos.onnx and the int8 sibling ``exports --with-int8`` writes beside it, as the
    metadata describes them (the indexer decides from the metadata and the fp32 file's bytes)."""
    train = {"moco.train_data": f"19 images in {image_dir.resolve()}", "moco.checkpoint_sha256": "c" * 64}
    fp32 = make_model(folder / "photos.onnx", props={**train, "moco.precision": "fp32"})
    check = json.dumps({"overlap": 0.97 if passed else 0.6, "threshold": 0.85, "images": 240, "passed": passed})
    int8 = make_model(folder / "photos-int8.onnx", seed=1, props={
        **train, "moco.precision": "int8", "moco.precision_check": check, "moco.fp32_model": "photos.onnx",
        "moco.fp32_sha256": sha or sha256_file(fp32)})
    return fp32, int8
