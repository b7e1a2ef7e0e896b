"""Budget-aware defaults: fit the preset's values to the length of the run.

The published recipes were tuned for 200-800 ImageNet epochs, hundreds of thousands of steps.
A run of a few hundred steps (a short `--time-budget`, a small folder) keeps some of their
numbers far outside the range where they work:

- the key encoder is an exponential average of the query encoder with a horizon of
  1/(1-m) steps: 1,000 steps at m = 0.999, longer than the whole run, so the keys come from a
  barely trained network to the end;
- the queue holds the keys of the last K/batch steps: 256 steps for K = 65536 at batch 256,
  during which it still holds the random vectors it started with;
- a warm-up given in epochs can cover most of a short run (MoCo v3's 10 epochs), and a run at
  full learning rate from the first step gains from a short warm-up.

`fit_to_plan` adjusts these from the planned number of steps, and only the values the user did
not set on the command line; each change is returned as a note with its reason, printed at
start and stored in the checkpoint config. `--paper-defaults` turns all of it off: the preset's
published values, capped only by the size of the folder (`config.fit_to_data`).

It runs after `fit_to_data` (batch and queue fitted to the folder), for `--epochs` runs before
training and for `--time-budget` runs once the plan exists. The constants are policy, to be
tuned by measurement.
"""

from __future__ import annotations

from collections.abc import Collection

from moco.config import TrainConfig, queue_cap_for_data
from moco.progressive import describe

MOMENTUM_HORIZON_FRACTION = 0.02
"""The key encoder's averaging horizon 1/(1-m) may span at most 2% of the planned steps, so
the keys follow the query encoder within the run. The preset's m is the upper bound, reached
from about 50,000 planned steps. Measured on CIFAR-10 (BENCHMARKS.md): at our learning rate the
query encoder moves fast, and the same 6-minute run learned far less with the horizon and queue
age of a 30-minute plan at 10% (m 0.99, K 26k: kNN 0.273) than with its own (m 0.94, K 4k: 0.317);
the 30-minute run planned at 10% was no better on the kNN monitor than that 6-minute one."""

MOMENTUM_FLOOR = 0.9
"""...but m never drops below 0.9 (a 10-step horizon): below that the key encoder follows
the query encoder so closely that the keys lose the consistency MoCo needs."""

QUEUE_AGE_FRACTION = 0.02
"""The queue may hold the keys of at most 2% of the planned steps (K <= 0.02 x steps x batch),
like the key encoder's horizon: older keys come from a much older network (see above), and a
queue that takes much of the run to fill serves stale or initial random vectors as negatives."""

WARMUP_MIN_FRACTION = 0.05
"""A linear learning-rate warm-up over at least 5% of the planned steps..."""

WARMUP_MAX_FRACTION = 0.2
"""...and at most 20% of them (a preset's warm-up in epochs can cover most of a short run)."""


def _momentum(config: TrainConfig, planned_steps: int) -> list[str]:
    horizon_cap = MOMENTUM_HORIZON_FRACTION * planned_steps
    horizon = 1.0 / (1.0 - config.moco_m)
    if horizon <= horizon_cap or config.moco_m <= MOMENTUM_FLOOR:
        return []
    new = max(MOMENTUM_FLOOR, 1.0 - 1.0 / max(1.0, horizon_cap))
    new = round(new, 4)
    if new >= config.moco_m:
        return []
    schedule = " (then raised toward 1 on the cosine schedule)" if config.moco_m_cos else ""
    floor = f", floor {MOMENTUM_FLOOR}" if new == MOMENTUM_FLOOR else ""
    note = (f"moco_m {config.moco_m:g} -> {new:g}{schedule}: an averaging horizon of {horizon:.0f} steps "
            f"would exceed {MOMENTUM_HORIZON_FRACTION:.0%} of the {planned_steps} planned steps{floor}")
    config.moco_m = new
    return [note]


def _queue(config: TrainConfig, num_images: int, planned_steps: int) -> list[str]:
    if not config.queue_size:
        return []  # v3: in-batch negatives
    batch = config.batch_size
    age_cap = int(QUEUE_AGE_FRACTION * planned_steps) * batch
    cap = max(batch, min(queue_cap_for_data(num_images, batch), age_cap))
    if config.queue_size <= cap:
        return []
    note = (f"queue_size {config.queue_size} -> {cap}: the queue would hold the keys of "
            f"{config.queue_size / batch:.0f} steps, more than {QUEUE_AGE_FRACTION:.0%} of the "
            f"{planned_steps} planned steps")
    config.queue_size = cap
    return [note]


