"""Checkpoint -> self-describing, verified ONNX embedding model (Contract 2).

`export_checkpoint(ExportOptions(...))` is the library entry point, `python -m exports` the
command line. Names are imported lazily (PEP 562): `python -m exports --help` and
`python -m exports info` must answer without loading PyTorch.

Modules: `onnx` (build, export pipeline), `verify` (thresholds and measures), `quantize`
(int8), `samples` (check images), `info` + `contract` (reading a model back, torch-free).
ONNX Runtime sessions come from `indexer.runtime`, so a model is verified on exactly the
session set-up the indexer will run it with.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExportError": "exports.onnx",
    "ExportOptions": "exports.onnx",
    "ExportResult": "exports.onnx",
    "VerificationFailed": "exports.onnx",
    "export_checkpoint": "exports.onnx",
    "InfoError": "exports.info",
    "read_model_info": "exports.info",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'exports' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
