"""MoCo self-supervised training (v1, v2, v3) of torchvision backbones.

`load_backbone(path) -> (module, config)` is the one public way to read a training checkpoint.
Imports are lazy so that `python -m moco --help` answers without loading PyTorch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_backbone"]


def __getattr__(name: str) -> Any:
    if name == "load_backbone":
        from moco.checkpoint import load_backbone

        return load_backbone
    raise AttributeError(f"module 'moco' has no attribute {name!r}")
