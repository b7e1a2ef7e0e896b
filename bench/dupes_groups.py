"""Near-duplicate group sizes under the old fixed threshold and the new adaptive default.

    python bench/dupes_groups.py indexes/flowers-weak indexes/flowers-good [--json]

For each collection (built beforehand with ``python -m indexer build``; typically the same
folder indexed with a weak and a good model): the model, the median nearest-neighbour cosine,
then three rules: "old 0.95" (what ``dupes`` did before: cosine 0.95, plain connected
components), "now 0.95" (``--threshold 0.95`` today: groups kept within twice the threshold's
distance of their centre, identical files together) and "new default" (the threshold adapted to
the model, :func:`indexer.dupes.choose_threshold`), each with its threshold, the number of
groups, the largest group, the items in groups and the seconds it took, and the machine's CPU.
A weak model makes one giant group under the old rule; the default must not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from indexer.collection import Collection  # noqa: E402
from indexer.dupes import DEFAULT_THRESHOLD, duplicate_groups, group_sizes  # noqa: E402
from indexer.store import CollectionError  # noqa: E402


def measure_collection(directory: Path) -> dict[str, Any]:
    """The two rows (old fixed threshold, new default) of one collection."""
    with Collection.open(directory, device="cpu") as col:
        props = col.manifest["model"]["props"]
        stats = col.neighbour_stats()
        result: dict[str, Any] = {
            "collection": str(directory), "items": len(col),
            "model": f"{props.get('moco.arch', '?')} {props.get('moco.preset', '')} "
                     f"{props.get('moco.image_size', '?')} px, trained on {props.get('moco.train_data', '?')}",
            "quality": col.manifest["model"]["props"].get("moco.quality", "not recorded"),
            "stats": "stored at build" if col.manifest.get("neighbour_stats") else "measured now (older build)",
            "median_nearest": None if stats is None else round(stats.typical_nearest(), 5),
            "median_kth": None if stats is None else round(stats.typical_kth(), 5),
            "rows": [],
        }
        for name, given in (("old 0.95", DEFAULT_THRESHOLD), ("now 0.95", DEFAULT_THRESHOLD), ("new default", None)):
            chosen = col.duplicate_threshold(given)
            t0 = time.perf_counter()
            if name.startswith("old"):  # what dupes did before: plain connected components
                groups = duplicate_groups(col.searcher, col.vectors, col.ids, chosen.similarity, spread=float("inf"))
            else:
                groups = col.duplicates(chosen.similarity)
            seconds = time.perf_counter() - t0
            result["rows"].append({"rule": name, "threshold": round(chosen.similarity, 5), "why": chosen.reason,
                                   **group_sizes(groups, len(col)), "seconds": round(seconds, 3)})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Near-duplicate group sizes of collections under the old fixed "
                                     "0.95 threshold and the new adaptive default.")
    parser.add_argument("collections", type=Path, nargs="+", metavar="COLLECTION")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        results = [measure_collection(d) for d in args.collections]
    except CollectionError as exc:
        print(f"dupes_groups: error: {exc}", file=sys.stderr)
        return 2
    cpu = cpu_name()
    if args.json:
        print(json.dumps({"cpu": cpu, "collections": results}, indent=2))
        return 0
    print(f"CPU: {cpu}")
    for r in results:
        print(f"\n{r['collection']}: {r['items']:,} items; model {r['model']}")
        print(f"  neighbour statistics {r['stats']}: median nearest-neighbour cosine {r['median_nearest']}, "
              f"median 10th-neighbour cosine {r['median_kth']}")
        print(f"  {'rule':12s} {'threshold':>9s} {'groups':>7s} {'largest':>8s} {'in groups':>10s} {'seconds':>8s}")
        for row in r["rows"]:
            print(f"  {row['rule']:12s} {row['threshold']:9.5f} {row['groups']:7d} {row['largest']:8d} "
                  f"{row['in_groups']:10d} {row['seconds']:8.2f}")
        print(f"  default: {r['rows'][-1]['why']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
