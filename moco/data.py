"""Image folders for training and evaluation, with robust decoding.

Every image is opened through `indexer.images`, the one decoding path shared with export and
indexing. A file that fails to decode never stops a run: the dataset returns a `Failure`, the
collate function drops it from the batch, and the trainer names it once and stops sampling it.

Augmentation randomness is seeded per sample from (seed, epoch, position in the epoch), not
drawn from worker RNG streams, so the same run gives the same views with any number of workers
and after resuming in the middle of an epoch.

`training_batches` wires these pieces into what the training loop reads: the loader over the
sampler's batches, and the step that makes each batch's two views on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from indexer.images import (
    ImageDecodeError,
    ImageRef,
    apply_resize,
    load_rgb,
    resize_recipe,
    scan_images,
    working_size,
)
from moco.augment import TwoViews, normalize_on_device
from moco.batch_augment import BatchMultiCrop, BatchTwoViews

if TYPE_CHECKING:
    from moco.cache import DecodedCache
    from moco.config import TrainConfig


class DataError(ValueError):
    """A data folder that cannot be used; the CLI prints it as one line."""


@dataclass
class ImageFolder:
    """Scanned images with folder labels (-1 for files directly in the root)."""

    root: Path
    refs: list[ImageRef]
    classes: list[str]
    labels: np.ndarray

    @property
    def labeled(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)


def open_folder(root: str | Path, *, classes: Sequence[str] | None = None) -> ImageFolder:
    """Scan a folder; `classes` maps labels onto another folder's class list (val onto train)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"no such folder: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    # Odd entries (a FIFO named like an image, an unreadable sub-folder) are listed too: they fail
    # to decode with their reason and so land in the run's skip summary, never silently dropped.
    try:
        refs = scan_images(root)
    except PermissionError as exc:  # the root itself cannot be listed
        raise DataError(str(exc)) from None
    if not refs:
        raise DataError(f"no images found in {root} (looked for jpg, jpeg, png, webp, bmp, tif, gif)")
    names = sorted({r.label for r in refs if r.label is not None}) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index.get(r.label, -1) if r.label is not None else -1 for r in refs], dtype=np.int64)
    return ImageFolder(root=root, refs=refs, classes=names, labels=labels)


def listing_digest(folder: ImageFolder) -> str:
    """Fingerprint of the file list, to tell a resumed run whether its data changed."""
    digest = hashlib.sha256()
    for ref in folder.refs:
        digest.update(ref.relpath.encode() + b"\0")
    return digest.hexdigest()


class Failure(NamedTuple):
    index: int
    relpath: str
    reason: str


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    """Shrink (never enlarge) so the short side is `side`: augmentation then works on a small
    image, and a 4,000 px photo costs no more to crop than a 73 px one."""
    w, h = image.size
    scale = side / min(w, h)
    if scale >= 1.0:
        return image
    return image.resize((max(side, round(w * scale)), max(side, round(h * scale))),
                        Image.Resampling.BILINEAR, reducing_gap=3.0)


MAX_ASPECT = 2.0  # longer sides are centre-cropped to twice the short side


