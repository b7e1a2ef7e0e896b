"""How fast this run's MoCo step is in fp32 and in bf16, timed on this machine before training.

On a CPU with AMX or AVX-512-BF16 whether bf16 autocast pays depends on the shapes, not only on
the chip: at 64 px a ResNet-18 step ran 1.76x faster in bf16 on a 2-core AMX Xeon, at 32 px
(feature maps of 8 x 8 down to 1 x 1) 0.85x, because oneDNN's bf16 kernels gain nothing on tiny
maps and the casts still cost (BENCHMARKS.md, "bf16 training on an AMX CPU"). No rule by image
size would hold for every architecture, stem and core count, so `--precision auto` times both
(`moco.precision.choose_precision`).

`moco eval` asks the same question of feature extraction (`forward_rates`): the backbone's
forward without gradients, at the evaluation's image size.

What is timed is the model step alone (query forward and backward, key forward, momentum update,
optimizer step) on random tensors of the run's shapes: the data pipeline costs the same in either
precision, so the model step is where they differ. The timing runs on a copy of the model with
its own random numbers, so the run itself starts exactly as it would have without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from moco.config import TrainConfig
from moco.model import MoCo
from moco.optim import build_optimizer
from moco.precision import autocast

MAX_TIMING_BATCH = 64
"""The timing steps' batch: the run's per-process batch, capped so the timing costs seconds even
for large models (a bf16/fp32 ratio hardly depends on the batch once it fills the cores)."""
TIMED_STEPS = 2
"""Timed steps per precision after one warm-up step each; the fastest counts (a step slowed by
another process on the machine says nothing about the arithmetic)."""


def precision_rates(config: TrainConfig, device: torch.device, *, world_size: int = 1,
                    steps: int = TIMED_STEPS) -> dict[str, float]:
    """{"fp32": images/s, "bf16": images/s} of `config`'s MoCo step on `device`, the two
    precisions interleaved step by step so that a change in the machine's load hits both."""
    batch = max(2, min(MAX_TIMING_BATCH, config.batch_size // max(1, world_size)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = MoCo(config).to(device)
        memory = torch.channels_last if config.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory)
        optimizer = build_optimizer(model, config)

        def images(size: int, count: int) -> torch.Tensor:
            return torch.randn(count, 3, size, size, device=device).contiguous(memory_format=memory)

        views = [images(config.image_size, batch), images(config.image_size, batch)]
        if config.multi_crop:
            views.append(images(config.small_crop_size or config.image_size // 2, config.multi_crop * batch))

        def step(precision: str) -> None:
            model.precision = precision
            loss = model(views[0], views[1], 0.99, *views[2:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = _fastest_of_each(step, device, steps)
    return {precision: batch / taken for precision, taken in seconds.items()}


def forward_rates(backbone: nn.Module, image_size: int, device: torch.device, *, channels_last: bool = True,
                  batch: int = MAX_TIMING_BATCH, steps: int = TIMED_STEPS) -> dict[str, float]:
    """{"fp32": images/s, "bf16": images/s} of `backbone`'s forward as feature extraction runs it
    (eval mode, no gradients, the evaluation's size and memory format), interleaved and the
    fastest of `steps` after a warm-up, as for the training step. The backbone is not changed
    (eval mode keeps batch-norm statistics) and the caller's random numbers are untouched."""
    was_training = backbone.training
    backbone.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(0)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=memory)

        def forward(precision: str) -> None:
            with autocast(device, precision):
                backbone(images)

        seconds = _fastest_of_each(forward, device, steps)
    backbone.train(was_training)
    return {precision: batch / taken for precision, taken in seconds.items()}


def _fastest_of_each(run: Callable[[str], None], device: torch.device, steps: int) -> dict[str, float]:
    """Seconds of the fastest of `steps` calls of `run(precision)` for fp32 and bf16, after one
    warm-up round (allocators, kernel caches), the two interleaved call by call so that a change
    in the machine's load hits both."""
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for round_ in range(steps + 1):
        for precision in best:
            start = time.perf_counter()
            run(precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ > 0:
                best[precision] = min(best[precision], time.perf_counter() - start)
    return best
