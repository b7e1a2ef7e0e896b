"""Overlay the kNN-monitor curves of several runs: accuracy against minutes since start.

Each run's own `monitor.png` shows one curve; comparing recipes needs them on one axis. The
points are the run's `eval` records in metrics.jsonl (the monitor's fixed subset), so this
plots exactly what the runs measured, and a horizontal line can mark a baseline such as the
random-network kNN from `moco eval --random-init`.

    python bench/budget_curves.py --out cifar10_30m.png --title "CIFAR-10, 32 px, 30 min" \
        --baseline "random init=0.218" runs/paper:"(b) --paper-defaults" runs/ours:"(c) our defaults"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moco.plot import read_records  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR:LABEL", help="run folder and its legend label")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=VALUE",
                        help="a horizontal reference line, e.g. 'random init=0.218'")
    args = parser.parse_args()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for spec in args.runs:
        folder, _, label = spec.partition(":")
        records = read_records(Path(folder) / "metrics.jsonl")
        points = [(r["time"] / 60, r["knn_top1"]) for r in records if "knn_top1" in r and "time" in r]
        if not points:
            parser.exit(2, f"budget_curves.py: error: no kNN evaluations in {folder}/metrics.jsonl\n")
        x, y = zip(*points)
        ax.plot(x, y, "o-", label=label or folder)
        print(f"{label or folder}: " + ", ".join(f"{m:.1f} min {v:.3f}" for m, v in points))
    for spec in args.baseline:
        label, _, value = spec.partition("=")
        ax.axhline(float(value), color="grey", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("kNN top-1 (monitor subset)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")  # below: never over a curve
    ax.set_title(args.title, fontsize=10)
    figure.savefig(args.out, format="png", bbox_inches="tight")  # a long legend label is never cut off
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
