"""What `moco train --precision auto` would choose on this machine, per image size, and how steady
the choice is: the start-up timing of the run's step (moco.step_timing) repeated a few times.

Each row is one image size with the model `moco train` builds by default for it (stem by size,
issue 7's BN head, batch negatives); the figures are the timing's images/s in fp32 and bf16, the
bf16/fp32 ratio over the repeats (min, median, max), the seconds one timing costs, and the
choice (bf16 at or above moco.precision.BF16_MIN_SPEEDUP). On a CPU without native bf16 or on a
GPU the choice is not timed, and the script says so.

    python bench/precision_choice.py --sizes 32,48,64,96,128 --batch-size 256 --repeats 3
    python bench/precision_choice.py --sizes 32 --stem imagenet     # issue 7's CIFAR-10 rows
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_name  # noqa: E402
from moco.config import STEMS, build_config  # noqa: E402
from moco.defaults import fit_recipe  # noqa: E402
from moco.precision import BF16_MIN_SPEEDUP, cpu_has_fast_bf16  # noqa: E402
from moco.step_timing import precision_rates  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,48,64,96,128", help="comma-separated image sizes")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="auto", choices=STEMS,
                        help="as moco train's --stem (auto: the small stem below 64 px)")
    parser.add_argument("--batch-size", type=int, default=256, help="the run's batch (the timing caps it)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    print(f"{cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}; {args.arch}, "
          f"stem {args.stem}, batch {args.batch_size}")
    if not cpu_has_fast_bf16():
        print("this CPU has neither AMX nor AVX-512-BF16: auto is fp32 without timing")
        return 0
    print("| size | fp32 img/s | bf16 img/s | bf16/fp32 min / median / max | seconds per timing | auto picks |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        config = build_config(dict(arch=args.arch, image_size=size, batch_size=args.batch_size, stem=args.stem))
        fit_recipe(config, explicit=set())
        ratios, fp32, bf16, seconds = [], [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            rates = precision_rates(config, torch.device("cpu"))
            seconds.append(time.perf_counter() - start)
            fp32.append(rates["fp32"])
            bf16.append(rates["bf16"])
            ratios.append(rates["bf16"] / rates["fp32"])
        picks = sorted({"bf16" if r >= BF16_MIN_SPEEDUP else "fp32" for r in ratios})
        print(f"| {size} | {statistics.median(fp32):.0f} | {statistics.median(bf16):.0f} | "
              f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f} | "
              f"{statistics.median(seconds):.1f} | {' or '.join(picks)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