def _warmup(config: TrainConfig, planned_steps: int, steps_per_epoch: int) -> list[str]:
    current = round(config.warmup_epochs * steps_per_epoch)
    low = round(WARMUP_MIN_FRACTION * planned_steps)
    high = round(WARMUP_MAX_FRACTION * planned_steps)
    target = min(max(current, low), high)
    if target == current:
        return []
    if current < low:
        why = f"a linear warm-up over {WARMUP_MIN_FRACTION:.0%} of the {planned_steps} planned steps"
    else:
        why = (f"the preset's {config.warmup_epochs:g} epochs ({current} steps) would exceed "
               f"{WARMUP_MAX_FRACTION:.0%} of the {planned_steps} planned steps")
    new = target / steps_per_epoch
    note = f"warmup_epochs {config.warmup_epochs:g} -> {new:.4g} ({target} step{'s' if target != 1 else ''}): {why}"
    config.warmup_epochs = new
    return [note]


FEW_STEPS = 20
"""A plan this short is not expected to beat the random network, whatever its learning rate.
Measured on the built-in digits with the demo's settings (16 px, small stem, batch 128, kNN
monitor on all 1,797 images), 14 steps: the random start scores 0.697 and every recipe tried
ended below it, less so the lower the rate: base LR 0.6 (ours) 0.504, 0.3 0.537, 0.15 0.575,
0.06 0.611, and 0.6 with a 30% warm-up 0.473. So the recipe is left as it is (a lower rate only
loses less, and would slow the plans that do learn); the run says so when it plans, and ships
the random start unless the monitor shows it was beaten (moco.quality)."""


def few_steps_note(planned_steps: int) -> list[str]:
    """A warning-note for a plan too short to learn (FEW_STEPS), with what was measured."""
    if not 0 < planned_steps < FEW_STEPS:
        return []
    return [f"{planned_steps} planned steps: runs this short were measured to end below the random network's "
            "kNN whatever the learning rate (digits, 14 steps: 0.697 at the start, 0.47-0.61 at the end); "
            "with --val the random start ships unless it is beaten; give more time to learn"]


def fit_to_plan(config: TrainConfig, explicit: Collection[str], *, num_images: int, planned_steps: int,
                steps_per_epoch: int) -> list[str]:
    """Adjust key momentum, queue size and warm-up to `planned_steps`, in place; one note per
    change. Values named in `explicit` (set on the command line) are kept as given."""
    if config.paper_defaults or planned_steps <= 0:
        return []
    notes: list[str] = []
    if "moco_m" not in explicit:
        notes += _momentum(config, planned_steps)
    if "queue_size" not in explicit:
        notes += _queue(config, num_images, planned_steps)
    if "warmup_epochs" not in explicit:
        notes += _warmup(config, planned_steps, max(1, steps_per_epoch))
    return notes + few_steps_note(planned_steps)


SHORT_RUN_BASE_LR = 0.6
"""Learning rate per 256 images with the batch-normed head: 0.03 (the paper's) moves a fresh
network too little in a few hundred steps to leave the random level; measured on CIFAR-10."""


def fit_recipe(config: TrainConfig, explicit: Collection[str]) -> list[str]:
    """The v2 recipe changes that make short runs learn, applied before the model is built (they
    do not depend on the plan); one note per change, values in `explicit` kept as given.

    Measured on CIFAR-10 at 32 px (BENCHMARKS.md): with the paper's recipe a few hundred steps
    leave the backbone at the random level while the loss climbs back to chance. A v2 head maps
    every image into one narrow cone (pairwise cosine ~0.9 at initialisation), so positives and
    negatives barely differ; batch norm in the head centres its outputs; the batch's own keys
    are negatives from the first step instead of a queue of random vectors; the paper's blur,
    meant for 224 px, wipes out a small image's detail.
    """
    if config.paper_defaults or config.preset != "v2":
        return []
    notes: list[str] = []
    if "head" not in explicit and config.head == "mlp":
        config.head = "mlp_bn"
        notes.append("head mlp -> mlp_bn: batch norm centres the head's outputs, so positives stand out "
                     "from negatives from the first step")
    if config.queue_size:
        if "batch_negatives" not in explicit and not config.batch_negatives:
            config.batch_negatives = True
            notes.append("batch_negatives on: the other keys of the batch are negatives too")
        if "queue_start" not in explicit and config.queue_start == "random":
            config.queue_start = "empty"
            notes.append("queue_start random -> empty: only real keys are negatives, never the queue's "
                         "initial random vectors")
    if "blur_relative" not in explicit and not config.blur_relative and config.image_size < 224:
        config.blur_relative = True
        notes.append(f"blur_relative on: the blur's sigma scaled to {config.image_size} px (the paper's "
                     "0.1-2 px is for 224 px)")
    if not {"lr", "base_lr"} & set(explicit) and config.base_lr < SHORT_RUN_BASE_LR:
        notes.append(f"base_lr {config.base_lr:g} -> {SHORT_RUN_BASE_LR:g}: with the batch-normed head a "
                     "higher rate leaves the random level within a few hundred steps")
        config.base_lr = SHORT_RUN_BASE_LR
    return notes


