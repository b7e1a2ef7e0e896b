"""One MoCo training step on ready tensors, in fp32 and under bf16 autocast, in one run.

Model only (no data pipeline): query forward and backward, key forward, optimizer step, with
the model `moco train` builds by default, channels-last. The two precisions are timed in
alternating rounds and each reported as its median round, so a neighbour's load on a shared
machine hits both alike. Says whether `--precision auto` is right to pick bf16 on this CPU.

    python bench/precision_speed.py                     # ResNet-18, 64 px, batch 128
    python bench/precision_speed.py --rounds 5 --steps 4
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
from moco.config import build_config  # noqa: E402
from moco.defaults import fit_recipe  # noqa: E402
from moco.model import MoCo  # noqa: E402
from moco.optim import build_optimizer  # noqa: E402
from moco.precision import choose_precision  # noqa: E402


def build(precision: str, arch: str, size: int, batch: int, device: torch.device):
    """The default `moco train` model (issue 7's short-run recipe) in `precision`, channels-last."""
    torch.manual_seed(0)
    config = build_config(dict(arch=arch, image_size=size, stem="imagenet", queue_size=4096, batch_size=batch,
                               precision=precision))
    fit_recipe(config, explicit=set())
    model = MoCo(config).to(device).to(memory_format=torch.channels_last)
    return model, build_optimizer(model, config)


def timed_steps(model, optimizer, x1: torch.Tensor, x2: torch.Tensor, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if x1.device.type == "cuda":
        torch.cuda.synchronize()
    else:
        loss.item()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per precision")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = " ".join(name for name in ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                     if caps.get(name))
    print(f"{cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}; flags: {flags}")
    print(f"--precision auto here: {choose_precision('auto', device)[1]}")
    print(f"{args.arch} @ {args.image_size}px, batch {args.batch_size}, channels-last, model only "
          f"({args.rounds} rounds x {args.steps} steps each, alternating)", flush=True)

    size, batch = args.image_size, args.batch_size
    x1 = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    runs = {name: build(name, args.arch, size, batch, device) for name in ("fp32", "bf16")}
    for model, optimizer in runs.values():
        timed_steps(model, optimizer, x1, x2, 1)  # warm-up: allocator, oneDNN primitive caches
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            seconds[name].append(timed_steps(model, optimizer, x1, x2, args.steps))
    rates = {name: batch / statistics.median(values) for name, values in seconds.items()}
    for name, rate in rates.items():
        spread = f"{batch / max(seconds[name]):.0f}-{batch / min(seconds[name]):.0f}"
        print(f"{name}: {rate:.0f} img/s (rounds {spread})")
    print(f"bf16 / fp32: {rates['bf16'] / rates['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
