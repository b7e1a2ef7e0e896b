"""Presets and the effective training configuration.

A run's configuration is the preset's published values, overridden by whatever the user set on
the command line, then resolved against the data (batch size and queue size must fit the
folder). The resolved dict is printed at start and stored in every checkpoint, so a checkpoint
alone says exactly how its weights were made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHS = ("resnet18", "resnet34", "resnet50", "vit_small")
PRESETS = ("v1", "v2", "v3")


class ConfigError(ValueError):
    """A configuration the user asked for that cannot work; the CLI prints it as one line."""


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run. Field names are the CLI flags with dashes as underscores."""

    preset: str = "v2"
    arch: str = "resnet18"
    stem: str = "auto"  # "imagenet" (7x7/2 conv + max-pool), "small" (3x3/1 conv, no pool), "small_pool" (3x3/1 + pool)
    image_size: int = 64
    batch_size: int = 256
    epochs: int = 100  # with time_budget: derived from the plan (the last epoch may be partial)
    time_budget: float | None = None  # seconds of wall time, process start to final checkpoint
    paper_defaults: bool = False  # True: the preset's published values, no budget-aware adjustment
    # Optimisation. lr = base_lr * batch_size / 256 unless lr is given explicitly.
    optimizer: str = "sgd"  # sgd | lars | adamw
    base_lr: float = 0.03
    lr: float | None = None
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | step (v1: x0.1 at 60% and 80% of training)
    warmup_epochs: float = 0.0
    # MoCo.
    head: str = "mlp"  # linear (v1) | mlp (v2) | mlp_bn (v2 with batch norm) | v3 (projector + predictor with BN)
    dim: int = 128
    mlp_dim: int | None = None  # hidden width; None = backbone width (v2)
    queue_size: int = 65536
    queue_start: str = "random"  # random: K random unit vectors (the paper) | empty: only real keys count
    batch_negatives: bool = False  # the other keys of the batch are negatives too, besides the queue
    moco_m: float = 0.999
    moco_m_cos: bool = False  # cosine schedule of the key momentum toward 1
    temperature: float = 0.2
    symmetric: bool = False
    bn_splits: int = 8  # split-BN sub-batches on one device; 1 turns it off
    stop_grad_conv1: bool = False  # v3 ViT: frozen random patch projection
    # Augmentation.
    augment: str = "v2"  # v1 | v2 | v3 (BYOL-style, asymmetric blur and solarize)
    crop_min_scale: float = 0.2
    blur_relative: bool = False  # scale the blur's sigma with the training size (the paper's is for 224 px)
    augment_on: str = "device"  # device: batched tensor ops on the training device | workers: per image
    multi_crop: int = 0  # small crops per image besides the two global views (query encoder only); 0: off
    small_crop_size: int = 0  # their resolution; 0: derived from image_size at start (moco.defaults)
    small_crop_scale: tuple[float, float] = (0.05, 0.3)  # their random-resized-crop area range
    progressive: float = 0.0  # start at this fraction of image_size and rise to it (moco.progressive); 0: off
    # Data and records.
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    seed: int = 0
    deterministic: bool = False
    workers: int = 1
    cache: bool = True  # decoded-image cache: decode each image once, reuse across epochs and runs
    cache_dir: str | None = None
    cache_max_gb: float = 20.0
    checkpoint_every: float = 10.0  # minutes
    eval_every: int = 1  # epochs, for the kNN monitor when --val is given (--epochs runs)
    monitor_evals: int = 6  # kNN evaluations spread over a --time-budget run, after the one at the start
    knn_max_images: int = 2000  # kNN monitor: at most this many bank and query images each (0: all)
    knn_k: int = 200
    knn_t: float = 0.1
    log_every: int = 10  # steps between metric records
    channels_last: bool = True
    precision: str = "auto"  # auto | fp32 | bf16 (autocast of the encoders); resolved at start, see moco.precision
    precision_reason: str = ""  # why the run uses its precision (filled in at start)
    compile: bool = False  # torch.compile the training step (slow to start; pays off on long GPU runs)
    format_version: int = FORMAT_VERSION
    # Filled in by resolve(): facts about the data the run was made on.
    embedding_dim: int = 0
    train_images: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        out["small_crop_scale"] = list(self.small_crop_scale)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("mean", "std", "small_crop_scale"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


# The published recipes. v1: He et al. 2019; v2: Chen et al. 2020 (arXiv 2003.04297);
# v3: Chen, Xie, He 2021 (arXiv 2104.02057), ResNet values with the ViT changes in _VIT_V3.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "v1": dict(head="linear", dim=128, queue_size=65536, moco_m=0.999, temperature=0.07,
               augment="v1", crop_min_scale=0.2, optimizer="sgd", base_lr=0.03,
               weight_decay=1e-4, lr_schedule="step", warmup_epochs=0.0, symmetric=False,
               moco_m_cos=False),
    "v2": dict(head="mlp", dim=128, queue_size=65536, moco_m=0.999, temperature=0.2,
               augment="v2", crop_min_scale=0.2, optimizer="sgd", base_lr=0.03,
               weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0.0, symmetric=False,
               moco_m_cos=False),
    "v3": dict(head="v3", dim=256, mlp_dim=4096, queue_size=0, moco_m=0.99, temperature=1.0,
               augment="v3", crop_min_scale=0.08, optimizer="lars", base_lr=0.6,
               weight_decay=1e-6, lr_schedule="cosine", warmup_epochs=10.0, symmetric=True,
               moco_m_cos=True),
}
_VIT_V3 = dict(optimizer="adamw", base_lr=1.5e-4, weight_decay=0.1, temperature=0.2,
               warmup_epochs=40.0, stop_grad_conv1=True)


