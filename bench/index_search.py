"""Search benchmark: exact and `auto` recipes at 100k and 1M vectors (D=512) on this machine.

    flock -x /tmp/cpu-bench.lock python bench/index_search.py --model /tmp/index-bench/resnet18-64.onnx

Vectors that behave like real embeddings: CIFAR-10 train images (50k) embedded by a ResNet-18
exported with `python -m exports`, extended to N with noisy copies (v + noise, renormalised);
queries are CIFAR-10 *test* embeddings, so no query is in the index. The worst case is uniform
random unit vectors (no structure for IVF to exploit). For each: build time (train, add, tune),
index size, p50/p99 single-query latency and recall@10 against exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer import ann  # noqa: E402

CIFAR_TAR = Path("/work/shared/data/cifar10-jpg.tar.gz")


def cifar_embeddings(model: Path, data_root: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train 50k, test 10k) embeddings of CIFAR-10 by ``model``, cached as .npy."""
    if (cache / "cifar-train.npy").exists():
        return np.load(cache / "cifar-train.npy"), np.load(cache / "cifar-test.npy")
    if not (data_root / "cifar10").is_dir():
        data_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(data_root, filter="data")
    from indexer.build import build

    out = []
    for split in ("train", "test"):
        col = build(data_root / "cifar10" / split, cache / f"col-cifar-{split}", model=model, device="cpu",
                    batch_size=64, progress=True, projection_fit_max=1000)
        out.append(np.asarray(col.vectors, dtype=np.float32).copy())
        print(f"embedded CIFAR-10 {split}: {col.summary.images_per_second:.0f} images/s", flush=True)
    np.save(cache / "cifar-train.npy", out[0])
    np.save(cache / "cifar-test.npy", out[1])
    return out[0], out[1]


def extend(base: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    """``n`` vectors: ``base`` then noisy copies of random base rows, renormalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    m = min(n, len(base))
    out[:m] = base[:m]
    for start in range(m, n, 100_000):
        stop = min(n, start + 100_000)
        src = base[rng.integers(0, len(base), stop - start)]
        x = src + noise * rng.standard_normal(src.shape, dtype=np.float32) / np.sqrt(base.shape[1])
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def uniform(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        x = rng.standard_normal((min(n, start + 100_000) - start, d), dtype=np.float32)
        out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    index.search(queries[:1], k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def run_one(name: str, x: np.ndarray, queries: np.ndarray, spec: str, work: Path, lat_queries: int,
            train_size: int | None = None) -> dict:
    ids = np.arange(len(x), dtype=np.int64)
    recipe = ann.choose_recipe(len(x), x.shape[1], spec)
    t0 = time.perf_counter()
    index, recipe = ann.build_index(x, ids, recipe, use_gpu=False, train_size=train_size)
    build_s = time.perf_counter() - t0
    ann.save_index(index, work / "bench.faiss")
    size_mb = os.path.getsize(work / "bench.faiss") / 2**20
    _, truth = ann.exact_knn(queries, x, ids, 10)
    _, found = index.search(queries, 10)
    p50, p99 = latency(index, queries[:lat_queries])
    row = {"data": name, "n": len(x), "recipe": spec, "factory": recipe.factory, "params": recipe.params,
           "build_s": round(build_s, 1), "index_mb": round(size_mb, 1), "p50_ms": round(p50, 3),
           "p99_ms": round(p99, 3), "recall_at_10": round(ann.recall_at(found, truth), 4),
           "tuned_recall_held_out": recipe.recall_at_10, "train_size": recipe.train_size}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/index-bench/resnet18-64.onnx"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 1_000_000])
    parser.add_argument("--data", type=Path, default=Path("/tmp/data"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/index-bench"))
    parser.add_argument("--noise", type=float, default=0.5, help="relative noise of the copies (default 0.5)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="embeddings,uniform")
    parser.add_argument("--recipes", nargs="+", default=["flat", "auto"],
                        help="--index values: flat, auto, ivf, hnsw or FAISS factory strings")
    parser.add_argument("--train-size", type=int, default=None, help="vectors to train on (default: 40 per list)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        if kind == "embeddings":
            train, test = cifar_embeddings(args.model, args.data, args.work)
            queries = test[: args.queries]
        for n in args.sizes:
            if kind == "embeddings":
                x = extend(train, n, args.noise)
            else:
                x, queries = uniform(n, 512, 0), uniform(args.queries, 512, 1)
            for spec in args.recipes:
                lat_q = 100 if spec == "flat" and n >= 500_000 else 500
                rows.append(run_one(kind, x, queries, spec, args.work, lat_q, args.train_size))
            del x
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
