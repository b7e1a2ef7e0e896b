"""Contract 2 constants, shared by the exporter and the torch-free `info` command."""

from __future__ import annotations

MODEL_FORMAT_VERSION = 1
"""Version of Contract 2 (the I/O convention and metadata keys), not of the checkpoint."""

METADATA_KEYS = ("moco.format_version", "moco.image_size", "moco.embedding_dim", "moco.arch", "moco.preset",
                 "moco.resize", "moco.mean", "moco.std", "moco.checkpoint_sha256", "moco.train_data",
                 "moco.quality")
LATER_KEYS = ("moco.quality",)
"""Keys the exporter writes that models exported before them lack: readers show such a model as
"not measured" (:mod:`indexer.quality`) rather than refusing it."""
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