def preset_defaults(preset: str, arch: str) -> dict[str, Any]:
    if preset not in PRESET_VALUES:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    values = dict(PRESET_VALUES[preset])
    if preset == "v3" and arch == "vit_small":
        values.update(_VIT_V3)
    return values


def build_config(overrides: dict[str, Any]) -> TrainConfig:
    """Preset values first, then every value the user set explicitly (None means 'not set')."""
    given = {key: value for key, value in overrides.items() if value is not None}
    preset = given.get("preset", "v2")
    arch = given.get("arch", "resnet18")
    values = preset_defaults(preset, arch)
    values.update(given)
    config = TrainConfig(**values)
    validate(config)
    return config


STEMS = ("auto", "imagenet", "small", "small_pool")


def validate(config: TrainConfig) -> None:
    if config.image_size < 16:
        raise ConfigError(f"--image-size must be at least 16, got {config.image_size}")
    if config.arch == "vit_small" and config.image_size % 16:
        raise ConfigError(f"vit_small needs --image-size divisible by 16, got {config.image_size}")
    if config.stem not in STEMS:
        raise ConfigError(f"--stem must be {', '.join(STEMS[:-1])} or {STEMS[-1]}, got {config.stem!r}")
    if config.head not in ("linear", "mlp", "mlp_bn", "v3"):
        raise ConfigError(f"--head must be linear, mlp, mlp_bn or v3, got {config.head!r}")
    if config.optimizer not in ("sgd", "lars", "adamw"):
        raise ConfigError(f"--optimizer must be sgd, lars or adamw, got {config.optimizer!r}")
    if config.lr_schedule not in ("cosine", "step"):
        raise ConfigError(f"--lr-schedule must be cosine or step, got {config.lr_schedule!r}")
    if config.augment not in ("v1", "v2", "v3"):
        raise ConfigError(f"--augment must be v1, v2 or v3, got {config.augment!r}")
    if config.time_budget is None and config.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {config.epochs}")
    if config.time_budget is not None and config.time_budget <= 0:
        raise ConfigError(f"--time-budget must be positive, got {config.time_budget} s")
    if config.monitor_evals < 1:
        raise ConfigError(f"--monitor-evals must be at least 1, got {config.monitor_evals}")
    if config.knn_max_images < 0:
        raise ConfigError(f"--knn-max-images must be 0 (all) or more, got {config.knn_max_images}")
    if not 0.0 <= config.moco_m < 1.0:
        raise ConfigError(f"--moco-m must be in [0, 1), got {config.moco_m}")
    if config.temperature <= 0:
        raise ConfigError(f"--temperature must be positive, got {config.temperature}")
    if config.bn_splits < 1:
        raise ConfigError(f"--bn-splits must be at least 1, got {config.bn_splits}")
    if config.head == "v3" and config.queue_size:
        raise ConfigError("the v3 head uses in-batch negatives: set --queue-size 0")
    if config.queue_start not in ("random", "empty"):
        raise ConfigError(f"--queue-start must be random or empty, got {config.queue_start!r}")
    if config.augment_on not in ("device", "workers"):
        raise ConfigError(f"--augment-on must be device or workers, got {config.augment_on!r}")
    if config.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, got {config.precision!r}")
    if not 0.0 < config.crop_min_scale <= 1.0:
        raise ConfigError(f"--crop-min-scale must be in (0, 1], got {config.crop_min_scale}")
    validate_crops_and_resolution(config)


