"""Map page benchmark: what one rerun of the Map page costs for a large collection, without Streamlit.

    flock -x /tmp/cpu-bench.lock python bench/app_map.py                 # 100k synthetic points, D=512
    flock -x /tmp/cpu-bench.lock python bench/app_map.py --collection indexes/digits

Times, best of ``--repeat``: building the figure (sample of at most 20,000 points, one WebGL
trace per label, hover text) and serialising it with ``plotly.io.to_json(fig, validate=False)``,
which is what ``st.plotly_chart`` sends to the browser on each rerun; its size in bytes;
``Projection.place`` for one point (what an uploaded query costs to put on the map); and the
k-means colouring (computed once per collection generation, then cached). Also the cost of
drawing every point without the cap, to show why the cap exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plotly.io  # noqa: E402

from app import mapview  # noqa: E402
from indexer.analysis import kmeans_labels  # noqa: E402
from indexer.projection import FIT_MAX, PCA_DIMS, Projection  # noqa: E402


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Fastest wall time of ``repeat`` calls (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, Projection]:
    """A collection-like table (clustered 2-D points, file names, labels), unit vectors and a
    projection with the usual number of anchors (t-SNE itself is not needed to time ``place``)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, 2)) * 20
    xy = (centres[label] + rng.standard_normal((n, 2)) * 3).astype(np.float32)
    frame = pd.DataFrame({"id": np.arange(1, n + 1, dtype=np.int64),
                          "path": [f"class{c:02d}/IMG_{i:07d}.jpg" for i, c in enumerate(label)],
                          "label": [f"class{c:02d}" for c in label], "x": xy[:, 0], "y": xy[:, 1]})
    frame["name"] = frame["path"].str.rsplit("/", n=1).str[-1]
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    anchors = vectors[:FIT_MAX]
    mean = anchors.mean(axis=0)
    _, _, vt = np.linalg.svd(anchors - mean, full_matrices=False)
    components = vt[:PCA_DIMS].astype(np.float32)
    features = ((anchors - mean) @ components.T).astype(np.float32)
    projection = Projection(mean, components, features, xy[:FIT_MAX], frame["id"].to_numpy(), xy)
    return frame, vectors, projection


def from_collection(directory: Path) -> tuple[pd.DataFrame, np.ndarray, Projection]:
    from indexer.collection import Collection

    col = Collection.open(directory, device="cpu")
    items = col.items
    coords = col.coords()
    frame = pd.DataFrame({"id": col.ids, "path": [it.path for it in items],
                          "name": [Path(it.path).name for it in items], "label": [it.label for it in items],
                          "x": coords[:, 0], "y": coords[:, 1]})
    assert col.projection is not None, f"{directory} has no projection"
    return frame, np.asarray(col.vectors, dtype=np.float32), col.projection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000, help="synthetic collection size (default 100k)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--collection", type=Path, help="time a real collection instead of synthetic data")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=10, help="k for the k-means colouring (0: skip)")
    args = parser.parse_args(argv)

    frame, vectors, projection = from_collection(args.collection) if args.collection else \
        synthetic(args.points, args.dim, args.classes)
    n = len(frame)
    groups = mapview.group_names(frame["label"].tolist())
    query = projection.place(vectors[:1])[0]
    print(f"{n:,} points, D={vectors.shape[1]}, {len(set(groups.tolist()))} labels, cap {mapview.MAX_POINTS:,}")

    def capped() -> Any:
        return mapview.build_map(frame, groups, keep_ids=[int(frame["id"].iloc[0])], query_xy=tuple(query))

    build_s, drawn = best_of(args.repeat, capped)
    json_s, text = best_of(args.repeat, lambda: plotly.io.to_json(drawn.figure, validate=False))
    print(f"figure build      {1000 * build_s:8.1f} ms  ({drawn.caption})")
    print(f"to_json           {1000 * json_s:8.1f} ms  ({len(text) / 1e6:.2f} MB sent per rerun)")
    print(f"build + to_json   {1000 * (build_s + json_s):8.1f} ms")

    full_build_s, full = best_of(1, lambda: mapview.build_map(frame, groups, max_points=n))
    full_json_s, full_text = best_of(1, lambda: plotly.io.to_json(full.figure, validate=False))
    print(f"uncapped, all {n:,}: build {1000 * full_build_s:.0f} ms + to_json {1000 * full_json_s:.0f} ms "
          f"({len(full_text) / 1e6:.2f} MB)")

    place_s, _ = best_of(max(args.repeat, 20), lambda: projection.place(vectors[1:2]))
    print(f"Projection.place  {1000 * place_s:8.2f} ms for one point ({len(projection.anchor_coords):,} anchors)")

    if args.clusters:
        import sklearn.cluster  # noqa: F401 - import time is not clustering time

        kmeans_s, _ = best_of(1, lambda: kmeans_labels(vectors, args.clusters))
        print(f"k-means k={args.clusters}      {kmeans_s:8.2f} s  (once per generation and k, then cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
