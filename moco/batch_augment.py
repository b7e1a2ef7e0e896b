"""Two-view augmentation as batched tensor math on the training device.

The per-image torchvision pipeline (`moco.augment`) spends a worker process per image on
PIL calls; here a whole batch is cropped, resized, colour-jittered, blurred and flipped in a
handful of tensor ops, on the GPU when there is one. Each sample draws its own parameters from
the same distributions as the per-image pipeline; the functional ops below take per-sample
parameter tensors and match torchvision's functional transforms for equal parameters (tested).

Images arrive as uint8 [N, 3, H, W] padded to a common size, with each image's true (h, w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from moco.augment import BLUR_KERNEL, blur_kernel, blur_sigma
from moco.progressive import round_size

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale


# -- parameter sampling ---------------------------------------------------------------------------
def sample_crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      attempts: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop's box sampler, vectorised: up to `attempts` (area, aspect) draws per
    image, the first that fits wins, else the central crop clamped to the ratio range.

    sizes: [N, 2] (h, w). Returns boxes [N, 4] as (x0, y0, x1, y1) in pixels.
    """
    n = sizes.shape[0]
    h, w = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    area = h * w
    target = area * torch.empty(n, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.argmax(fits.int(), dim=1)
    any_fit = fits.any(dim=1)
    rows = torch.arange(n)
    cw, ch = cw[rows, first], ch[rows, first]
    # Fallback (as torchvision): whole image, cropped to the nearest allowed aspect ratio.
    in_ratio = w[:, 0] / h[:, 0]
    fb_w = torch.where(in_ratio < ratio[0], w[:, 0], torch.where(in_ratio > ratio[1], (h[:, 0] * ratio[1]).round(),
                                                                  w[:, 0]))
    fb_h = torch.where(in_ratio < ratio[0], (w[:, 0] / ratio[0]).round(), h[:, 0])
    cw = torch.where(any_fit, cw, fb_w)
    ch = torch.where(any_fit, ch, fb_h)
    u = torch.rand(n, 2, generator=generator)
    x0 = torch.where(any_fit, torch.floor(u[:, 0] * (w[:, 0] - cw + 1)), torch.floor((w[:, 0] - cw) / 2))
    y0 = torch.where(any_fit, torch.floor(u[:, 1] * (h[:, 0] - ch + 1)), torch.floor((h[:, 0] - ch) / 2))
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)


