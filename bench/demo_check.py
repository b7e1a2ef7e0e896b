"""The built-in demo as a new user gets it: time to a collection the app can show, and whether its
model's neighbour lists beat the random network's.

    python bench/demo_check.py --work /tmp/demo-check            # an idle machine
    python bench/demo_check.py --work /tmp/demo-check --hog 2     # with 2 CPU-bound processes beside it

Runs ``python -m app.demo --workdir WORK`` (the very commands the app runs on a fresh clone:
digits, the time-budgeted training, the export, the index) from an empty folder and times it.
Then measures, on all 1,797 digits, leave-one-out weighted kNN accuracy (k 10, the neighbour
lists' k; T 0.1) of the collection's own vectors (the ONNX model the app uses) and of a randomly
initialised network of the same architecture (PyTorch, batch-norm statistics measured on the
digits, as ``moco eval --random-init`` does), and prints the trainer's own monitor record.
``--hog N`` starts N processes that spin on the CPU for the whole build (a busy machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402


def spin() -> None:
    while True:
        pass


def loo_knn(vectors: np.ndarray, labels: np.ndarray, k: int = 10, temperature: float = 0.1) -> float:
    """Leave-one-out weighted kNN top-1: each image's label from its k nearest other images."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, 1) / temperature)
    votes = np.zeros((len(vectors), int(labels.max()) + 1))
    for j in range(k):
        np.add.at(votes, (np.arange(len(vectors)), labels[nearest[:, j]]), weights[:, j])
    return float((votes.argmax(axis=1) == labels).mean())


def random_network_knn(data: Path, run: Path) -> float:
    import torch

    from moco.backbones import build_backbone
    from moco.checkpoint import load_checkpoint
    from moco.config import TrainConfig, resolve_stem
    from moco.data import open_folder
    from moco.evaluate import extract_features, recalibrate_batchnorm

    config = TrainConfig.from_dict(load_checkpoint(run)["config"])
    folder = open_folder(data)
    device = torch.device("cpu")
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.arch, stem=resolve_stem(config), image_size=config.image_size)
    recalibrate_batchnorm(backbone, folder, image_size=config.image_size, mean=config.mean, std=config.std,
                          device=device, workers=1, seed=config.seed)
    features = extract_features(backbone, folder, folder.labeled, image_size=config.image_size, mean=config.mean,
                                std=config.std, device=device, workers=1, precision="fp32")
    return loo_knn(features.vectors, folder.labels[features.indices])


def collection_knn(collection: Path) -> float:
    from indexer.collection import Collection

    with Collection.open(collection, device="cpu") as col:
        labels = [it.label for it in col.items]
        names = sorted(set(labels))
        return loo_knn(np.asarray(col.vectors, dtype=np.float32), np.array([names.index(n) for n in labels]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the demo (replaced)")
    parser.add_argument("--hog", type=int, default=0, help="CPU-bound processes running beside the build")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.hog)]
    for hog in hogs:
        hog.start()
    began = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "app.demo", "--workdir", str(args.work)], cwd=ROOT, check=True)
    finally:
        for hog in hogs:
            hog.terminate()
    seconds = time.monotonic() - began
    from app.demo import DemoPaths

    paths = DemoPaths(args.work)
    metrics = [json.loads(line) for line in (paths.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = next((r for r in reversed(metrics) if r.get("kind") == "done"), {})
    plan = next((r for r in metrics if r.get("kind") == "plan"), {})
    from moco.checkpoint import load_checkpoint, quality_of

    quality = quality_of(load_checkpoint(paths.run))
    trained, random = collection_knn(paths.collection), random_network_knn(paths.data, paths.run)
    print(f"\n{cpu_name()}; hog processes: {args.hog}")
    print(f"demo build (digits, training, export, index): {seconds:.0f} s; training steps "
          f"{done.get('step', '?')} (planned {plan.get('total_steps', '?')} at {plan.get('img_per_s', '?')} img/s)")
    print(f"trainer's monitor (k {10}, disjoint halves): start {quality['start']}, end {quality['end']}, "
          f"shipped {quality['shipped']} {quality['shipped_score']}, verdict {quality['verdict']}")
    print(f"leave-one-out kNN k 10 on all digits: demo model {trained:.3f}, random network {random:.3f} "
          f"({trained - random:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
