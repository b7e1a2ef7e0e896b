"""The MoCo model step alone, on ready tensors, in NCHW and channels-last, with plain and split BN.

Says what the model step costs before any data pipeline: the ceiling for `bench/train_speed.py`.

    python bench/train_step_variants.py --image-size 64 --batch-size 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco.config import build_config  # noqa: E402
from moco.defaults import fit_recipe  # noqa: E402
from moco.model import MoCo  # noqa: E402
from moco.optim import build_optimizer  # noqa: E402


def images_per_second(size: int, batch: int, channels_last: bool, splits: int, steps: int,
                      short_run_recipe: bool = True, precision: str = "fp32") -> float:
    """`short_run_recipe`: the model as `moco train` builds it by default (issue 7's BN head and
    batch negatives); False gives the preset's plain v2 model. `precision`: fp32 or bf16 (autocast
    of the encoders, as `moco train --precision`). The stem is the one `moco train` picks for the
    size (moco.config.resolve_stem: the small stem below 64 px), so the ceiling is of the same model."""
    torch.manual_seed(0)
    config = build_config(dict(image_size=size, queue_size=512, bn_splits=splits, batch_size=batch,
                               precision=precision))
    if short_run_recipe:
        fit_recipe(config, explicit=set())
    model = MoCo(config)
    x1, x2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / (sum(times[1:]) / steps)  # the first step warms up allocators


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    for channels_last in (False, True):
        for splits in (1, 8):
            rate = images_per_second(args.image_size, args.batch_size, channels_last, splits, args.steps)
            print(f"channels_last={channels_last} bn_splits={splits}: {rate:.1f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
