"""The built-in demo data set: scikit-learn's bundled handwritten digits as PNG class folders.

1,797 real scanned digits ship inside scikit-learn, so the demo needs no download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from indexer.files import atomic_write_bytes

DEMO_SIZE = 32


def write_digits(out_dir: str | Path, size: int = DEMO_SIZE) -> int:
    """Write every digit as `out_dir/<digit>/digit_<n>.png`, dark ink on white, upscaled from
    8x8 to `size` px; returns the number written. Existing files are overwritten atomically."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out_dir = Path(out_dir)
    for label in range(10):
        (out_dir / str(label)).mkdir(parents=True, exist_ok=True)
    for n, (pixels, label) in enumerate(tqdm(zip(digits.images, digits.target), total=len(digits.target),
                                             desc="digits", unit="img")):
        ink = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(255 - ink, mode="L").resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        atomic_write_bytes(out_dir / str(label) / f"digit_{n:04d}.png", buffer.getvalue())
    return len(digits.target)
