"""Progressive resolution (`--progressive LO`), FFCV-style: train at a lower resolution early,
where steps are cheap and the network learns coarse features, then at the full size.

The training size starts at LO x --image-size and rises linearly to the full size by
RAMP_END of the schedule, then stays there, so the last quarter (and the batch-norm statistics
the network ships with) is at the size the kNN monitor and `moco eval` use. Sizes are rounded
to multiples of 8 (4 at 32 px and below) so convolution shapes recur and stay fast.

The size is a pure function of where the schedule stands (`Plan.schedule_step` over its
length), so it follows a budget plan that the pacer lengthens or shortens, and a resumed run
lands on the same sizes. The models are fully convolutional with adaptive pooling: only the
augmentation's output size changes. A step's cost is taken to grow with its pixels
(`relative_cost`), which the pacer uses to plan a budget whose later steps are dearer.
"""

from __future__ import annotations

RAMP_END = 0.75
"""The full size is reached at 75% of the planned steps (FFCV's ResNet recipes ramp until
about 85% of training; a short run keeps more of its steps at the size it is judged at)."""

SMALLEST = 8
"""No training size below 8 px (a ResNet's stride-32 stem leaves nothing to pool below that)."""


def size_multiple(image_size: int) -> int:
    """Training sizes are multiples of 8, or of 4 at 32 px and below (8 px steps are too coarse there)."""
    return 4 if image_size <= 32 else 8


def round_size(size: float, image_size: int) -> int:
    """`size` to the nearest allowed multiple, within [SMALLEST, image_size]."""
    multiple = size_multiple(image_size)
    rounded = int(round(size / multiple)) * multiple
    return max(min(SMALLEST, image_size), min(image_size, rounded))


def progressive_size(fraction: float, image_size: int, low: float) -> int:
    """The training size at `fraction` (0..1) of the schedule: low x image_size at 0, rising
    linearly to image_size at RAMP_END. `low` 0 (off) is always the full size."""
    if not low:
        return image_size
    ramp = min(1.0, max(0.0, fraction) / RAMP_END)
    return round_size(image_size * (low + (1.0 - low) * ramp), image_size)


def relative_cost(fraction: float, image_size: int, low: float) -> float:
    """A step's cost at `fraction` of the schedule relative to a full-size step: its pixels'
    share. An overestimate of what small steps save (a step's fixed costs do not shrink), so a
    plan made with it errs toward ending early, never late."""
    return (progressive_size(fraction, image_size, low) / image_size) ** 2


def describe(image_size: int, low: float) -> str:
    """The schedule in words, for the start-up notes."""
    start = progressive_size(0.0, image_size, low)
    return (f"progressive {low:g}: training size rises from {start} px to {image_size} px (multiples of "
            f"{size_multiple(image_size)}) over the first {RAMP_END:.0%} of the planned steps, full size after; "
            f"the kNN monitor and moco eval use {image_size} px")
