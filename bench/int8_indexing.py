"""Indexing with the fp32 model against its int8 sibling (issue 18 item 3): speed and kNN, same run.

    flock -x /tmp/cpu-bench.lock python bench/int8_indexing.py --run runs/flowers --sizes 64 128 \\
        --knn /tmp/data/flowers/train /tmp/data/flowers/test

Speed, per model input size S, on the 500 ImageNet-sample JPEGs (page cache warm), fp32 and int8
interleaved so both see the same machine load:
  model only: ONNX Runtime on ready uint8 arrays, best batch of 32/64/128, 2 threads;
  ceiling:    2 / (t_decode + 2 / model-only rate): this 2-core machine's best pipeline rate;
  pipeline:   `indexer.build.build` images/s over the embedding phase (2 decode threads x 2 ORT threads).
The model at S is the --run's own export when S is its training size, else a ResNet-18 (ImageNet
stem) trained one epoch on 32 of the photos (as bench/index_throughput.py; the weights do not change
the cost). Each pair is written by `python -m exports ... --with-int8`, the command users run.

kNN (with --knn TRAIN TEST, the --run's model): weighted kNN (k 200, t 0.1) of TEST's photos
against TRAIN's, each embedded through the indexer's pipeline by fp32 and by int8, the top-10
overlap of those neighbours, and `indexer eval`'s kNN on a collection of TRAIN built by each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.index_throughput import decode_time, extract, make_model, model_only, pipeline  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from indexer import models  # noqa: E402
from indexer.analysis import knn_top1  # noqa: E402
from indexer.build import build  # noqa: E402
from indexer.embed import EmbeddingModel, embed_files  # noqa: E402
from indexer.images import scan_images  # noqa: E402


def export_pair(checkpoint: Path, out: Path, calibration: Path | None) -> tuple[Path, Path]:
    """`python -m exports CKPT -o OUT --with-int8`: the fp32 model and its verified int8 sibling."""
    sibling = models.int8_sibling(out)
    if not (out.is_file() and sibling.is_file()):
        command = [sys.executable, "-m", "exports", str(checkpoint), "-o", str(out), "--with-int8", "--device", "cpu"]
        if calibration is not None:
            command += ["--calibration", str(calibration)]
        subprocess.run(command, check=True, cwd=ROOT)
    return out, sibling


def speed(size: int, pair: tuple[Path, Path], paths: list[Path], images: Path, work: Path,
          repeats: int) -> dict[str, object]:
    """Model-only, ceiling and pipeline rates of fp32 and int8, interleaved."""
    row: dict[str, object] = {"size": size, "images": len(paths)}
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for name, path in zip(("fp32", "int8"), pair):
        model = EmbeddingModel(path, device="cpu", threads=2, spin=True)  # ORT's own best case
        rate_b, batch = model_only(model, (32, 64, 128))
        t_decode = decode_time(paths, model)
        row[name] = {"model": str(path), "model_only": round(rate_b, 1), "best_batch": batch,
                     "t_decode_ms": round(1e3 * t_decode, 2), "t_infer_ms": round(2e3 / rate_b, 2),
                     "ceiling": round(2.0 / (t_decode + 2.0 / rate_b), 1)}
    for _ in range(repeats):
        for name, path in zip(("fp32", "int8"), pair):
            rates[name].append(pipeline(images, path, work / f"col-{size}-{name}", 2, 2, 64))
    for name in ("fp32", "int8"):
        best = max(rates[name])
        entry = row[name]
        assert isinstance(entry, dict)
        entry.update(pipeline=[round(r, 1) for r in rates[name]], pipeline_best=round(best, 1),
                     pct_of_ceiling=round(100 * best / entry["ceiling"], 1))
    row["int8_over_fp32_pipeline"] = round(max(rates["int8"]) / max(rates["fp32"]), 2)
    return row


def embed_folder(model: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and label indices of a labelled folder, through the indexer's own pipeline."""
    refs = scan_images(folder)
    names = sorted({r.label for r in refs})
    net = EmbeddingModel(model, device="cpu")
    vectors = [v for chunk in embed_files((r.path for r in refs), net) for _, v in chunk]
    assert all(v is not None for v in vectors), "a photo failed to decode"
    return np.stack(vectors), np.array([names.index(r.label) for r in refs])


def knn(pair: tuple[Path, Path], train: Path, test: Path, work: Path) -> dict[str, object]:
    from exports.verify import OVERLAP_K

    result: dict[str, object] = {"train": str(train), "test": str(test)}
    neighbours = {}
    for name, path in zip(("fp32", "int8"), pair):
        xtr, ytr = embed_folder(path, train)
        xte, yte = embed_folder(path, test)
        neighbours[name] = np.argsort(-(xte @ xtr.T), axis=1, kind="stable")[:, :OVERLAP_K]
        collection = work / f"knn-{name}"
        shutil.rmtree(collection, ignore_errors=True)
        col = build(train, collection, model=path, device="cpu", progress=False)
        evaluated = col.evaluate()
        col.close()
        result[name] = {"knn_test_vs_train": round(100 * knn_top1(xtr, ytr, xte, yte), 2),
                        "indexer_eval_knn": round(100 * evaluated["knn_top1"], 2),
                        "precision_recorded": models.precision_of(EmbeddingModel(path, device="cpu").props)}
    shared = [len(np.intersect1d(a, b)) for a, b in zip(neighbours["fp32"], neighbours["int8"])]
    result["top10_overlap_test_in_train"] = round(float(np.mean(shared)) / OVERLAP_K, 4)
    for key in ("knn_test_vs_train", "indexer_eval_knn"):
        result[f"{key}_change"] = round(result["int8"][key] - result["fp32"][key], 2)  # type: ignore[index]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (its model is exported)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128], help="input sizes to time (none: kNN only)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/data"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8-bench"))
    parser.add_argument("--repeats", type=int, default=2, help="pipeline runs per variant (best kept)")
    parser.add_argument("--knn", type=Path, nargs=2, metavar=("TRAIN", "TEST"), help="labelled folders for kNN")
    args = parser.parse_args()
    os.environ.setdefault("INDEXER_ORT_SPIN", "0")
    images = extract(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = [r.path for r in scan_images(images)]
    for p in paths:  # warm the page cache so both variants read from memory
        p.read_bytes()
    from moco.checkpoint import load_checkpoint, resolve_checkpoint_path

    checkpoint = resolve_checkpoint_path(args.run)
    run_size = int(load_checkpoint(checkpoint)["config"]["image_size"])
    header = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
              "int8_flags": models.cpu_int8_flags(), "load_before": os.getloadavg()}
    print(json.dumps(header), flush=True)
    rows = []
    for size in args.sizes:
        if size == run_size:
            pair = export_pair(checkpoint, args.work / f"run-{size}.onnx", None)
        else:
            make_model(size, images, args.work)
            pair = export_pair(args.work / f"run-{size}" / "checkpoint.pt", args.work / f"bench-{size}.onnx", images)
        chosen = models.choose_variant(pair[0], device="cpu")
        row = speed(size, pair, paths, images, args.work, args.repeats)
        row["default_here"] = {"precision": chosen.precision, "reason": chosen.reason}
        rows.append(row)
        print(json.dumps(row), flush=True)
    knn_row = None
    if args.knn:
        knn_row = knn(export_pair(checkpoint, args.work / f"run-{run_size}.onnx", None), *args.knn, args.work)
        print(json.dumps(knn_row), flush=True)
    print(json.dumps({**header, "load_after": os.getloadavg(), "speed": rows, "knn": knn_row}, indent=2))


if __name__ == "__main__":
    main()
