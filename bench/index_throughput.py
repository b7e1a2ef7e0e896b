"""Indexing throughput on real JPEGs: the indexer's pipeline against a naive loop and the machine's ceiling.

    flock -x /tmp/cpu-bench.lock python bench/index_throughput.py --sizes 64 128

What it measures, per model input size S (a ResNet-18, ImageNet stem, exported by `python -m exports`
from a one-epoch run; the weights do not change the cost):

(a) naive: PIL open, full decode, resize, one image at a time through ONNX Runtime;
(b) model only: ONNX Runtime on ready uint8 arrays, best batch size;
(c) ceiling: 2 / (t_decode + t_infer) images/s for this 2-core machine, with t_decode one core's
    time to decode (JPEG draft) + resize one image, t_infer = 2 / rate(b) core-seconds per image;
pipeline: `indexer.build.build` (decode pool + batched inference + SQLite rows, thumbnails and hashes),
    images/s over the embedding phase, for a few (decode workers, ORT threads) settings.

Data: /work/shared/data/imagenet-sample-500.tar, extracted to /tmp/data (never into the repo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.build import build  # noqa: E402
from indexer.embed import EmbeddingModel  # noqa: E402
from indexer.images import apply_resize, load_rgb, scan_images, to_uint8_array  # noqa: E402

TAR = Path("/work/shared/data/imagenet-sample-500.tar")


def extract(data_root: Path) -> Path:
    folder = data_root / "imagenet-sample"
    if not folder.is_dir():
        data_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(TAR) as tar:
            tar.extractall(data_root, filter="data")
    return folder


def make_model(size: int, images: Path, work: Path) -> Path:
    """A ResNet-18 exported at ``size`` px: one short epoch on 32 images, then `python -m exports`."""
    model = work / f"resnet18-{size}.onnx"
    if model.is_file():
        return model
    train = work / "train-images" / "all"
    train.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("*.JPEG"))[:32]:
        shutil.copy(path, train / path.name)
    run = work / f"run-{size}"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "moco", "train", str(train.parent), "--out", str(run), "--epochs", "1",
                    "--arch", "resnet18", "--stem", "imagenet", "--image-size", str(size), "--workers", "0",
                    "--batch-size", "16", "--no-channels-last"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "exports", str(run / "checkpoint.pt"), "-o", str(model), "--device", "cpu"],
                   check=True, cwd=ROOT)
    return model


def model_only(model: EmbeddingModel, batches: tuple[int, ...] = (8, 16, 32, 64, 128)) -> tuple[float, int]:
    s = model.image_size
    best = (0.0, 0)
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8)
        model.embed(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            model.embed(x)
            n += b
        rate = n / (time.perf_counter() - t0)
        best = max(best, (rate, b))
    return best


def decode_time(paths: list[Path], model: EmbeddingModel) -> float:
    """One core's seconds to decode (JPEG draft to the size needed) and resize one image."""
    t0 = time.perf_counter()
    for p in paths:
        to_uint8_array(apply_resize(load_rgb(p, min_side=model.short_side), model.resize))
    return (time.perf_counter() - t0) / len(paths)


def naive(paths: list[Path], model: EmbeddingModel) -> float:
    from PIL import Image

    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            rgb = img.convert("RGB")  # full decode
        model.embed(to_uint8_array(apply_resize(rgb, model.resize))[None])
    return len(paths) / (time.perf_counter() - t0)


def pipeline(images: Path, model_path: Path, out: Path, workers: int, threads: int, batch: int,
             spin: bool = False) -> float:
    import os

    os.environ["INDEXER_ORT_SPIN"] = "1" if spin else "0"
    shutil.rmtree(out, ignore_errors=True)
    col = build(images, out, model=model_path, device="cpu", workers=workers, threads=threads,
                batch_size=batch, projection_fit_max=500)
    summary = col.summary
    col.close()
    return summary.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--data", type=Path, default=Path("/tmp/data"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/index-bench"))
    parser.add_argument("--configs", default="2x2,2x2s,1x2,2x1,3x2",
                        help="pipeline settings WORKERSxTHREADS, suffix s: ORT threads spin")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    images = extract(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = [r.path for r in scan_images(images)]
    for p in paths:  # warm the page cache so every variant reads from memory
        p.read_bytes()
    results = []
    for size in args.sizes:
        model_path = make_model(size, images, args.work)
        model = EmbeddingModel(model_path, device="cpu", threads=2, spin=True)  # ORT's own best case
        rate_b, best_batch = model_only(model)
        t_decode = decode_time(paths, model)
        t_infer = 2.0 / rate_b
        ceiling = 2.0 / (t_decode + t_infer)
        model1 = EmbeddingModel(model_path, device="cpu", threads=2, spin=True)
        rate_a = naive(paths[:200], model1)
        pipes = {}
        for config in args.configs.split(","):
            w, t = (int(v) for v in config.rstrip("s").split("x"))
            pipes[config] = pipeline(images, model_path, args.work / f"col-{size}", w, t, args.batch,
                                     spin=config.endswith("s"))
        best_cfg = max(pipes, key=pipes.get)
        row = {"size": size, "images": len(paths), "naive_a": round(rate_a, 1), "model_only_b": round(rate_b, 1),
               "best_batch_b": best_batch, "t_decode_ms": round(1e3 * t_decode, 2),
               "t_infer_ms": round(1e3 * t_infer, 2), "ceiling_c": round(ceiling, 1),
               "pipeline": {k: round(v, 1) for k, v in pipes.items()}, "best_config": best_cfg,
               "pct_of_ceiling": round(100 * pipes[best_cfg] / ceiling, 1),
               "x_naive": round(pipes[best_cfg] / rate_a, 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, indent=2))


if __name__ == "__main__":
    main()
