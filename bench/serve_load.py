"""Load on the HTTP service: N concurrent clients on loopback, vector queries then image uploads.

    flock -x /tmp/cpu-bench.lock python bench/serve_load.py                       # 100k items, 60 s a phase
    python bench/serve_load.py --items 10000 --seconds 5 --update                  # a quick check
    python bench/serve_load.py --collection /tmp/idx/cifar100k --phases vector --seconds 20

The collection (unless ``--collection`` names one): CIFAR-10's 60,000 photos (train and test,
from ``--data``) plus mirrored copies up to ``--items``, as issue 6's app benchmark made its
100,000 items, built once into ``--workdir`` with ``--model`` (default: a random-projection
model of Contract 2 at 32 px, D=512, the tests' fixture: it makes the build cheap and the
upload figures a measure of the service, decoding and search rather than of a network; pass a
real model to include one).

Then ``python -m indexer serve`` runs on a free loopback port and ``--clients`` clients (one
asyncio loop, keep-alive connections, requests prepared in advance so the client costs little
of the 2 cores) send, for ``--seconds`` each: JSON vector queries (collection vectors plus
noise, k=10), then multipart uploads of 500 px JPEGs that are not in the collection (ImageNet
sample photos, k=10). Every loop is bounded in time and in count (``--max-requests``). With
``--update``, new pictures are added to the image folder in the middle of each phase and
``python -m indexer update`` commits a new generation while the clients keep going. A request
fails unless it answers 200 with a JSON body of k hits, each with id, path, score and label
(every answer is parsed). Prints requests/s, p50/p99/max latency, failures, generations seen,
the machine's CPU, and the CPU time per request of the clients (this process) and of the
server (its processes, from /proc): on a shared machine the server's CPU per request is the
steadier figure, and the clients' share says what the load generator takes from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from indexer.collection import Collection  # noqa: E402
from indexer.server.local import running_server  # noqa: E402
from tests.indexer.conftest import make_model, picture  # noqa: E402  (the tests' Contract-2 model: one recipe)

K = 10


# -- the collection ------------------------------------------------------------------------------

def make_images(data: Path, folder: Path, items: int) -> None:
    """``items`` pictures under ``folder``: CIFAR-10 photos (hard links), then mirrored copies."""
    sources = sorted(p for split in ("train", "test") for p in (data / split).rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"no CIFAR-10 photos under {data}/train and {data}/test")
    made = 0
    for i in range(items):
        src = sources[i % len(sources)]
        label = src.parent.name
        copy = i // len(sources)
        out = folder / label / (f"{src.parent.parent.name}-{src.stem}" + (f"-m{copy}" if copy else "") + ".jpg")
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if copy == 0:
            try:
                os.link(src, out)
            except OSError:
                out.write_bytes(src.read_bytes())
        else:
            with Image.open(src) as img:
                flipped = ImageOps.mirror(img.convert("RGB"))
                if copy > 1:
                    flipped = flipped.rotate(5 * copy)
                flipped.save(out, quality=90)
        made += 1
    print(f"images      {items:,} under {folder} ({made:,} written now)", flush=True)


def ensure_collection(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The collection to serve, and the image folder the bench may add to (None: not ours)."""
    if args.collection:
        return args.collection, None
    work = args.workdir / f"items-{args.items}"
    images = work / "images"
    directory = work / "collection"
    if (directory / "manifest.json").exists():
        with Collection.open(directory, device="cpu") as col:
            print(f"collection  {directory}: {len(col):,} items, generation {col.generation} (reused)", flush=True)
        return directory, images
    make_images(args.data, images, args.items)
    model = args.model or make_model(work / "projection-512.onnx", image_size=32, dim=512)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "indexer", "build", str(images), "--out", str(directory),
                           "--model", str(model), "--device", "cpu"], cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit("the build failed")
    print(f"built       in {time.perf_counter() - t0:.0f} s", flush=True)
    return directory, images


