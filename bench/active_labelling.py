"""Active labelling benchmark: accuracy after 1, 2, 5 and 10 labels per class for each way of
choosing what to label (random picks, k-means centres, active), on labelled collections.

    python bench/active_labelling.py /tmp/col-good /tmp/col-weak --seeds 5
    python bench/active_labelling.py --build cifar=/data/cifar10/test --model cifar.onnx --work /tmp/al

Each collection's vectors and folder labels (first sub-folder; unlabelled items are left out)
are read through ``indexer.Collection``; ``--build NAME=FOLDER`` first indexes a labelled
folder with ``python -m indexer build --model`` into ``--work``/NAME. For every collection
:func:`indexer.selection.selection_curve` replays labelling rounds of C images (C classes) per
strategy and seed and scores the weighted kNN (the Few labels page's classifier) on the images
never labelled. Prints a markdown table (mean ± std over seeds, and active minus random) and
one JSON line with every figure, the seeds and the machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402

STRATEGY_NAMES = {"random": "random picks", "kmeans": "k-means centres", "active": "active"}


def labelled_vectors(collection_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(vectors, class index, class names) of the collection's items that have a folder label."""
    from indexer import Collection

    with Collection.open(collection_dir, device="cpu") as col:
        labels = [item.label for item in col.items]
        vectors = np.asarray(col.vectors, dtype=np.float32)
    names = sorted({label for label in labels if label})
    keep = np.array([bool(label) for label in labels], dtype=bool)
    lookup = {name: i for i, name in enumerate(names)}
    y = np.array([lookup[label] for label in labels if label], dtype=np.int64)
    return vectors[keep], y, names


def build(name: str, folder: Path, model: Path, work: Path) -> Path:
    """Index ``folder`` with ``model`` into ``work``/``name`` (``python -m indexer build``)."""
    out = work / name
    subprocess.run([sys.executable, "-m", "indexer", "build", str(folder), "--model", str(model), "--out", str(out),
                    "--device", "cpu"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def run(name: str, collection_dir: Path, rounds: list[int], seeds: list[int]) -> dict[str, object]:
    from indexer.selection import STRATEGIES, selection_curve

    x, y, names = labelled_vectors(collection_dir)
    rounds = [r for r in rounds if r * len(names) < len(y)]
    if len(names) < 2 or not rounds:
        raise ValueError(f"{collection_dir}: needs two labelled classes or more and images left after the rounds")
    t0 = time.perf_counter()
    curve = selection_curve(x, y, rounds=rounds, strategies=STRATEGIES, seeds=seeds)
    return {"collection": name, "path": str(collection_dir), "items": len(y), "classes": len(names),
            "seconds": round(time.perf_counter() - t0, 1),
            "results": [{"strategy": r.strategy, "labels_per_class": r.labels_per_class, "mean": round(r.mean, 4),
                         "std": round(r.std, 4)} for r in curve]}


def table(runs: list[dict[str, object]], rounds: list[int]) -> str:
    head = "| collection | strategy | " + " | ".join(str(r) for r in rounds) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in rounds) + " |"]
    for run_ in runs:
        by = {(r["strategy"], r["labels_per_class"]): r for r in run_["results"]}  # type: ignore[attr-defined]
        for strategy, label in STRATEGY_NAMES.items():
            cells = [f"{by[strategy, r]['mean']:.3f} ± {by[strategy, r]['std']:.3f}" if (strategy, r) in by else "–"
                     for r in rounds]
            lines.append(f"| {run_['collection']} | {label} | " + " | ".join(cells) + " |")
        gains = [f"{100 * (by['active', r]['mean'] - by['random', r]['mean']):+.1f}" if ("active", r) in by else "–"
                 for r in rounds]
        lines.append(f"| {run_['collection']} | active − random (points) | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("collections", nargs="*", type=Path, help="collection folders with folder labels")
    parser.add_argument("--build", action="append", default=[], metavar="NAME=FOLDER",
                        help="index this labelled folder first (needs --model and --work)")
    parser.add_argument("--model", type=Path, help="ONNX model for --build")
    parser.add_argument("--work", type=Path, help="where --build writes its collections")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 5, 10], help="labels per class to report")
    args = parser.parse_args(argv)
    if not args.collections and not args.build:
        parser.error("give a collection folder or --build NAME=FOLDER")
    if args.build and (args.model is None or args.work is None):
        parser.error("--build needs --model and --work")
    if args.seeds < 1 or min(args.rounds) < 1:
        parser.error("--seeds and --rounds must be 1 or more")
    targets: list[tuple[str, Path]] = []
    for spec in args.build:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not Path(folder).is_dir():
            parser.error(f"--build {spec!r}: give NAME=FOLDER with an existing folder")
        targets.append((name, Path(folder)))
    for path in args.collections:
        if not (path / "manifest.json").is_file():
            parser.error(f"{path} is not a collection folder (no manifest.json)")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    collections = [(path.name, path) for path in args.collections]
    collections += [(name, build(name, folder, args.model, args.work)) for name, folder in targets]
    rounds = sorted(set(args.rounds))
    seeds = list(range(args.seeds))
    runs = []
    for name, path in collections:
        try:
            runs.append(run(name, path, rounds, seeds))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{name}: {runs[-1]['items']} items, {runs[-1]['classes']} classes, {runs[-1]['seconds']} s",
              file=sys.stderr, flush=True)
    print(f"Accuracy of the weighted kNN on the images never labelled, mean ± std over {len(seeds)} seeds; "
          f"{cpu_name()}\n")
    print(table(runs, rounds))
    print(json.dumps({"benchmark": "active_labelling", "cpu": cpu_name(), "seeds": seeds, "rounds": rounds,
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
