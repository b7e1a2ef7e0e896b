"""A weak embedding model for the tests: every image lands in one narrow cone.

An untrained network maps all pictures near one direction (all cosines 0.95-0.99), which is
what makes fixed similarity thresholds and raw scores meaningless. Here the tiny fixture model
(:func:`tests.indexer.conftest.make_model`) gets a large constant added before its L2 norm: the
embeddings still vary with the picture, but only a little around that shared direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .conftest import DIM, make_model


def make_weak_model(path: Path, *, strength: float = 800.0, seed: int = 1) -> Path:
    """A Contract-2 model whose embeddings all lie within a few degrees of each other."""
    import onnx
    from onnx import helper, numpy_helper

    make_model(path, props={"moco.arch": "tiny-projection-weak"})
    model = onnx.load(str(path))
    graph = model.graph
    at = next(i for i, node in enumerate(graph.node) if node.op_type == "MatMul")
    graph.node[at].output[0] = "projected"
    graph.node.insert(at + 1, helper.make_node("Add", ["projected", "shared_direction"], ["y"]))
    bias = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32) * strength
    graph.initializer.append(numpy_helper.from_array(bias, "shared_direction"))
    path.write_bytes(model.SerializeToString())
    return path
