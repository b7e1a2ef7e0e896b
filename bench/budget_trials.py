"""Time-budget trials: does a `--time-budget` run use its budget and never end worse than it began?

For each budget, `python -m moco train` runs on a fixed subset of a labeled folder (made by this
script under --work: --images training photos, --val-images from the val folder), alone and as
two processes at once (a busy machine: each competes for the same cores). Each row says how many
training steps were done, how much of the budget the run used (process start to final
checkpoint, as the run measures it, and the wall time this script saw), the kNN monitor at the
start (the random network) and at the end, which network the checkpoint ships and the verdict
(moco.quality), and the CPU.

    python bench/budget_trials.py --budgets 45s 3m 10m
    python bench/budget_trials.py --data /tmp/data/flowers/train --val /tmp/data/flowers/test --budgets 45s

Run it on an otherwise idle machine: other processes make every figure slower.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from indexer.images import IMAGE_EXTENSIONS  # noqa: E402

DEFAULT_DATA = Path("/tmp/data/cifar10/train")


@dataclass
class Trial:
    budget: str
    mode: str  # "alone" | "paired 1/2" | "paired 2/2"
    run_dir: Path
    wall_s: float = 0.0
    returncode: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/budget_trials.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labeled training folder (class "
                        "sub-folders) to draw the subset from (default %(default)s)")
    parser.add_argument("--val", type=Path, default=None, help="labeled folder for the kNN monitor's subset "
                        "(default: the 'test' folder beside --data)")
    parser.add_argument("--images", type=int, default=1000, help="training images in the subset (default 1000)")
    parser.add_argument("--val-images", type=int, default=1000, help="val images in the subset (default 1000)")
    parser.add_argument("--budgets", nargs="+", default=["45s", "3m", "10m"], help="time budgets to try "
                        "(default 45s 3m 10m)")
    parser.add_argument("--modes", nargs="+", choices=("alone", "paired"), default=["alone", "paired"],
                        help="run alone, as two concurrent processes, or both (default both)")
    parser.add_argument("--image-size", type=int, default=32, help="training resolution (default 32)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/budget_trials"), help="folder for the subsets "
                        "and runs (default %(default)s)")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for 'python -m moco train' (repeat; e.g. --train-arg=--arch "
                        "--train-arg=resnet34)")
    args = parser.parse_args(argv)
    args.val = args.val or args.data.parent / "test"
    for name in ("data", "val"):
        if not getattr(args, name).is_dir():
            parser.error(f"--{name} {getattr(args, name)} is not a folder")
    if args.images < 2 or args.val_images < 1:
        parser.error("--images must be at least 2 and --val-images at least 1")
    from moco.pacer import parse_duration

    for budget in args.budgets:
        try:
            parse_duration(budget)
        except ValueError as err:
            parser.error(str(err))
    return args


def make_subset(source: Path, target: Path, count: int, seed: int) -> Path:
    """A fixed random subset of `count` images of `source`, class folders kept, copied under
    `target` (made once; reused while it holds exactly `count` images)."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if target.is_dir() and sum(1 for p in target.rglob("*") if p.is_file()) == min(count, len(files)):
        return target
    shutil.rmtree(target, ignore_errors=True)
    random.Random(seed).shuffle(files)
    for path in files[:count]:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    return target


def start(trial: Trial, train: Path, val: Path, args: argparse.Namespace, seed: int) -> subprocess.Popen:
    shutil.rmtree(trial.run_dir, ignore_errors=True)
    trial.run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moco", "train", str(train), "--out", str(trial.run_dir), "--val", str(val),
           "--time-budget", trial.budget, "--image-size", str(args.image_size), "--seed", str(seed),
           "--cache-dir", str(args.work / "cache"), *args.train_arg]
    log = open(trial.run_dir.parent / f"{trial.run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_group(trials: list[Trial], train: Path, val: Path, args: argparse.Namespace) -> None:
    """Start the trials of one row group at once and wait for all of them."""
    began = time.monotonic()
    processes = [start(trial, train, val, args, seed=index) for index, trial in enumerate(trials)]
    for trial, process in zip(trials, processes):
        trial.returncode = process.wait()
        trial.wall_s = time.monotonic() - began


def row(trial: Trial, cpu: str) -> list[str]:
    from moco.checkpoint import CheckpointError, load_checkpoint, quality_of
    from moco.pacer import parse_duration

    budget_s = parse_duration(trial.budget)
    try:
        state = load_checkpoint(trial.run_dir)
    except CheckpointError as err:
        return [trial.budget, trial.mode, f"exit {trial.returncode}: {err}", "", "", "", "", "", "", cpu]
    plan, quality = state["plan"], quality_of(state)
    trained = state["progress"]["step"] - (plan.get("schedule_start") or 0)
    used = state["progress"]["elapsed"]

    def score(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    img_s = plan.get("measured", {}).get("img_per_s")
    return [trial.budget, trial.mode, f"{trained} ({state['progress']['step']})",
            f"{used:.0f} / {budget_s:.0f} s ({used / budget_s:.0%}); wall {trial.wall_s:.0f} s",
            f"{img_s:.0f}" if img_s else "-", score(quality["start"]), score(quality["end"]),
            f"{quality['shipped']} {score(quality['shipped_score'])}", quality["verdict"], cpu]


def print_table(rows: list[list[str]]) -> None:
    header = ["budget", "run", "steps trained (all)", "budget used (run's clock)", "timed img/s", "kNN start",
              "kNN end", "shipped", "verdict", "CPU"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    train = make_subset(args.data, args.work / "data" / "train", args.images, seed=0)
    val = make_subset(args.val, args.work / "data" / "val", args.val_images, seed=1)
    groups: list[list[Trial]] = []
    for budget in args.budgets:
        if "alone" in args.modes:
            groups.append([Trial(budget, "alone", args.work / "runs" / f"{budget}-alone")])
        if "paired" in args.modes:
            groups.append([Trial(budget, f"paired {i}/2", args.work / "runs" / f"{budget}-paired-{i}")
                           for i in (1, 2)])
    cpu = cpu_name()
    rows = []
    for group in tqdm(groups, desc="trials", unit="trial"):
        run_group(group, train, val, args)
        rows.extend(row(trial, cpu) for trial in group)
    print(f"{len(list(train.rglob('*.*')))} training / {len(list(val.rglob('*.*')))} val images from {args.data} "
          f"and {args.val}, {args.image_size} px; logs and runs under {args.work / 'runs'}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