def fit_stem_to_precision(config: TrainConfig, device_type: str) -> list[str]:
    """`--stem auto` at 32 px in a CPU time budget: the ImageNet stem where the run resolved to fp32.

    At 32 px the small stem keeps a 32 x 32 map through the first stage, about 15x the ImageNet
    stem's arithmetic; it learns more per step, but in fp32 on a CPU a 30-minute budget gives it
    too few steps. Measured on CIFAR-10 at 32 px, 30 minutes on one core of a 2-core Xeon
    (BENCHMARKS.md, issue 19): small stem in fp32 170 steps, kNN 0.356 (10,000-image bank); the
    ImageNet stem in fp32 1,400-1,700 steps, 0.415 +- 0.008 (50,000-image bank), 0.383 after only
    15 minutes (10,000-image bank); the small stem in bf16 (2.6x the fp32 steps) 0.430. With issue 7's
    evaluation on 2026-12-03: the small stem in bf16 0.470 +- 0.007 (3 seeds, 527-565 steps), the
    ImageNet stem in fp32 0.455 (2,070 steps), where the small stem in fp32 would make ~200. So the stem
    follows the precision, decided after `--precision auto` timed the small stem's step. Epoch
    runs (the length is fixed, not the minutes), GPUs and sizes below 32 px (the ImageNet stem
    would leave less than one pixel) keep the small stem; `--stem small` keeps it anyway.
    """
    if (config.stem != "auto" or config.paper_defaults or config.time_budget is None or device_type != "cpu"
            or config.precision != "fp32" or config.image_size != 32):
        return []
    config.stem = "imagenet"
    return ["stem auto -> imagenet: this run is fp32 on a CPU with a time budget, where at 32 px the small "
            "stem costs about 15x the arithmetic per image and its few steps learned less (CIFAR-10, one "
            "core: kNN 0.356 after 30 minutes, below the ImageNet stem's 0.383 after 15); --stem small to keep it"]


SMALL_CROP_FRACTION = 0.45
"""Multi-crop's small crops are 0.45 of the training size by default (SwAV and DINO: 96 px
small crops beside 224 px global ones, 0.43), rounded to a multiple of 8: 32 px at 64 px, 16 at
32. A small crop costs about its pixels' share of a global view's forward, a fifth here."""


def default_small_crop_size(image_size: int) -> int:
    """SMALL_CROP_FRACTION of `image_size`, to a multiple of 8 (at least 8)."""
    return max(8, int(round(SMALL_CROP_FRACTION * image_size / 8)) * 8)


def fit_crops(config: TrainConfig) -> list[str]:
    """Derive what --multi-crop and --progressive leave unset, in place; one note per value
    with its reason. Both are opt-in, so --paper-defaults does not turn them off."""
    notes: list[str] = []
    if config.multi_crop:
        if not config.small_crop_size:
            config.small_crop_size = default_small_crop_size(config.image_size)
            why = (f"{SMALL_CROP_FRACTION:g} of --image-size {config.image_size} to a multiple of 8, like "
                   "SwAV/DINO's 96 px beside 224 px")
        else:
            why = "as given"
        low, high = config.small_crop_scale
        notes.append(f"multi_crop {config.multi_crop}: {config.multi_crop} small crops per image at "
                     f"{config.small_crop_size} px ({why}), each {low:g}-{high:g} of the image's area; query "
                     "encoder only, positives the global views' keys")
    if config.progressive:
        notes.append(describe(config.image_size, config.progressive))
    return notes