# -- functional ops on float [N, 3, H, W] in [0, 1], parameters per sample -----------------------
def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, source: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Crop each box and resize it to size x size with bilinear sampling; roi_align averages
    several samples per output pixel when shrinking, which stands in for antialiasing.

    `source`: the image each box is cut from (default: box i from image i), so several crops
    of one image need no copies of it."""
    if source is None:
        index = torch.arange(images.shape[0], device=images.device, dtype=images.dtype).unsqueeze(1)
    else:
        index = source.to(images.device, images.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(images.device, images.dtype)], dim=1)
    # aligned=True: box corners are pixel edges, pixel j spans [j, j+1), as in torchvision crops.
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


def grey(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor, images)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grey(images).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * grey(images)).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, in [-0.5, 0.5]) through HSV, as torchvision.

    The same values as torchvision's RGB -> HSV -> RGB round trip, in fewer passes over the
    batch: hue in sixths of a turn from the channel that holds the maximum, and back with the
    closed form c = v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for
    r, g, b (v * s is the chroma). torchvision's six-sector table, built as a [N, 3, 6, H, W]
    tensor of candidates and contracted, was half the CPU cost of a whole augmented batch."""
    r, g, b = images.unbind(dim=1)
    minc, maxc = torch.aminmax(images, dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    sixths = torch.where(maxc == r, (g - b) / safe,
                         torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    turn = 6.0 * shift.to(images.device, images.dtype).view(-1, 1, 1, 1)
    n = torch.tensor((5.0, 3.0, 1.0), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(sixths.unsqueeze(1) + (n + turn), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, as two grouped convolutions with
    reflect padding (torchvision's gaussian_blur pads the same way)."""
    n, c, h, w = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x.view(1, -1) / sigma.to(images.device, images.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, k]
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def solarize(images: torch.Tensor, apply: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    flipped = torch.where(images >= threshold, 1.0 - images, images)
    return torch.where(_per_sample(apply, images).bool(), flipped, images)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_in_order(images: torch.Tensor, factors: list[torch.Tensor], order: torch.Tensor, *,
                   masked: bool) -> torch.Tensor:
    """The four jitter ops with each sample's own factors, in each sample's own order ([N, 4],
    a permutation of op indices per row): at each position every sample applies the op its
    order names there.

    `masked` evaluates every op on the whole batch and selects with masks: 16 op evaluations,
    but no host synchronisation, which is what a GPU wants. Unmasked (the CPU way) gathers the
    rows that apply each op: 4 evaluations, and nonzero() synchronises, which costs a CPU
    nothing. Both give the same result (tested), so the GPU path is checked on a CPU."""
    out = images
    for position in range(4):
        if masked:
            step = out
            for op_index, op in enumerate(JITTER_OPS):
                chosen = (order[:, position] == op_index).view(-1, 1, 1, 1)
                step = torch.where(chosen, op(out, factors[op_index]), step)
        else:
            step = torch.empty_like(out)  # order rows are permutations: every row is written once
            for op_index, op in enumerate(JITTER_OPS):
                rows = torch.nonzero(order[:, position] == op_index).squeeze(1)
                if rows.numel():
                    step[rows] = op(out[rows], factors[op_index][rows])
        out = step
    return out


def apply_where(images: torch.Tensor, use: torch.Tensor, op, *params: torch.Tensor, masked: bool) -> torch.Tensor:
    """`op(images, *params)` for the samples `use` selects ([N] bool), the others unchanged;
    `params` are per-sample tensors ([N, ...]) that go with their samples.

    Masked evaluates `op` on the whole batch and selects with `torch.where` (no host
    synchronisation: the GPU way). Unmasked (the CPU way) gathers the chosen rows, runs `op` on
    them alone and writes them back into `images` in place, so a blur drawn for half the batch
    costs half a blur; the pipeline passes only tensors it made itself. Both give the same
    result (tested)."""
    if masked:
        return torch.where(use.view(-1, 1, 1, 1), op(images, *params), images)
    rows = torch.nonzero(use).squeeze(1)
    if rows.numel() == 0:
        return images
    chosen = op(images.index_select(0, rows), *(p.index_select(0, rows.to(p.device)) for p in params))
    return images.index_copy_(0, rows, chosen.to(images.dtype))


def grey_rgb(images: torch.Tensor) -> torch.Tensor:
    return grey(images).expand_as(images)


def flip_horizontal(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


# -- the pipeline --------------------------------------------------------------------------------
class BatchView:
    """One view's recipe (v1, v2 or v3), applied to a whole batch with per-sample draws."""

    def __init__(self, recipe: str, image_size: int, crop_min_scale: float, *, view: int,
                 blur_relative: bool = False, crop_max_scale: float = 1.0, masked: bool | None = None) -> None:
        """`masked`: apply each random op by masks over the whole batch (True), or only to the
        rows that drew it (False); None: masks on a GPU, rows on a CPU (see `apply_where`)."""
        self.masked = masked
        self.size = image_size
        self.blur_relative = blur_relative
        self.sigma = blur_sigma(image_size, blur_relative)
        self.kernel = blur_kernel(self.sigma)
        self.scale = (crop_min_scale, crop_max_scale)
        if recipe == "v1":
            self.jitter, self.jitter_p, self.blur_p, self.solarize_p = (0.4, 0.4, 0.4, 0.4), 1.0, 0.0, 0.0
        elif recipe == "v2":
            self.jitter, self.jitter_p, self.blur_p, self.solarize_p = (0.4, 0.4, 0.4, 0.1), 0.8, 0.5, 0.0
        elif recipe == "v3":
            self.jitter, self.jitter_p = (0.4, 0.4, 0.2, 0.1), 0.8
            self.blur_p, self.solarize_p = (1.0, 0.0) if view == 1 else (0.1, 0.2)
        else:
            raise ValueError(f"unknown augmentation recipe {recipe!r}")
        self.grey_first = recipe == "v1"  # v1 applies RandomGrayscale before the jitter

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator, *,
                 size: int | None = None, copies: int = 1) -> torch.Tensor:
        """`size`: this batch's output size instead of the view's own (progressive resolution; a
        relative blur scales with it). `copies`: crops per image, each with its own draws, as
        [copies x N] samples, copy-major (all images' first crop, then their second, ...)."""
        n = images.shape[0] * copies
        device = images.device
        out_size, sigma = self.size, self.sigma
        if size is not None and size != self.size:
            out_size = size
            if self.blur_relative:
                sigma = (sigma[0] * size / self.size, sigma[1] * size / self.size)

        def draw(*shape: int) -> torch.Tensor:  # CPU draws: the same stream on any device
            return torch.rand(*shape, generator=generator).to(device)

        if copies == 1:
            boxes = sample_crop_boxes(sizes, self.scale, generator=generator)
            x = crop_resize(images, boxes, out_size)
        else:
            boxes = sample_crop_boxes(sizes.repeat(copies, 1), self.scale, generator=generator)
            x = crop_resize(images, boxes, out_size, source=torch.arange(images.shape[0]).repeat(copies))
        masked = self._masked_on(device)  # x is this call's own tensor: the row path writes into it
        if self.grey_first:
            x = apply_where(x, draw(n) < 0.2, grey_rgb, masked=masked)
        x = self.colour_jitter(x, draw)
        if not self.grey_first:
            x = apply_where(x, draw(n) < 0.2, grey_rgb, masked=masked)
        if self.blur_p > 0:
            use = draw(n) < self.blur_p
            blur = sigma[0] + draw(n) * (sigma[1] - sigma[0])
            x = apply_where(x, use, lambda rows, s: gaussian_blur(rows, s, self.kernel), blur, masked=masked)
        if self.solarize_p > 0:
            x = solarize(x, draw(n) < self.solarize_p)
        return apply_where(x, draw(n) < 0.5, flip_horizontal, masked=masked)

    def _masked_on(self, device: torch.device) -> bool:
        return device.type != "cpu" if self.masked is None else self.masked

    def colour_jitter(self, x: torch.Tensor, draw) -> torch.Tensor:
        """ColorJitter with per-sample factors and a per-sample random order of the four ops:
        at each of the four positions every sample applies the op its order names there.
        `draw(*shape)` gives uniform numbers (the view's generator); on a CPU the samples left
        unjittered are not computed and `x` is written in place."""
        n = x.shape[0]
        b, c, s, h = self.jitter
        factors = [1 + (draw(n) * 2 - 1) * b, 1 + (draw(n) * 2 - 1) * c, 1 + (draw(n) * 2 - 1) * s,
                   (draw(n) * 2 - 1) * h]  # in JITTER_OPS order
        order = torch.argsort(draw(n, 4), dim=1)
        use = draw(n) < self.jitter_p
        masked = self._masked_on(x.device)
        return apply_where(x, use, lambda rows, *drawn: apply_in_order(rows, list(drawn[:4]), drawn[4], masked=masked),
                           *factors, order, masked=masked)


class BatchTwoViews:
    """Two views of a padded uint8 batch, as float [N, 3, S, S] in [0, 1] on its device."""

    def __init__(self, recipe: str, image_size: int, crop_min_scale: float, *, blur_relative: bool = False) -> None:
        self.first = BatchView(recipe, image_size, crop_min_scale, view=1, blur_relative=blur_relative)
        self.second = BatchView(recipe, image_size, crop_min_scale, view=2, blur_relative=blur_relative)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator, *,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`size`: this batch's output size (progressive resolution); None: the configured one."""
        x = images.float().div_(255)
        return self.first(x, sizes, generator, size=size), self.second(x, sizes, generator, size=size)


class BatchMultiCrop:
    """Multi-crop (SwAV; solo-learn's MoCo V2+): the two global views, drawn exactly as
    `BatchTwoViews` draws them, then `count` small crops per image at `small_size`, cut from
    a `small_scale` share of its area, as one [count x N, 3, s, s] batch (copy-major).

    The small crops take the second view's recipe (for v3 its light blur and solarize: a
    heavy blur leaves a small crop little to match). Returns (view1, view2, small)."""

    def __init__(self, recipe: str, image_size: int, crop_min_scale: float, *, count: int, small_size: int,
                 small_scale: tuple[float, float], blur_relative: bool = False) -> None:
        if count < 1:
            raise ValueError(f"multi-crop needs at least one small crop, got {count}")
        self.global_views = BatchTwoViews(recipe, image_size, crop_min_scale, blur_relative=blur_relative)
        self.small = BatchView(recipe, small_size, small_scale[0], view=2, blur_relative=blur_relative,
                               crop_max_scale=small_scale[1])
        self.count, self.image_size = count, image_size

    def small_size_at(self, size: int | None) -> int | None:
        """The small crops' size when the global views are `size` px (progressive resolution):
        the same share of it, rounded as the global sizes are; None: their own size."""
        if size is None or size == self.image_size:
            return None
        return round_size(self.small.size * size / self.image_size, self.small.size)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator, *,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.float().div_(255)
        first = self.global_views.first(x, sizes, generator, size=size)
        second = self.global_views.second(x, sizes, generator, size=size)
        small = self.small(x, sizes, generator, size=self.small_size_at(size), copies=self.count)
        return first, second, small
