from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moco.augment import TwoViews, normalize_on_device, view_transform


def photo(size=(60, 80), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("recipe", ["v1", "v2", "v3"])
def test_views_have_the_training_shape_and_dtype(recipe):
    views = TwoViews(recipe, 32, 0.2)(photo())
    for view in views:
        assert view.shape == (3, 32, 32) and view.dtype == torch.uint8


def test_two_views_differ_and_a_seed_repeats_them():
    pair = TwoViews("v2", 32, 0.2)
    image = photo()
    torch.manual_seed(5)
    a1, a2 = pair(image)
    torch.manual_seed(5)
    b1, b2 = pair(image)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)


def test_grayscale_probability_is_about_one_fifth():
    # A saturated image: a view is grey only when RandomGrayscale fired (jitter keeps some colour).
    image = Image.new("RGB", (40, 40), (250, 10, 10))
    transform = view_transform("v2", 16, 1.0, view=1)
    torch.manual_seed(0)
    grey = 0
    trials = 400
    for _ in range(trials):
        v = transform(image).int()
        grey += int((v[0] - v[1]).abs().max() == 0 and (v[1] - v[2]).abs().max() == 0)
    assert 0.14 < grey / trials < 0.26


def test_v3_second_view_solarizes_sometimes_and_first_never():
    image = Image.new("RGB", (40, 40), (250, 250, 250))
    first = view_transform("v3", 16, 1.0, view=1)
    second = view_transform("v3", 16, 1.0, view=2)
    torch.manual_seed(0)
    dark_first = sum(int(first(image).float().mean() < 60) for _ in range(200))
    dark_second = sum(int(second(image).float().mean() < 60) for _ in range(200))
    assert dark_first == 0 and 15 < dark_second < 70  # p = 0.2


def test_normalize_on_device_scales_and_uses_channels_last():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)
    out = normalize_on_device(batch, mean, std, channels_last=True)
    torch.testing.assert_close(out, torch.full((2, 3, 4, 4), 2.0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_a_relative_blur_scales_the_papers_sigma_with_the_image_size():
    from moco.augment import BLUR_SIGMA, blur_kernel, blur_sigma

    assert blur_sigma(32, relative=False) == BLUR_SIGMA
    assert blur_sigma(224, relative=True) == BLUR_SIGMA
    low, high = blur_sigma(32, relative=True)
    assert low == pytest.approx(0.1 * 32 / 224) and high == pytest.approx(2.0 * 32 / 224)
    assert blur_kernel((low, high)) == 3 and blur_kernel(BLUR_SIGMA) == 13