def add_and_update(collection: Path, images: Path, round_: int, log: list[str]) -> None:
    """New pictures in the image folder, then ``python -m indexer update`` (a new generation)."""
    folder = images / "added"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        picture(10_000 * (round_ + 1) + i, (250, 200, 30)).save(folder / f"r{round_}-{i}.jpg")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "indexer", "update", str(collection), "--device", "cpu",
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    status = "committed" if done.returncode == 0 else f"FAILED: {done.stderr.strip()[-300:]}"
    log.append(f"update {status} in {time.perf_counter() - t0:.1f} s")


# -- the queries ---------------------------------------------------------------------------------

def vector_requests(collection: Path, count: int, path: str, host: str) -> list[bytes]:
    """HTTP requests of JSON vector queries: collection vectors plus noise (not exact items)."""
    with Collection.open(collection, device="cpu") as col:
        rng = np.random.default_rng(0)
        rows = rng.integers(0, len(col), count)
        base = np.asarray(col.vectors[np.sort(rows)], dtype=np.float32)
    noisy = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
    out = []
    for v in noisy:
        body = json.dumps({"vector": [round(float(x), 6) for x in v], "k": K}).encode()
        out.append(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


def upload_requests(queries: Path, count: int, path: str, host: str) -> list[bytes]:
    """HTTP requests of multipart uploads: photos from ``queries`` resized to 500 px, as JPEG."""
    files = sorted(p for p in queries.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:count]
    if not files:
        raise SystemExit(f"no JPEG query photos in {queries}")
    out = []
    boundary = "serveloadboundary7MA4YWxkTrZu0gW"
    for f in files:
        with Image.open(f) as img:
            img = img.convert("RGB")
            img.thumbnail((500, 500))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{f.name}\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        out.append(f"POST {path}?k={K} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                   f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


# -- the load ------------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    client_cpu: float = 0.0  # CPU seconds of this process (the clients) during the phase
    server_cpu: float | None = None  # CPU seconds of the server's processes (None: not measurable here)

    def line(self) -> str:
        n = len(self.latencies)
        if not n:
            return f"{self.name:8s} no request answered; failures {len(self.failures)}"
        ms = sorted(1000 * t for t in self.latencies)
        p99 = ms[min(n - 1, int(0.99 * n))]
        answered = n + len(self.failures)
        server = "" if self.server_cpu is None else f", server {1000 * self.server_cpu / answered:.2f}"
        return (f"{self.name:8s} {n:7,} requests in {self.seconds:5.1f} s = {n / self.seconds:7.1f} req/s   "
                f"p50 {statistics.median(ms):6.1f} ms  p99 {p99:6.1f} ms  max {ms[-1]:6.1f} ms   "
                f"failures {len(self.failures)}   CPU ms/request: clients {1000 * self.client_cpu / answered:.2f}"
                f"{server}")


def own_cpu() -> float:
    """CPU seconds (user and system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pid: int) -> float | None:
    """CPU seconds of process ``pid`` and its live descendants (Linux /proc; None elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            if p == pid:
                return None
    return total


def hits_ok(body: bytes) -> bool:
    """Whether an answer is JSON of exactly K hits, each with an integer id, path, score and label."""
    try:
        hits = json.loads(body)["hits"]
    except (ValueError, KeyError, TypeError):
        return False
    return (isinstance(hits, list) and len(hits) == K and all(
        isinstance(h, dict) and isinstance(h.get("id"), int) and isinstance(h.get("path"), str)
        and isinstance(h.get("score"), float) and "label" in h for h in hits))


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one prepared request on a keep-alive connection; the status and the body."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _client(host: str, port: int, requests: list[bytes], offset: int, phase: Phase, deadline: float,
                  budget: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            request = requests[i % len(requests)]
            i += 1
            t0 = time.perf_counter()
            try:
                status, body = await _exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                phase.failures.append(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            took = time.perf_counter() - t0
            if status != 200 or not hits_ok(body):
                phase.failures.append(f"{status} {body[:200]!r}")
            else:
                phase.latencies.append(took)
    finally:
        writer.close()


def run_phase(name: str, url: str, requests: list[bytes], clients: int, seconds: float, max_requests: int,
              update: tuple[Path, Path, int] | None, log: list[str], server_pid: int | None = None) -> Phase:
    parts = urlsplit(url)
    phase = Phase(name)
    worker = None
    if update is not None:
        collection, images, round_ = update

        def later() -> None:
            time.sleep(seconds / 2)
            add_and_update(collection, images, round_, log)

        worker = threading.Thread(target=later, daemon=True)

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        budget = [max_requests]
        await asyncio.gather(*(_client(parts.hostname or "127.0.0.1", parts.port or 80, requests, i, phase,
                                        deadline, budget) for i in range(clients)))

    t0, cpu0 = time.perf_counter(), own_cpu()
    server0 = tree_cpu(server_pid) if server_pid is not None else None
    if worker is not None:
        worker.start()
    asyncio.run(main())
    phase.seconds = time.perf_counter() - t0
    phase.client_cpu = own_cpu() - cpu0  # the update's own work runs in a child process: not counted
    server1 = tree_cpu(server_pid) if server_pid is not None else None
    if server0 is not None and server1 is not None:
        phase.server_cpu = server1 - server0
    if worker is not None:
        worker.join(timeout=600)
    return phase


def generation(url: str) -> int:
    import urllib.request

    name = urlsplit(url).path.rsplit("/", 1)[-1]
    base = url.rsplit("/collections/", 1)[0]
    with urllib.request.urlopen(f"{base}/collections/{name}", timeout=30) as answer:
        return int(json.load(answer)["generation"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", type=Path, help="serve this collection instead of building one")
    parser.add_argument("--items", type=int, default=100_000, help="items of the built collection (default 100k)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/data/cifar10"), help="CIFAR-10 train/ and test/")
    parser.add_argument("--queries", type=Path, default=Path("/tmp/data/imagenet-sample"),
                        help="photos to upload (not in the collection)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-bench"))
    parser.add_argument("--model", type=Path, help="ONNX model for the built collection (default: random projection)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase (default 60)")
    parser.add_argument("--max-requests", type=int, default=500_000, help="most requests in one phase")
    parser.add_argument("--workers", type=int, default=1, help="server processes (--workers of serve)")
    parser.add_argument("--embed-batch", type=int, default=32, help="--embed-batch of serve (1: no batching)")
    parser.add_argument("--update", action="store_true", help="commit a new generation in the middle of each phase")
    parser.add_argument("--phases", default="vector,upload", help="which phases, in order (default vector,upload)")
    args = parser.parse_args(argv)

    collection, images = ensure_collection(args)
    if args.update and images is None:
        raise SystemExit("--update adds pictures to the image folder: only for a collection this bench built")
    with Collection.open(collection, device="cpu") as col:
        items, props = len(col), col.manifest["model"]["props"]
    name = collection.name
    print(f"machine     {cpu_name()}, {os.cpu_count()} logical CPUs")
    print(f"collection  {collection}: {items:,} items, model {props.get('moco.arch')} "
          f"{props.get('moco.image_size')} px D={props.get('moco.embedding_dim')}", flush=True)
    log: list[str] = []
    with running_server(str(collection), "--device", "cpu", "--no-access-log", "--workers", str(args.workers),
                        "--embed-batch", str(args.embed_batch), timeout=300) as server:
        host = urlsplit(server.url).netloc
        path = f"/collections/{name}/search"
        prepared = {"vector": lambda: vector_requests(collection, 2000, path, host),
                    "upload": lambda: upload_requests(args.queries, 64, path, host)}
        info_url = f"{server.url}/collections/{name}"
        time.sleep(1.0 if args.workers == 1 else 5.0)
        print(f"server      {server.url}, {args.workers} worker(s), embed batch {args.embed_batch}; "
              f"{args.clients} clients, {args.seconds:g} s "
              f"a phase{', update in the middle' if args.update else ''}", flush=True)
        for round_, phase_name in enumerate(args.phases.split(",")):
            requests = prepared[phase_name]()
            before = generation(info_url)
            upd = (collection, images, round_) if args.update and images is not None else None
            phase = run_phase(phase_name, server.url, requests, args.clients, args.seconds, args.max_requests,
                              upd, log, server.process.pid)
            after = generation(info_url)
            print(phase.line() + f"   generation {before} -> {after}", flush=True)
            for failure in phase.failures[:5]:
                print(f"  failure: {failure}")
        for line in log:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