def decode_working(path: Path, side: int) -> np.ndarray:
    """Decode to uint8 HWC at the working resolution: short side `side`, long side at most
    twice that. Random crops then start from an image only a little above the training size."""
    image = resize_short_side(load_rgb(path, min_side=side), side)
    w, h = image.size
    longest = int(side * MAX_ASPECT)
    if max(w, h) > longest:
        left, top = max(0, (w - longest) // 2), max(0, (h - longest) // 2)
        image = image.crop((left, top, left + min(w, longest), top + min(h, longest)))
    return np.asarray(image, dtype=np.uint8)


class TrainImages(Dataset):
    """Per-image augmentation in loader workers (`--augment-on workers`): yields (view1, view2,
    index) as uint8 CHW tensors; keys are (index, sample_seed)."""

    def __init__(self, refs: Sequence[ImageRef], transform: Callable, image_size: int, cache=None) -> None:
        self.refs = refs
        self.transform = transform
        self.side = working_size(image_size)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        ref = self.refs[index]
        try:
            array = self.cache.image(index) if self.cache is not None else decode_working(ref.path, self.side)
        except ImageDecodeError as err:
            return Failure(index, ref.relpath, err.reason)
        image = Image.fromarray(np.ascontiguousarray(array))
        # fork_rng keeps the caller's stream untouched when loading in the main process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            view1, view2 = self.transform(image)
        return view1, view2, index


class RawImages(Dataset):
    """Working-resolution pixels for batched augmentation on the device (the default): read
    from the decoded cache when there is one, else decoded here. Yields (uint8 HWC, index)."""

    def __init__(self, refs: Sequence[ImageRef], image_size: int, cache=None) -> None:
        self.refs = refs
        self.side = working_size(image_size)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: tuple[int, int]):
        index, _ = key
        if self.cache is not None:
            return self.cache.image(index), index
        try:
            return decode_working(self.refs[index].path, self.side), index
        except ImageDecodeError as err:
            return Failure(index, self.refs[index].relpath, err.reason)


def pad_batch(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-size HWC images -> uint8 [N, 3, Hmax, Wmax] (channels-last in memory) and each
    image's (h, w). Padding repeats each image's last row and column: bilinear sampling at a
    crop's edge then reads the edge itself, as a resize clamps, never a band of padding."""
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    batch = np.empty((len(arrays), h, w, 3), dtype=np.uint8)
    for k, array in enumerate(arrays):
        ah, aw = array.shape[:2]
        batch[k, :ah, :aw] = array
        batch[k, :ah, aw:] = batch[k, :ah, aw - 1:aw]
        batch[k, ah:] = batch[k, ah - 1:ah]
    sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64)
    return torch.from_numpy(batch).permute(0, 3, 1, 2), sizes


def collate_padded(samples: list) -> tuple:
    failures = [s for s in samples if isinstance(s, Failure)]
    good = [s for s in samples if not isinstance(s, Failure)]
    if not good:
        return None, failures
    images, sizes = pad_batch([array for array, _ in good])
    return (images, sizes, torch.tensor([index for _, index in good])), failures


class EvalImages(Dataset):
    """Yields (image, index): resized and center-cropped exactly as the exported model is fed."""

    def __init__(self, refs: Sequence[ImageRef], image_size: int) -> None:
        self.refs = refs
        self.recipe = resize_recipe(image_size)
        self.side = working_size(image_size)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int):
        ref = self.refs[index]
        try:
            image = apply_resize(load_rgb(ref.path, min_side=self.side), self.recipe)
        except ImageDecodeError as err:
            return Failure(index, ref.relpath, err.reason)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), index


def collate_skipping_failures(samples: list) -> tuple:
    """Stack the good samples; pass failures along so the main process can report them."""
    failures = [s for s in samples if isinstance(s, Failure)]
    good = [s for s in samples if not isinstance(s, Failure)]
    if not good:
        return None, failures
    columns = list(zip(*good))
    stacked = tuple(torch.stack(c) if isinstance(c[0], torch.Tensor) else torch.tensor(c) for c in columns)
    return stacked, failures


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) & 0x7FFF_FFFF_FFFF


