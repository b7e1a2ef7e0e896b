"""The run's accuracy-versus-time curve: `monitor.png` next to `metrics.jsonl`.

Drawn from metrics.jsonl after every kNN evaluation (so a resumed run's curve continues the
first session's): kNN top-1 against minutes since the start, the training loss on a second
axis, the time budget as a vertical line. Matplotlib's Agg canvas is used directly (no pyplot,
no global backend), and the file is replaced atomically like every other file of the run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from indexer.files import atomic_write_bytes

PLOT_NAME = "monitor.png"


def read_records(metrics_path: Path) -> list[dict]:
    records = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_monitor_plot(metrics_path: Path, png_path: Path, *, title: str = "",
                       budget_s: float | None = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_records(metrics_path)
    evals = [(r["time"] / 60, r["knn_top1"]) for r in records if "knn_top1" in r and "time" in r]
    losses = [(r["time"] / 60, r["loss"]) for r in records if r.get("kind") == "step" and "time" in r]

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if evals:
        x, y = zip(*evals)
        ax.plot(x, y, "o-", color="tab:blue", label="kNN top-1")
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("kNN top-1", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if losses:
        twin = ax.twinx()
        x, y = zip(*losses)
        twin.plot(x, y, color="tab:orange", alpha=0.6, linewidth=1, label="loss")
        twin.set_ylabel("training loss", color="tab:orange")
    if budget_s:
        ax.axvline(budget_s / 60, color="grey", linestyle="--", linewidth=1)
        ax.annotate("budget", (budget_s / 60, 0.02), rotation=90, color="grey", ha="right", va="bottom")
    if evals:
        last_x, last_y = evals[-1]
        ax.annotate(f"{last_y:.3f}", (last_x, last_y), textcoords="offset points", xytext=(4, 6),
                    color="tab:blue")
    ax.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(png_path, buffer.getvalue())