def validate_crops_and_resolution(config: TrainConfig) -> None:
    """--multi-crop, --small-crop-size/-scale and --progressive (issue 19)."""
    if config.multi_crop < 0:
        raise ConfigError(f"--multi-crop must be 0 (off) or more small crops, got {config.multi_crop}")
    if config.small_crop_size < 0 or 0 < config.small_crop_size < 8 or config.small_crop_size > config.image_size:
        raise ConfigError(f"--small-crop-size must be 8 to --image-size ({config.image_size}) px, got "
                          f"{config.small_crop_size}")
    low, high = config.small_crop_scale
    if not 0.0 < low < high <= 1.0:
        raise ConfigError(f"--small-crop-scale must be LO,HI with 0 < LO < HI <= 1, got {low:g},{high:g}")
    if config.progressive and not 0.0 < config.progressive < 1.0:
        raise ConfigError(f"--progressive must be a fraction of --image-size in (0, 1), got {config.progressive:g}")
    if config.augment_on != "device" and (config.multi_crop or config.progressive):
        flag = "--multi-crop" if config.multi_crop else "--progressive"
        raise ConfigError(f"{flag} needs --augment-on device (the per-image workers make two fixed-size views)")


def resolve_stem(config: TrainConfig) -> str:
    """The CIFAR-style stem keeps resolution for tiny inputs; at 64 px and up the ImageNet
    stem is 16x cheaper and still leaves a 2x2 map before pooling."""
    if config.stem != "auto":
        return config.stem
    return "small" if config.image_size <= 32 else "imagenet"


def queue_cap_for_data(num_images: int, batch_size: int) -> int:
    """Largest queue (a multiple of the batch) that stays below the number of images."""
    return max(batch_size, (num_images - batch_size) // batch_size * batch_size)


def fit_to_data(config: TrainConfig, num_images: int, batch_size_given: bool) -> list[str]:
    """Shrink batch and queue to what the folder can feed; returns a message per change.

    The queue must stay below the number of images: a longer queue would hold a stale key of
    the very image being queried, a false negative that teaches the model nothing but noise.
    """
    messages: list[str] = []
    if batch_size_given and config.batch_size > num_images:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {num_images} "
                          "usable images in the folder")
    if not batch_size_given and num_images < 2 * config.batch_size:
        new_batch = max(2, 2 ** int(math.log2(max(2, num_images // 2))))
        messages.append(f"batch size lowered from {config.batch_size} to {new_batch} to fit "
                        f"{num_images} images")
        config.batch_size = new_batch
    if config.batch_size < 2:
        raise ConfigError("training needs a batch of at least 2 images")
    if config.queue_size:
        cap = queue_cap_for_data(num_images, config.batch_size)
        if config.queue_size > cap:
            messages.append(f"queue size capped from {config.queue_size} to {cap}, below the "
                            f"{num_images} training images")
            config.queue_size = cap
    config.train_images = num_images
    return messages
