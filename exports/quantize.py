"""int8 versions of an exported fp32 embedding model (ONNX Runtime's quantization tools).

Variants (all keep the uint8 `images` input and the float32 `embeddings` output):

* ``qdq`` (the default): static quantization in QuantizeLinear/DequantizeLinear form, int8
  weights per output channel, uint8 activations calibrated (min/max) on real images. ORT fuses
  each DQ -> Conv -> Q into a QLinearConv at load time, and the same file runs on GPUs and NPUs.
* ``qoperator``: the same arithmetic written as QLinearConv/QLinearAdd nodes in the file.
* ``dynamic``: int8 weights only; activation ranges measured per batch at run time
  (ConvInteger/MatMulInteger). Needs no calibration but re-scans every activation each run.

Weights are quantized to 7 bits (``reduce_range``) by default. On x86 CPUs without VNNI
(AVX2, plain AVX-512) ONNX Runtime multiplies uint8 activations by int8 weights with
vpmaddubsw, which adds pairs of products into int16 and saturates when both operands are
large; with full 8-bit weights that saturation cost a CIFAR-10 ResNet-18 a mean cosine to fp32
of 0.964 instead of 0.9993 and a third of its top-10 neighbours (BENCHMARKS.md, "ONNX export").
7-bit weights cannot overflow the pair sum and lose little elsewhere; uint8 weights (u8u8)
avoid it too, but ran 1.3x fp32 here against 2x for the 7-bit model.

The input normalization in front of the first convolution and the L2 normalization after the
last weight layer stay in float: both are a handful of element-wise ops, and quantizing the
final division would put a step function on the very vector the index stores.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx

VARIANTS = ("qdq", "qoperator", "dynamic")
DEFAULT_VARIANT = "qdq"
WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})
# Weight layers plus the ops between them that have int8 kernels, so activations stay int8
# from one conv to the next (residual Add, pooling). Normalization layers (ViT's
# LayerNormalization) stay float: their statistics are what 8-bit ranges handle worst.
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "GlobalAveragePool")
_OUTPUT_NORM_OPS = frozenset({"ReduceL2", "Clip", "Div", "Expand", "Shape"})


class QuantizeError(ValueError):
    """Quantization that cannot run; the message is one line for the user."""


def float_islands(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float: everything before the first weight layer (uint8 cast,
    layout change, mean/std) and the L2 normalization after the last one."""
    nodes = list(model.graph.node)
    weight_positions = [i for i, node in enumerate(nodes) if node.op_type in WEIGHT_OPS]
    if not weight_positions:
        raise QuantizeError("the model has no Conv, Gemm or MatMul layer to quantize")
    first, last = weight_positions[0], weight_positions[-1]
    keep = [node.name for node in nodes[:first]]
    keep += [node.name for node in nodes[last + 1:] if node.op_type in _OUTPUT_NORM_OPS]
    return keep


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name: exclusion lists refer to nodes by name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return out


class _Batches:
    """ORT's CalibrationDataReader protocol over an in-memory uint8 array."""

    def __init__(self, input_name: str, images: npt.NDArray[np.uint8], batch_size: int) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = (
            {input_name: np.ascontiguousarray(images[i:i + batch_size])}
            for i in range(0, len(images), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_int8(model: onnx.ModelProto, calibration: npt.NDArray[np.uint8] | None, *,
                  variant: str = DEFAULT_VARIANT, reduce_range: bool = True, unsigned_weights: bool = False,
                  batch_size: int = 32) -> onnx.ModelProto:
    """An int8 copy of an fp32 embedding model.

    `calibration`: uint8 [N, S, S, 3] images (required for the static variants). reduce_range:
    7-bit weights (see the module doc); unsigned_weights: uint8 instead of int8 weights.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if variant not in VARIANTS:
        raise QuantizeError(f"unknown int8 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant != "dynamic" and (calibration is None or len(calibration) == 0):
        raise QuantizeError("static int8 quantization needs calibration images")
    with tempfile.TemporaryDirectory(prefix="moco-int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(model, src)
        # Shape inference + ORT's portable (basic) graph fusions, as ORT recommends before
        # quantizing. The float islands are located on the result, whose node names count.
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - ORT's symbolic shape inference misses some graphs
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        prepared = _named(onnx.load(str(pre)))
        onnx.save(prepared, pre)
        input_name = prepared.graph.input[0].name
        weight_type = QuantType.QUInt8 if unsigned_weights else QuantType.QInt8
        common = dict(per_channel=True, reduce_range=reduce_range, weight_type=weight_type,
                      nodes_to_exclude=float_islands(prepared))
        if variant == "dynamic":
            quantize_dynamic(str(pre), str(dst), op_types_to_quantize=sorted(WEIGHT_OPS), **common)
        else:
            assert calibration is not None
            quantize_static(
                str(pre), str(dst), _Batches(input_name, calibration, batch_size),
                op_types_to_quantize=list(QUANTIZED_OPS),
                quant_format=QuantFormat.QDQ if variant == "qdq" else QuantFormat.QOperator,
                activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True}, **common)
        return onnx.load(str(dst))
