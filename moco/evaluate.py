"""Frozen-feature evaluation: the kNN monitor during training and `moco eval` afterwards.

Images are resized exactly as the exported ONNX model's metadata says (`indexer.images`), and
the classifiers are the numpy-level ones in `indexer.analysis`, so `moco eval` and
`indexer eval` agree on the same data.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from indexer import analysis
from moco.augment import normalize_on_device
from moco.data import EvalImages, Failure, ImageFolder, make_loader
from moco.precision import autocast


@dataclass
class Features:
    vectors: np.ndarray  # float32 [M, D], L2-normalised
    indices: np.ndarray  # which refs of the folder they belong to (failed files are left out)
    failures: list[Failure]


@torch.no_grad()
def extract_features(backbone: nn.Module, folder: ImageFolder, indices: np.ndarray, *, image_size: int,
                     mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                     batch_size: int = 128, workers: int = 1, channels_last: bool = True,
                     precision: str = "auto", desc: str = "features") -> Features:
    """L2-normalised float32 features; the backbone runs in `precision` ("fp32", "bf16", or
    "auto": bf16 on a GPU with native bf16, fp32 on a CPU unless resolved beforehand, as `moco
    eval` does by timing the backbone), the normalisation in float32."""
    refs = [folder.refs[i] for i in indices]
    loader = make_loader(EvalImages(refs, image_size), workers=workers, batch_size=batch_size,
                         pin_memory=device.type == "cuda")
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.eval()
    vectors, kept, failures = [], [], []
    for batch, failed in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        failures.extend(Failure(int(indices[f.index]), f.relpath, f.reason) for f in failed)
        if batch is None:
            continue
        images, positions = batch
        x = normalize_on_device(images.to(device, non_blocking=True), mean_t, std_t, channels_last)
        with autocast(device, precision):
            out = backbone(x)
        vectors.append(F.normalize(out.float(), dim=1).cpu().numpy())
        kept.append(indices[positions.numpy()])
    backbone.train(was_training)
    dim = vectors[0].shape[1] if vectors else 0
    return Features(
        vectors=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        indices=np.concatenate(kept) if kept else np.zeros(0, np.int64),
        failures=failures,
    )


@torch.no_grad()
def recalibrate_batchnorm(backbone: nn.Module, folder: ImageFolder, *, image_size: int, mean, std,
                          device: torch.device, workers: int, max_images: int = 2048, seed: int = 0) -> None:
    """Replace batch-norm running statistics by exact averages over (up to) `max_images` images.

    A freshly initialised network has running statistics of 0 and 1, which in eval mode make
    its features vanish through the layers: a baseline that weak would flatter any trained
    model. With statistics measured on the data, the random-network baseline is the honest one.
    """
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches seen
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(folder.refs))[:max_images])
    loader = make_loader(EvalImages([folder.refs[i] for i in chosen], image_size), workers=workers,
                         batch_size=128, pin_memory=device.type == "cuda")
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    backbone.train()
    for batch, _ in tqdm(loader, desc="BN statistics", unit="batch", leave=False, dynamic_ncols=True):
        if batch is not None and batch[0].shape[0] > 1:
            backbone(normalize_on_device(batch[0].to(device), mean_t, std_t, channels_last=False))
    backbone.eval()
    for bn in norms:
        bn.momentum = 0.1


def calibrated_copy(module: nn.Module, folder: ImageFolder, *, image_size: int, mean, std, device: torch.device,
                    workers: int, max_images: int = 512, seed: int = 0) -> nn.Module:
    """A copy of `module` whose batch-norm statistics are measured on `folder` (the module is
    untouched): how the network before training is measured and shipped. Split batch norm is
    set to one split in the copy, so the statistics are exact averages (its state dict is
    a plain BatchNorm's either way)."""
    copy = deepcopy(module)
    for layer in copy.modules():
        if hasattr(layer, "num_splits"):
            layer.num_splits = 1
    recalibrate_batchnorm(copy, folder, image_size=image_size, mean=mean, std=std, device=device, workers=workers,
                          max_images=max_images, seed=seed)
    return copy


class KnnMonitor:
    """Weighted kNN top-1 of val features against labeled train features, during training.

    Each evaluation extracts features of every bank and query image again, so its cost grows
    with the folders: with `max_images` > 0 it uses a fixed random subset (seeded) of at most
    that many labeled images from each folder, which keeps it cheap enough to run several
    times in a short run. `moco eval` always uses everything.
    """

    def __init__(self, train: ImageFolder, val: ImageFolder, *, image_size: int, mean, std,
                 device: torch.device, workers: int, k: int, temperature: float, max_images: int = 0,
                 seed: int = 0, channels_last: bool = True, precision: str = "auto") -> None:
        self.train, self.val = train, val
        self.options = dict(image_size=image_size, mean=mean, std=std, device=device, workers=workers,
                            channels_last=channels_last, precision=precision)
        self.k, self.temperature, self.seed = k, temperature, seed
        if train.root.resolve() == val.root.resolve():
            # --val is the training folder itself (the demo does this): queries and bank must not
            # share an image, or each query finds itself, and every network scores alike.
            half = len(val.labeled) // 2
            self.queries = subset(val.labeled, min(max_images or half, half), seed + 1)
            self.bank = subset(np.setdiff1d(train.labeled, self.queries), max_images, seed)
        else:
            self.bank = subset(train.labeled, max_images, seed)
            self.queries = subset(val.labeled, max_images, seed + 1)

    def shrink(self, images: int) -> bool:
        """Use at most `images` bank and query images in all (a seeded subset of each, half
        each): an evaluation's cost is proportional to them. True if it shrank."""
        each = max(1, images // 2)
        if len(self.bank) <= each and len(self.queries) <= each:
            return False
        self.bank = subset(self.bank, each, self.seed)
        self.queries = subset(self.queries, each, self.seed + 1)
        return True

    def describe(self) -> str:
        return (f"{len(self.bank)} of {len(self.train.labeled)} labeled training images as the bank, "
                f"{len(self.queries)} of {len(self.val.labeled)} val images as queries")

    def line(self) -> str:
        """The monitor in one line, stored with the run's quality: what its scores mean."""
        return (f"weighted kNN top-1, k={self.k}, {len(self.bank)} bank (training) / {len(self.queries)} query "
                f"images, val folder '{self.val.root.name}'")

    @property
    def capped(self) -> bool:
        return len(self.bank) < len(self.train.labeled) or len(self.queries) < len(self.val.labeled)

    def __call__(self, backbone: nn.Module) -> float:
        train = extract_features(backbone, self.train, self.bank, desc="kNN train", **self.options)
        val = extract_features(backbone, self.val, self.queries, desc="kNN val", **self.options)
        return analysis.knn_top1(train.vectors, self.train.labels[train.indices], val.vectors,
                                 self.val.labels[val.indices], k=self.k, temperature=self.temperature)


def subset(indices: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """At most `max_images` of `indices` (all when 0), a seeded random choice, in folder order."""
    if max_images <= 0 or len(indices) <= max_images:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=max_images, replace=False))


METRICS = (("knn_top1", "weighted kNN top-1"), ("linear_top1", "linear probe top-1"),
           ("few_label_1pct", "1% labels top-1"), ("few_label_10pct", "10% labels top-1"))


def evaluate_backbone(backbone: nn.Module, train: ImageFolder, val: ImageFolder, *, image_size: int,
                      mean, std, device: torch.device, workers: int, seeds: tuple[int, ...],
                      knn_k: int = 200, knn_t: float = 0.1,
                      precision: str = "auto") -> tuple[dict[str, float], list[Failure]]:
    options = dict(image_size=image_size, mean=mean, std=std, device=device, workers=workers, precision=precision)
    train_f = extract_features(backbone, train, train.labeled, desc="train features", **options)
    val_f = extract_features(backbone, val, val.labeled, desc="val features", **options)
    if len(train_f.indices) == 0 or len(val_f.indices) == 0:
        raise ValueError("no labeled images could be read in the train or val folder")
    results = analysis.evaluate_features(train_f.vectors, train.labels[train_f.indices], val_f.vectors,
                                         val.labels[val_f.indices], seeds=seeds, knn_k=knn_k, knn_t=knn_t)
    return results, train_f.failures + val_f.failures


def format_table(results: dict[str, float], title: str) -> str:
    lines = [title, f"{'metric':<22}{'mean':>8}{'std':>8}"]
    for key, name in METRICS:
        lines.append(f"{name:<22}{results[key]:>8.4f}{results[key + '_std']:>8.4f}")
    return "\n".join(lines)
