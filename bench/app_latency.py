"""What a person waits for in the app, on a real collection: upload → neighbours on screen, the map
page drawn, and the 2-D projection of 10k points.

    python bench/app_latency.py COLLECTION QUERY_DIR [--uploads 8] [--projection-points 10000]

* server side: the upload path without the browser (decode, embed with the collection's
  model, search, read the 10 thumbnails), median over the query images;
* in a real headless Chromium (Debian's chromium through playwright) against a running
  ``streamlit run app/main.py``: from handing the file to the upload control until the query's
  name and all 10 neighbour thumbnails are painted; and from opening the Map page until the
  WebGL plot is drawn;
* the projection: PCA + openTSNE on 10k vectors of the collection as ``build`` does it (fitted
  on up to ``FIT_MAX`` points, the rest placed), and for reference t-SNE fitted on all 10k.

The figures go to BENCHMARKS.md (issue 6) with the machine and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import local_server  # noqa: E402
from app.query import embed_upload  # noqa: E402
from indexer.collection import Collection  # noqa: E402
from indexer.images import scan_images  # noqa: E402
from indexer.projection import FIT_MAX, fit_projection  # noqa: E402


def server_side(collection: Collection, queries: list[Path]) -> list[float]:
    times = []
    for path in queries:
        data = path.read_bytes()
        start = time.perf_counter()
        embedded = embed_upload(collection, path.name, data)
        hits = collection.search_vector(embedded.vector, 10)
        for hit in hits:
            collection.thumbnail(hit.id)
        times.append(time.perf_counter() - start)
    return times


PAINTED = """(count) => {
    const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')];
    return imgs.filter(i => i.complete && i.naturalWidth > 0).length >= count;
}"""
"""True once ``count`` images are decoded and drawn in the page."""

IDLE = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
"""True once Streamlit's "running" indicator is gone."""


def browser(collection: Path, queries: list[Path]) -> tuple[list[float], float, float]:
    from playwright.sync_api import expect, sync_playwright

    with local_server.serve("--collection", str(collection), timeout=120) as server, sync_playwright() as p:
        chromium = local_server.launch_chromium(p)
        page = chromium.new_page(viewport={"width": 1400, "height": 1800})
        start = time.perf_counter()
        page.goto(server.url)
        expect(page.get_by_text("Top 10 neighbours")).to_be_visible(timeout=300_000)
        first_load = time.perf_counter() - start
        times = []
        for path in queries:
            start = time.perf_counter()
            page.locator("input[type=file]").set_input_files(str(path))
            expect(page.get_by_text(path.name, exact=True)).to_be_visible(timeout=60_000)
            page.wait_for_function(IDLE, timeout=60_000)
            page.wait_for_function(PAINTED, arg=11, polling=10, timeout=60_000)  # the query and 10 neighbours
            times.append(time.perf_counter() - start)
        print("browser upload times (s):", " ".join(f"{t:.2f}" for t in times))
        start = time.perf_counter()
        page.get_by_role("link", name="Map").click()
        page.wait_for_selector(".js-plotly-plot .gl-container canvas, .js-plotly-plot canvas", timeout=120_000)
        page.wait_for_function(IDLE, timeout=120_000)
        map_seconds = time.perf_counter() - start
        page.screenshot(path=str(ROOT / "test-artifacts" / "bench-map.png"), full_page=True)
        chromium.close()
    return times, first_load, map_seconds


def projection(collection: Collection, points: int) -> tuple[float, float]:
    ids = collection.ids[:points]
    vectors = collection.vectors[:points].astype("float32")
    start = time.perf_counter()
    fit_projection(ids, vectors)
    sampled = time.perf_counter() - start
    start = time.perf_counter()
    fit_projection(ids, vectors, fit_max=points)
    return sampled, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", type=Path)
    parser.add_argument("queries", type=Path, help="folder of query images (not in the collection)")
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--projection-points", type=int, default=10_000)
    parser.add_argument("--skip-browser", action="store_true")
    parser.add_argument("--skip-projection", action="store_true")
    args = parser.parse_args()
    queries = [args.queries / ref.relpath for ref in scan_images(args.queries)][: args.uploads]
    start = time.perf_counter()
    collection = Collection.open(args.collection)
    print(f"collection: {len(collection):,} items, index {collection.recipe.get('factory')}, "
          f"opened in {time.perf_counter() - start:.2f} s")
    server_side(collection, queries[:2])  # warm the ONNX session
    times = server_side(collection, queries)
    print(f"upload path without the browser (decode+embed+search+thumbnails): median "
          f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {len(times)}")
    if not args.skip_browser:
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        browser_times, first, map_seconds = browser(args.collection, queries)
        print(f"browser: first page with neighbours {first:.1f} s (cold server: opens the collection)")
        print(f"browser: upload -> query and 10 neighbour thumbnails painted: median "
              f"{statistics.median(browser_times):.2f} s, max {max(browser_times):.2f} s over {len(browser_times)}")
        print(f"browser: Map page drawn (WebGL) {map_seconds:.2f} s")
    if args.skip_projection:
        return
    sampled, full = projection(collection, args.projection_points)
    print(f"projection of {args.projection_points:,} points: {sampled:.1f} s (t-SNE on {FIT_MAX:,}, rest placed; "
          f"what build does), {full:.1f} s (t-SNE on all)")


if __name__ == "__main__":
    main()
