"""One tiny training run shared by the export tests (training is the slow part)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moco.__main__ import main as moco_main

IMAGE_SIZE = 32
COLORS = [(200, 40, 40), (40, 180, 60), (50, 60, 210)]


def make_images(root: Path, *, per_class: int = 8, seed: int = 0) -> Path:
    """Three class folders of noisy coloured squares, as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for c, color in enumerate(COLORS):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 70, (44, 40, 3)).astype(np.int16)
            y, x = rng.integers(0, 22), rng.integers(0, 20)
            pixels[y:y + 22, x:x + 20] += np.array(color, np.int16)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(folder / (f"img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg"))
    return root


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("exports-data") / "train")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, images) -> Path:
    """A one-epoch resnet18 run at 32 px (small stem): a real checkpoint in a few seconds."""
    run = tmp_path_factory.mktemp("exports-run") / "run"
    code = moco_main(["train", str(images), "--out", str(run), "--epochs", "1",
                      "--image-size", str(IMAGE_SIZE), "--workers", "0", "--batch-size", "8"])
    assert code == 0
    return run / "checkpoint.pt"


def with_quality(checkpoint: Path, out: Path, quality: dict | None) -> Path:
    """A copy of ``checkpoint`` carrying the trainer's ``quality`` record (moco.checkpoint's
    contract), or none at all (a checkpoint written before quality was recorded)."""
    from moco.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    state.pop("quality", None)
    if quality is not None:
        state["quality"] = quality
    save_checkpoint(out, state)
    return out
