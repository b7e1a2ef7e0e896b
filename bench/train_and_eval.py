"""Train with `python -m moco train`, then evaluate the checkpoint and a random-init baseline.

Prints the training throughput (steady state: epochs after the first), the whole-process wall
time, and `moco eval` figures for both, as a table and one JSON line. Every figure comes from
the project's own commands, so it is what a user gets.

    python bench/train_and_eval.py /tmp/data/flowers/train /tmp/data/flowers/test \
        --out /tmp/runs/flowers -- --image-size 64 --batch-size 128 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir")
    parser.add_argument("val_dir")
    parser.add_argument("--out", required=True, help="run folder (replaced)")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--eval-precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="arithmetic of `moco eval`'s features (default fp32: the same on every machine, so "
                        "rows measured on different CPUs compare; bf16 scored within half a point of it)")
    parser.add_argument("--no-random-init", dest="random_init", action="store_false",
                        help="skip the random-init baseline's evaluation (it depends only on the architecture, "
                        "stem and data: once per setting is enough, and on a CPU it takes as long as the trained one)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]  # after --: arguments for moco train
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    start = time.monotonic()
    print(run([sys.executable, "-m", "moco", "train", args.train_dir, "--out", str(out), "--workers", args.workers,
               *extra]), flush=True)
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steady = [r["img_per_s"] for r in epochs[1:]] or [epochs[0]["img_per_s"]]
    # A budget run ends mid-epoch: its closing record, not the last epoch's, has the totals.
    end = next((r for r in reversed(records) if r["kind"] == "done"), epochs[-1])
    evals = {}
    for name, flag in (("trained", []), ("random_init", ["--random-init"]))[:2 if args.random_init else 1]:
        output = run([sys.executable, "-m", "moco", "eval", str(out), "--train", args.train_dir, "--val",
                      args.val_dir, "--json", "--workers", args.workers, "--precision", args.eval_precision, *flag])
        evals[name] = json.loads(output.strip().splitlines()[-1])
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "train_args": extra, "epochs": end.get("epochs", len(epochs)), "steps": end["step"],
        "wall_seconds": round(wall, 1), "train_seconds": round(end["time"], 1),
        "img_per_s_steady": round(sum(steady) / len(steady), 1),
        "final_loss": round(epochs[-1]["loss"], 4), **{k: v for k, v in evals.items()},
    }
    print(f"\nwall time {wall / 60:.1f} min (training loop {end['time'] / 60:.1f} min), {summary['epochs']} epochs, "
          f"{summary['steps']} steps, {summary['img_per_s_steady']} img/s after the first epoch")
    print(f"{'':<14}{'kNN':>8}{'linear':>8}{'1%':>8}{'10%':>8}{'10% std':>9}")
    for name, result in evals.items():
        print(f"{name:<14}{result['knn_top1']:>8.4f}{result['linear_top1']:>8.4f}{result['few_label_1pct']:>8.4f}"
              f"{result['few_label_10pct']:>8.4f}{result['few_label_10pct_std']:>9.4f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
