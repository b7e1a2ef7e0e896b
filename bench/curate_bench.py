"""Curation benchmarks: planted label mistakes found, and the scoring time of a large collection.

    python bench/curate_bench.py issues /tmp/data/flowers/train --work /tmp/curate-bench \\
        --model trained=models/flowers.onnx --model random=models/flowers-random.onnx
    python bench/curate_bench.py time indexes/cifar100k

``issues``: a copy of the labelled folder (hard links) with ``--moved`` (default 5%) of its
files moved to another class folder on purpose (seeded), indexed with each ``--model``
(``indexer build``); then ``python -m indexer curate --json`` and, from the same out-of-sample
neighbour probabilities, plain kNN disagreement (an item flagged when its neighbours' likeliest
label is not its own). Prints precision and recall of the flagged items against the moved ones
for each model and method.

``time``: ``python -m indexer curate`` on an existing collection: its wall time, whole process,
with the machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402


def planted_copy(source: Path, target: Path, fraction: float, seed: int) -> dict[str, str]:
    """Copy ``source``'s class folders to ``target`` (hard links) with ``fraction`` of the files
    filed under another class; returns new relative path -> the true class."""
    shutil.rmtree(target, ignore_errors=True)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    files = sorted(p for c in classes for p in (source / c).iterdir() if p.is_file())
    rng = random.Random(seed)
    moved = set(rng.sample(range(len(files)), round(fraction * len(files))))
    truth: dict[str, str] = {}
    for i, path in enumerate(files):
        label = path.parent.name
        if i in moved:
            label = rng.choice([c for c in classes if c != path.parent.name])
        out = target / label / f"{path.parent.name}-{path.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, out)
        except OSError:
            shutil.copy(path, out)
        if i in moved:
            truth[f"{label}/{out.name}"] = path.parent.name
    return truth


def precision_recall(flagged: set[str], moved: set[str]) -> tuple[float, float]:
    hits = len(flagged & moved)
    return (hits / len(flagged) if flagged else float("nan")), (hits / len(moved) if moved else float("nan"))


def knn_disagreement(collection_dir: Path) -> set[str]:
    """Paths whose neighbours' likeliest label (the same votes cleanlab gets) is not their own."""
    from indexer import curation
    from indexer.collection import Collection
    from indexer.curate import label_array

    with Collection.open(collection_dir, device="cpu") as col:
        neighbours = curation.nearest_neighbours(col.searcher.search, col.vectors, col.ids)
        labels, names, _ = label_array(col, "folder")
        probs = curation.knn_class_probabilities(neighbours, labels, len(names))
        paths = [it.path for it in col.items]
    return {paths[i] for i in np.flatnonzero((labels >= 0) & (probs.argmax(axis=1) != labels))}


def issues(args: argparse.Namespace) -> int:
    images = args.work / "images"
    truth = planted_copy(args.folder, images, args.moved, args.seed)
    print(f"{len(truth)} of {sum(1 for _ in images.rglob('*.*'))} files moved to a wrong class folder "
          f"(seed {args.seed}); {cpu_name()}")
    print(f"{'model':<14}{'method':<24}{'flagged':>8}{'precision':>11}{'recall':>8}")
    for spec in args.model:
        name, model = spec.split("=", 1)
        collection = args.work / f"col-{name}"
        shutil.rmtree(collection, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "indexer", "build", str(images), "--model", model, "--out",
                        str(collection), "--device", "cpu", "--no-progress"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        out = subprocess.run([sys.executable, "-m", "indexer", "curate", str(collection), "--json",
                              "--no-progress", "--device", "cpu"], check=True, cwd=ROOT, capture_output=True,
                             text=True).stdout
        found = {issue["path"] for issue in json.loads(out)["label_issues"]}
        for method, flagged in (("cleanlab (curate)", found), ("kNN disagreement", knn_disagreement(collection))):
            precision, recall = precision_recall(flagged, set(truth))
            print(f"{name:<14}{method:<24}{len(flagged):>8}{precision:>11.3f}{recall:>8.3f}", flush=True)
    return 0


def timing(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "indexer", "curate", str(args.collection), "--no-progress",
                    "--device", "cpu"], check=True, cwd=ROOT)
    print(f"curate {args.collection}: {time.perf_counter() - t0:.1f} s wall, whole process; {cpu_name()}, "
          f"{os.cpu_count()} cores")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("issues", help="planted label mistakes: precision and recall")
    p.add_argument("folder", type=Path, help="a labelled folder (class sub-folders)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--model", action="append", required=True, metavar="NAME=MODEL.onnx")
    p.add_argument("--moved", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("time", help="scoring time of a collection")
    p.add_argument("collection", type=Path)
    args = parser.parse_args(argv)
    return issues(args) if args.what == "issues" else timing(args)


if __name__ == "__main__":
    sys.exit(main())
