"""Two-view augmentation, per image, with torchvision's v2 transforms.

Each view leaves as a uint8 CHW tensor: a quarter of the bytes of float32 through the worker
queues, with scaling and mean/std normalisation done on the training device in one op.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

BLUR_SIGMA = (0.1, 2.0)
# A kernel of +-3 sigma at the largest sigma, so the blur is not truncated to a box.
BLUR_KERNEL = 2 * round(3 * BLUR_SIGMA[1]) + 1
PAPER_SIZE = 224  # the resolution the published blur sigmas were chosen for


def blur_sigma(image_size: int, relative: bool) -> tuple[float, float]:
    """The blur's sigma range in pixels. The paper's 0.1-2.0 px was meant for 224 px crops;
    `relative` scales it with the training size, so a 32 px view is blurred as much relative
    to its content as a 224 px one (unscaled, a 2 px sigma wipes out a 32 px image's detail)."""
    if not relative or image_size >= PAPER_SIZE:
        return BLUR_SIGMA
    scale = image_size / PAPER_SIZE
    return (BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale)


def blur_kernel(sigma: tuple[float, float]) -> int:
    """+-3 sigma at the largest sigma, so the blur is not truncated to a box; at least 3 taps."""
    return max(3, 2 * round(3 * sigma[1]) + 1)


def view_transform(recipe: str, image_size: int, crop_min_scale: float, *, view: int,
                   blur_relative: bool = False) -> v2.Compose:
    """One view's pipeline for preset recipe v1, v2 or v3 (v3 views differ: BYOL's asymmetry)."""
    sigma = blur_sigma(image_size, blur_relative)
    blur = v2.GaussianBlur(blur_kernel(sigma), sigma=sigma)
    crop = v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), antialias=True)
    steps: list[v2.Transform] = [crop, v2.PILToTensor()]
    if recipe == "v1":
        steps += [v2.RandomGrayscale(p=0.2), v2.ColorJitter(0.4, 0.4, 0.4, 0.4)]
    elif recipe == "v2":
        steps += [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([blur], p=0.5),
        ]
    elif recipe == "v3":
        blur_p, solarize_p = (1.0, 0.0) if view == 1 else (0.1, 0.2)
        steps += [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([blur], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
        ]
    else:
        raise ValueError(f"unknown augmentation recipe {recipe!r}")
    steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class TwoViews:
    """Two independently augmented views of one image: the positive pair."""

    def __init__(self, recipe: str, image_size: int, crop_min_scale: float, *, blur_relative: bool = False) -> None:
        self.first = view_transform(recipe, image_size, crop_min_scale, view=1, blur_relative=blur_relative)
        self.second = view_transform(recipe, image_size, crop_min_scale, view=2, blur_relative=blur_relative)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)


def normalize_on_device(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        channels_last: bool) -> torch.Tensor:
    """uint8 [N,3,H,W] (or float in [0, 1]) -> normalised float, in the memory format the model
    runs fastest in."""
    out = batch.float().div_(255) if batch.dtype == torch.uint8 else batch
    out = (out - mean) / std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
