"""The measures behind the export checks, the check images, and the int8 float islands."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exports import samples, verify
from exports.quantize import QuantizeError, float_islands


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_row_cosines():
    a = unit_rows(4, 8, 0)
    assert verify.row_cosines(a, a) == pytest.approx(np.ones(4), abs=1e-6)
    assert verify.row_cosines(a, -a) == pytest.approx(-np.ones(4), abs=1e-6)
    zeros = np.zeros((2, 8), np.float32)
    assert list(verify.row_cosines(zeros, zeros)) == [1.0, 1.0]  # both blank: agreement
    assert list(verify.row_cosines(zeros, a[:2])) == [0.0, 0.0]
    nan = a[:2].copy()
    nan[0, 0] = np.nan
    assert verify.row_cosines(nan, a[:2])[0] == -1.0
    with pytest.raises(ValueError):
        verify.row_cosines(a, a[:3])


def test_neighbour_overlap():
    a = unit_rows(60, 16, 1)
    assert verify.neighbour_overlap(a, a) == 1.0
    noisy = a + np.random.default_rng(2).normal(scale=0.01, size=a.shape).astype(np.float32)
    assert verify.neighbour_overlap(a, noisy) > 0.9
    unrelated = unit_rows(60, 16, 3)
    assert verify.neighbour_overlap(a, unrelated) < 0.4
    assert verify.neighbour_overlap(a[:3], a[:3]) == 1.0  # k capped at N - 1
    with pytest.raises(ValueError):
        verify.neighbour_overlap(a[:1], a[:1])


def test_checks_pass_and_fail():
    assert verify.Check("x", 0.9999, 0.9999, 3, "imgs").passed
    failing = verify.Check("x", 0.5, 0.7, 3, "imgs")
    assert not failing.passed and "FAILED" in failing.line()


def test_random_images_include_range_edges():
    images = samples.random_images(5, 16)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert images[0].max() == 0 and images[1].min() == 255


def test_natural_images_have_structure():
    images = samples.natural_images(4, 32, seed=0)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    # Smooth fields: neighbouring pixels are far closer than in uniform noise (~85 apart).
    steps = np.abs(np.diff(images.astype(np.int16), axis=2)).mean()
    assert steps < 30


def test_spread_covers_the_whole_range():
    assert samples.spread(5, 10) == [0, 1, 2, 3, 4]
    picks = samples.spread(100, 10)
    assert len(picks) == 10 and picks[0] == 0 and picks[-1] >= 90
    assert set(samples.spread(100, 10, offset=0.5)).isdisjoint(picks)


def test_folder_images_skip_broken_files(tmp_path, images):
    broken = tmp_path / "mixed"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    for src in sorted(images.rglob("*.png"))[:3]:
        (broken / src.name).write_bytes(src.read_bytes())
    sample = samples.folder_images(broken, 32, limit=10)
    assert sample.images.shape == (3, 32, 32, 3)
    assert sample.skipped == {"bad.jpg": "not an image"}
    with pytest.raises(samples.SampleError):
        samples.folder_images(tmp_path / "nope", 32, limit=4)
    only_bad = tmp_path / "bad_only"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"")
    with pytest.raises(samples.SampleError, match="could be decoded"):
        samples.folder_images(only_bad, 32, limit=4)


def _chain(ops: list[str]) -> onnx.ModelProto:
    nodes = [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i, op in enumerate(ops)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(f"t{len(ops)}", TensorProto.FLOAT, None)])
    return helper.make_model(graph)


def test_float_islands_keep_pre_and_post_processing_in_float():
    ops = ["Cast", "Mul", "Add", "Conv", "Relu", "Add", "Conv", "GlobalAveragePool", "ReduceL2", "Div"]
    model = _chain(ops)
    # Mul/Add before the first Conv stay float; the residual Add and pooling get quantized.
    assert float_islands(model) == ["n0", "n1", "n2", "n8", "n9"]
    with pytest.raises(QuantizeError):
        float_islands(_chain(["Relu", "Div"]))
