"""Batched device augmentation: equal to torchvision for fixed parameters, right distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from moco import batch_augment as B


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(6, 3, 20, 24)


@pytest.mark.parametrize("op, reference, values", [
    (B.adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
    (B.adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
    (B.adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4]),
    (B.adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.07]),
])
def test_colour_ops_match_torchvision_per_sample(images, op, reference, values):
    params = torch.tensor(values * 2)
    out = op(images, params)
    for i in range(images.shape[0]):
        torch.testing.assert_close(out[i], reference(images[i], float(params[i])), rtol=1e-4, atol=1e-4)


def test_hue_matches_torchvision_on_greys_ties_and_extremes():
    """Decoded photos are uint8: ties between channels, greys, black and white are common, and
    each is a branch of the RGB -> HSV conversion."""
    torch.manual_seed(1)
    quantised = torch.randint(0, 4, (4, 3, 16, 16)).float() / 3  # four levels: many ties
    quantised[:, :, :4] = quantised[:, :1, :4]  # grey rows
    quantised[:, :, 4, :4] = 0.0
    quantised[:, :, 4, 4:8] = 1.0
    shifts = torch.tensor([-0.5, -0.2, 0.3, 0.5])
    out = B.adjust_hue(quantised, shifts)
    for i in range(quantised.shape[0]):
        torch.testing.assert_close(out[i], TF.adjust_hue(quantised[i], float(shifts[i])), rtol=1e-4, atol=1e-4)


def test_blur_matches_torchvision_per_sample(images):
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    out = B.gaussian_blur(images, sigmas)
    for i in range(images.shape[0]):
        expected = TF.gaussian_blur(images[i], [B.BLUR_KERNEL, B.BLUR_KERNEL], [float(sigmas[i])] * 2)
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


def test_grey_and_solarize_match_torchvision(images):
    torch.testing.assert_close(B.grey(images)[0], TF.rgb_to_grayscale(images[0]), rtol=1e-5, atol=1e-5)
    apply = torch.tensor([1, 0, 1, 0, 1, 0])
    out = B.solarize(images, apply)
    torch.testing.assert_close(out[0], TF.solarize(images[0], 128 / 255))
    torch.testing.assert_close(out[1], images[1])


def test_crop_resize_matches_a_resized_crop_for_an_integer_box():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    box = torch.tensor([[8.0, 4.0, 24.0, 20.0]])  # 16 x 16 crop, resized to 16: an identity resample
    out = B.crop_resize(image, box, 16)
    torch.testing.assert_close(out[0], image[0, :, 4:20, 8:24], rtol=1e-4, atol=1e-4)


def test_crop_boxes_follow_the_random_resized_crop_ranges():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[73, 97]] * 4000)
    boxes = B.sample_crop_boxes(sizes, (0.2, 1.0), generator=generator)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 97).all() and (boxes[:, 3] <= 73).all()
    area = w * h / (73 * 97)
    assert area.min() >= 0.19 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 3 / 4 - 0.05 and aspect.max() <= 4 / 3 + 0.05
    # area ~ U(0.2, 1) for the draws that fit: mean near 0.6 (slightly less: big crops fit less often)
    assert 0.5 < float(area.mean()) < 0.62


def test_pipeline_shapes_probabilities_and_reproducibility():
    torch.manual_seed(0)
    padded = (torch.rand(400, 3, 40, 50) * 255).to(torch.uint8)
    sizes = torch.tensor([[40, 50]] * 400)
    views = B.BatchTwoViews("v2", 16, 0.2)
    a1, a2 = views(padded, sizes, torch.Generator().manual_seed(1))
    b1, b2 = views(padded, sizes, torch.Generator().manual_seed(1))
    assert a1.shape == (400, 3, 16, 16) and a1.dtype == torch.float32
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert float(a1.min()) >= 0.0 and float(a1.max()) <= 1.0
    grey = ((a1[:, 0] - a1[:, 1]).abs().amax(dim=(1, 2)) < 1e-6) & ((a1[:, 1] - a1[:, 2]).abs().amax(dim=(1, 2)) < 1e-6)
    assert 0.13 < float(grey.float().mean()) < 0.27  # RandomGrayscale p = 0.2


def test_jitter_applies_with_probability_p():
    image = torch.full((1, 3, 8, 8), 0.5)
    image[:, 0] = 0.8
    view = B.BatchView("v2", 8, 1.0, view=1)
    generator = torch.Generator().manual_seed(0)
    changed = 0
    trials = 600
    x = image.expand(trials, -1, -1, -1).contiguous()
    out = view.colour_jitter(x.clone(), lambda *shape: torch.rand(*shape, generator=generator))
    changed = ((out - x).abs().amax(dim=(1, 2, 3)) > 1e-6).float().mean()
    assert math.isclose(float(changed), 0.8, abs_tol=0.06)


def test_padding_does_not_leak_into_crops():
    """An image smaller than the padded batch is sampled from its own pixels only."""
    import numpy as np

    from moco.data import pad_batch

    big = np.zeros((40, 40, 3), np.uint8)  # a dark image makes the batch 40 x 40
    small = np.full((20, 30, 3), 255, np.uint8)  # a white 20 x 30 image padded into it
    padded, sizes = pad_batch([big, small] * 200)
    assert sizes[1].tolist() == [20, 30]
    boxes = B.sample_crop_boxes(sizes, (0.08, 1.0), generator=torch.Generator().manual_seed(0))
    assert (boxes[1::2, 2] <= 30).all() and (boxes[1::2, 3] <= 20).all()
    out = B.crop_resize(padded.float() / 255, boxes, 8)
    assert float(out[1::2].min()) > 0.999  # no dark padding blended in at the crop edges


def test_a_relative_blur_reaches_the_batched_views():
    from moco.augment import blur_sigma

    views = B.BatchTwoViews("v2", 32, 0.2, blur_relative=True)
    assert views.first.sigma == blur_sigma(32, relative=True) and views.first.kernel == 3
    assert B.BatchTwoViews("v2", 32, 0.2).second.sigma == (0.1, 2.0)


@pytest.mark.parametrize("masked", [False, True], ids=["gathered (CPU)", "masked (GPU)"])
def test_jitter_ops_follow_each_samples_order(images, masked):
    """Both ways of applying the four ops (the GPU's masks run on a CPU too) equal torchvision's
    ops applied one after another in each sample's own order."""
    generator = torch.Generator().manual_seed(3)
    n = images.shape[0]
    factors = [torch.empty(n).uniform_(0.6, 1.4, generator=generator) for _ in range(3)]
    factors.append(torch.empty(n).uniform_(-0.1, 0.1, generator=generator))
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    reference_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = B.apply_in_order(images, factors, order, masked=masked)
    for i in range(n):
        expected = images[i]
        for op_index in order[i].tolist():
            expected = reference_ops[op_index](expected, float(factors[op_index][i]))
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["gathered (CPU)", "masked (GPU)"])
def test_apply_where_changes_only_the_chosen_samples(images, masked):
    """A per-sample blur applied to a subset: chosen rows equal the blur of those rows with their
    own sigmas, the others are untouched; the CPU's gathered way and the GPU's masks agree."""
    use = torch.tensor([True, False, False, True, True, False])
    sigmas = torch.tensor([0.3, 0.5, 0.8, 1.1, 1.4, 1.7])
    out = B.apply_where(images.clone(), use, lambda rows, s: B.gaussian_blur(rows, s), sigmas, masked=masked)
    expected = torch.where(use.view(-1, 1, 1, 1), B.gaussian_blur(images, sigmas), images)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[~use], images[~use])


def test_apply_where_with_nothing_chosen_leaves_the_batch(images):
    out = B.apply_where(images.clone(), torch.zeros(6, dtype=torch.bool), B.flip_horizontal, masked=False)
    assert torch.equal(out, images)


@pytest.mark.parametrize("recipe", ["v1", "v2", "v3"])
def test_a_view_computed_by_rows_equals_the_masked_view(images, recipe):
    """The CPU computes each random op only on the rows that drew it and writes them in place;
    draw for draw, its views equal those of the GPU's masks, and the caller's batch is untouched."""
    uint8 = (images * 255).round().to(torch.uint8)
    batch = uint8.float() / 255
    before = batch.clone()
    sizes = torch.tensor([[20, 24]] * 6)
    by_rows = B.BatchView(recipe, 16, 0.2, view=2)(batch, sizes, torch.Generator().manual_seed(5), copies=3)
    masked = B.BatchView(recipe, 16, 0.2, view=2, masked=True)(batch, sizes, torch.Generator().manual_seed(5), copies=3)
    torch.testing.assert_close(by_rows, masked, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch, before)
