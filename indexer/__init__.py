"""Embed image folders with an ONNX model, index them with FAISS, search and analyse them.

The package imports lazily (PEP 562): ``import indexer.images`` must not pull in FAISS or
ONNX Runtime, because the training side (``moco``) decodes every image through
:mod:`indexer.images` and should neither pay for nor depend on the serving stack. Public names
that live in heavy sub-modules are listed in ``_LAZY`` and imported on first attribute access;
sub-modules listed in ``_SUBMODULES`` can be reached as attributes (``indexer.analysis``)
without an explicit import. Nothing under ``indexer/`` may import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> sub-module that defines it. Resolved on first access, so importing the package
# itself stays cheap.
_LAZY: dict[str, str] = {"Collection": "collection"}

# Sub-modules that may be reached as attributes of the package without importing them first.
_SUBMODULES: frozenset[str] = frozenset({"images", "analysis", "fewlabel"})
# (The indexer's heavy sub-modules, ann/embed/collection/build/..., are imported explicitly.)

__all__: list[str] = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the sub-module behind ``name`` on first use and cache the result (PEP 562)."""
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List lazy names too, so tab completion and ``dir()`` show the whole public API."""
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
