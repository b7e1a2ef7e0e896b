"""`python -m exports info MODEL.onnx`: what a model file says about itself (torch-free).

A model without the Contract 2 props is refused here exactly as the indexer refuses it, so a
user finds out before building an index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from exports.contract import LATER_KEYS, METADATA_KEYS
from indexer import quality


class InfoError(ValueError):
    """A file that is not a readable MoCo embedding model; one line for the user."""


@dataclass
class ModelInfo:
    path: Path
    size_bytes: int
    props: dict[str, str]
    inputs: list[str]
    outputs: list[str]
    precision: str
    opset: int
    doc: str


def _signature(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return f"{value.name}: {dtype} [{', '.join(dims)}]"


def _precision(model: onnx.ModelProto) -> str:
    """int8 if the graph quantizes, fp16 if its weights are half, else fp32."""
    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger",
              "DynamicQuantizeLinear"}:
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a model's metadata and signature; InfoError if it is not a Contract 2 model."""
    path = Path(path)
    if not path.is_file():
        raise InfoError(f"no model file at {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for garbage
        raise InfoError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [key for key in METADATA_KEYS if key not in props and key not in LATER_KEYS]
    if missing:
        raise InfoError(f"{path} is not a MoCo embedding model: metadata lacks {', '.join(missing)} "
                        "(export it with python -m exports)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelInfo(path=path, size_bytes=path.stat().st_size, props=props,
                     inputs=[_signature(v) for v in model.graph.input],
                     outputs=[_signature(v) for v in model.graph.output],
                     precision=_precision(model), opset=opset, doc=model.doc_string)


def format_info(info: ModelInfo, providers_line: str) -> str:
    width = max(len(key) for key in info.props)
    lines = [f"model      {info.path}",
             f"size       {info.size_bytes / 1e6:.2f} MB ({info.size_bytes:,} bytes)",
             f"precision  {info.precision} (opset {info.opset})"]
    if info.doc:
        lines.append(f"about      {info.doc}")
    lines += [f"input      {sig}" for sig in info.inputs]
    lines += [f"output     {sig}" for sig in info.outputs]
    measured = quality.from_props(info.props)
    lines.append(f"quality    {measured.summary()}")
    if measured.monitor:
        lines.append(f"monitor    {measured.monitor}")
    if measured.doubtful:
        lines.append(f"warning    {measured.doubt()}")
    lines.append("metadata")
    lines += [f"  {key:<{width}}  {value}" for key, value in sorted(info.props.items())]
    lines.append(f"providers  {providers_line}")
    return "\n".join(lines)
