"""Images for checking an export: random, generated natural-looking, and real folders.

Real images go through `indexer.images` (decode, resize recipe, center crop, uint8 HWC), the
exact path the indexer later feeds the model, so a check here measures what users will get.

Why generated "natural-ish" images besides uniform noise: noise drives every unit of a
network into one narrow regime and all its embeddings end up nearly identical, so noise can
hide errors that only show on structured inputs (edges, smooth regions, saturated colours),
and neighbour rankings among noise images are mostly ties. Smooth colour fields with edges
and a little grain are a cheap stand-in for photos when no folder is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from indexer.images import (
    ImageDecodeError,
    apply_resize,
    load_rgb,
    resize_recipe,
    scan_images,
    to_uint8_array,
    working_size,
)

UInt8Images = npt.NDArray[np.uint8]


class SampleError(ValueError):
    """An image folder that cannot serve for checks; the message is one line for the user."""


def random_images(count: int, size: int, seed: int = 0) -> UInt8Images:
    """Uniform noise, with the first two images all 0 and all 255 (the uint8 range's edges,
    where a wrong cast or scale in the graph shows first)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    if count > 0:
        images[0] = 0
    if count > 1:
        images[1] = 255
    return images


def natural_images(count: int, size: int, seed: int = 0) -> UInt8Images:
    """Smooth random colour fields with a hard-edged shape and mild grain (see module doc)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    for i in range(count):
        cells = int(rng.integers(2, 7))
        coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        field_ = np.asarray(smooth, np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-80, 80, 3)
        cy, cx, radius = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.35)]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius ** 2
        picture = field_ + gradient
        picture[disc] = rng.integers(0, 256, 3)
        picture += rng.normal(0, 6, picture.shape)
        out[i] = np.clip(picture, 0, 255).astype(np.uint8)
    return out


@dataclass
class FolderSample:
    """Images read from a folder: pixels, their relative paths, and files that failed to decode."""

    images: UInt8Images
    relpaths: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def spread(total: int, count: int, offset: float = 0.0) -> list[int]:
    """`count` indices spread evenly over range(total) (all of them if total <= count).

    Folders are sorted by class, so evenly spaced picks cover every class, unlike the first N.
    `offset` in [0, 1) shifts the picks, so two samples of one folder overlap little.
    """
    if total <= count:
        return list(range(total))
    step = total / count
    return sorted({min(total - 1, int((i + offset) * step)) for i in range(count)})


def folder_images(root: str | os.PathLike[str], image_size: int, limit: int, *, offset: float = 0.0,
                  ) -> FolderSample:
    """Up to `limit` images from a folder tree, decoded and resized exactly as the indexer does.

    Undecodable files are skipped and listed; a folder with no usable image raises SampleError.
    """
    path = Path(root)
    try:
        refs = scan_images(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        raise SampleError(str(err)) from None
    if not refs:
        raise SampleError(f"no images (jpg, png, webp, bmp, tif, gif) found under {path}")
    recipe = resize_recipe(image_size)
    min_side = working_size(image_size)
    images: list[UInt8Images] = []
    relpaths: list[str] = []
    skipped: dict[str, str] = {}
    for index in spread(len(refs), limit, offset):
        ref = refs[index]
        try:
            picture = apply_resize(load_rgb(ref.path, min_side=min_side), recipe)
        except ImageDecodeError as err:
            skipped[ref.relpath] = err.reason
            continue
        images.append(to_uint8_array(picture))
        relpaths.append(ref.relpath)
    if not images:
        raise SampleError(f"none of the {len(skipped)} images tried under {path} could be decoded")
    return FolderSample(np.stack(images), relpaths, skipped)