class EpochBatches(Sampler):
    """A fresh permutation of the usable images each epoch, cut into full global batches; with
    several processes (torchrun), each rank takes its contiguous slice of every global batch.

    The permutation is a function of (seed, epoch) alone, so resuming at batch b of an epoch
    replays exactly the batches an uninterrupted run would have seen, on any number of
    processes. The last partial batch is dropped: a batch smaller than the rest would skew
    batch-norm statistics. This is DistributedSampler's job with set_epoch, made resumable.
    """

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"the batch size {batch_size} must be divisible by the {world_size} processes")
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def exclude(self, bad: set[int]) -> None:
        """Stop sampling failed files from the next epoch on."""
        self.indices = [i for i in self.indices if i not in bad]

    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, epoch = self.indices, self.epoch  # exclude() during the epoch applies from the next
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(indices), generator=generator).tolist()
        local = self.batch_size // self.world_size
        for b in range(self.start_batch, len(indices) // self.batch_size):
            first = b * self.batch_size + self.rank * local
            yield [(indices[order[p]], sample_seed(self.seed, epoch, p)) for p in range(first, first + local)]


def make_loader(dataset: Dataset, *, workers: int, pin_memory: bool, batch_sampler: Sampler | None = None,
                batch_size: int | None = None, collate: Callable = collate_skipping_failures) -> DataLoader:
    # A private generator: the loader then never draws from the global RNG, whose state the
    # checkpoint restores for the model's own shuffles.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        batch_size=1 if batch_sampler is not None else batch_size,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0 and batch_sampler is not None,
        prefetch_factor=4 if workers > 0 else None,
    )


class ViewsOnDevice:
    """A training batch -> its two views on the device, normalized and in the memory format the
    model runs in. With `--augment-on device` the batch holds working-resolution pixels, augmented
    here in a few batched ops; with `--augment-on workers` it holds the views the workers made."""

    def __init__(self, augment: BatchTwoViews | BatchMultiCrop | None, device: torch.device, *, mean: Sequence[float],
                 std: Sequence[float], channels_last: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.augment, self.device, self.seed = augment, device, seed
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size

    def __call__(self, batch: tuple, epoch: int, batch_in_epoch: int, *,
                 size: int | None = None) -> tuple[torch.Tensor, ...]:
        """(view1, view2), and the small crops third with multi-crop. `size`: this batch's
        training size (progressive resolution; only batched augmentation can change it)."""
        if self.augment is not None:
            images, sizes, _ = batch
            # One generator per batch, seeded by its place in the run: exact on resume.
            position = batch_in_epoch * self.world_size + self.rank
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, position))
            images = images.to(self.device, non_blocking=True)
            views = self.augment(images, sizes, generator, size=size)
        else:
            view1, view2, _ = batch
            views = view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True)
        return tuple(normalize_on_device(view, self.mean, self.std, self.channels_last) for view in views)


def training_batches(config: TrainConfig, folder: ImageFolder, cache: DecodedCache | None, sampler: EpochBatches,
                     device: torch.device) -> tuple[DataLoader, ViewsOnDevice]:
    """The training loader over `sampler`'s batches (each one `(batch or None, failures)`), and
    the views step that turns a batch into the two augmented, normalized views on `device`."""
    if config.augment_on == "device":
        # Pixels to the device, augmented there in a few batched ops. Reading the cache is a
        # memory copy, so worker processes would only take cores from the model.
        augment: BatchTwoViews | BatchMultiCrop
        if config.multi_crop:
            augment = BatchMultiCrop(config.augment, config.image_size, config.crop_min_scale,
                                     count=config.multi_crop, small_size=config.small_crop_size,
                                     small_scale=tuple(config.small_crop_scale),
                                     blur_relative=config.blur_relative)
        else:
            augment = BatchTwoViews(config.augment, config.image_size, config.crop_min_scale,
                                    blur_relative=config.blur_relative)
        dataset: Dataset = RawImages(folder.refs, config.image_size, cache)
        workers, collate = (0 if cache is not None else config.workers), collate_padded
    else:
        augment = None
        transform = TwoViews(config.augment, config.image_size, config.crop_min_scale,
                             blur_relative=config.blur_relative)
        dataset = TrainImages(folder.refs, transform, config.image_size, cache)
        workers, collate = config.workers, collate_skipping_failures
    loader = make_loader(dataset, workers=workers, batch_sampler=sampler, collate=collate,
                         pin_memory=device.type == "cuda")
    views = ViewsOnDevice(augment, device, mean=config.mean, std=config.std, channels_last=config.channels_last,
                          seed=config.seed, rank=sampler.rank, world_size=sampler.world_size)
    return loader, views
