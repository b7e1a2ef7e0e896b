"""Embedding throughput of exported models, and what int8/fp16 cost in kNN accuracy.

Run only under the shared benchmark lock, so no two benchmarks share the CPU:

    flock /tmp/cpu-bench.lock python bench/export_throughput.py speed --size 64
    flock /tmp/cpu-bench.lock python bench/export_throughput.py speed --size 128
    flock /tmp/cpu-bench.lock python bench/export_throughput.py knn --checkpoint /tmp/runs/cifar_export \\
        --train /tmp/data/cifar10-train10k --test /tmp/data/cifar10/test --variants fp32,int8-qdq

`speed`: images/s of one ResNet-18 (random weights: speed does not depend on their values) in
PyTorch eager (channels_last, no_grad) and as ONNX Runtime fp32 / fp16 / int8 variants, same
batch, same uint8 input, preprocessing and L2 normalization included on both sides. `knn`:
weighted kNN top-1 (k=200, T=0.1) of each variant's features against fp32's, the top-10
neighbour overlap of every test query's neighbours in the train set, and the exporter's own
check (overlap within 512 test images). Features are cached in --cache, so each run stays short.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import cpu_name  # noqa: E402
from exports import samples, verify  # noqa: E402
from exports.onnx import ImagesToEmbeddings, export_graph, load_source, torch_embed  # noqa: E402
from exports.quantize import quantize_int8  # noqa: E402
from indexer import runtime  # noqa: E402
from indexer.analysis import knn_top1  # noqa: E402
from indexer.images import scan_images  # noqa: E402
from moco.backbones import build_backbone  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INT8_VARIANTS = {  # name -> quantize_int8 keyword arguments
    "int8-qdq": dict(variant="qdq"),  # the exporter's choice: 7-bit weights
    "int8-qdq-8bit": dict(variant="qdq", reduce_range=False),
    "int8-qdq-u8u8": dict(variant="qdq", reduce_range=False, unsigned_weights=True),
    "int8-qop": dict(variant="qoperator"),
    "int8-dyn": dict(variant="dynamic"),
}


def timed_rounds(runners: dict[str, Callable[[], object]], rounds: int, seconds: float,
                 ) -> dict[str, list[float]]:
    """Seconds per call of each runner, measured in interleaved rounds.

    Interleaving spreads any burst of background load over all variants instead of charging it
    to whichever ran at that moment; each round times >= `seconds` of calls (at least one).
    """
    for run in runners.values():  # warm-up: first-call allocations, thread pool start
        run()
    per_call: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < seconds:
                run()
                calls += 1
            per_call[name].append((time.perf_counter() - start) / calls)
    return per_call


def build_variant(name: str, fp32: onnx.ModelProto, model: ImagesToEmbeddings, size: int,
                  calibration: np.ndarray) -> onnx.ModelProto:
    if name == "fp32":
        return fp32
    if name == "fp16":
        half = ImagesToEmbeddings(copy.deepcopy(model.net), MEAN, STD, half=True).eval()
        return export_graph(half, size)
    return quantize_int8(fp32, calibration, **INT8_VARIANTS[name])


def cmd_speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    threads = runtime.physical_cores()
    torch.set_num_threads(threads)
    stem = "small" if args.size <= 32 else "imagenet"
    net = build_backbone("resnet18", stem=stem, image_size=args.size).eval()
    model = ImagesToEmbeddings(net, MEAN, STD).eval()
    batch = samples.natural_images(args.batch, args.size, seed=0)
    eager = copy.deepcopy(model).to(memory_format=torch.channels_last)
    tensor = torch.from_numpy(batch)  # NHWC uint8: permuted to NCHW it is channels_last already

    def run_eager() -> None:
        with torch.no_grad():
            eager(tensor)

    nchw = copy.deepcopy(model)
    contiguous = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))

    def run_eager_nchw() -> None:  # the same network fed a contiguous NCHW batch, for reference
        with torch.no_grad():
            nchw.net(contiguous.float() * nchw.scale + nchw.shift)

    runners: dict[str, Callable[[], object]] = {"torch eager (channels_last)": run_eager,
                                                "torch eager (NCHW)": run_eager_nchw}
    if args.plain:
        runners["onnx plain torchvision, float"] = plain_torchvision_runner(args.size, args.batch, threads)
    fp32 = export_graph(model, args.size)
    calibration = samples.natural_images(128, args.size, seed=1)
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        proto = build_variant(name, fp32, model, args.size, calibration)
        # spin=True: ORT's own default, what the figures in BENCHMARKS.md were measured with
        session = runtime.make_session(proto.SerializeToString(), "cpu", threads=threads, spin=True)
        runners[f"onnx {name}"] = lambda s=session: s.run(None, {"images": batch})
        print(f"  built {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    per_call = timed_rounds(runners, args.rounds, args.seconds)
    best = {name: min(times) for name, times in per_call.items()}
    base, fp32_time = best["torch eager (channels_last)"], best.get("onnx fp32")
    print(f"ResNet-18 ({stem} stem) at {args.size} px, batch {args.batch}, {threads} threads, "
          f"torch {torch.__version__}, onnxruntime {runtime.ort.__version__}, {cpu_name()}; "
          f"best and median of {args.rounds} interleaved rounds")
    print(f"{'variant':<32} {'img/s':>7} {'median':>7} {'vs eager':>9} {'vs fp32':>8}")
    for name, times in per_call.items():
        vs_fp32 = f"{fp32_time / best[name]:.2f}x" if fp32_time else "-"
        print(f"{name:<32} {args.batch / best[name]:7.0f} {args.batch / statistics.median(times):7.0f} "
              f"{base / best[name]:8.2f}x {vs_fp32:>8}")


def plain_torchvision_runner(size: int, batch: int, threads: int) -> Callable[[], object]:
    """A plain torchvision ResNet-18 export (float NCHW in, logits out): the yardstick that tells
    whether our graph (uint8 input, preprocessing and L2 norm inside) costs anything extra."""
    import io
    import warnings

    import torchvision

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torchvision.models.resnet18().eval(), (torch.zeros(2, 3, size, size),), buffer,
                          dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}})
    session = runtime.make_session(buffer.getvalue(), "cpu", threads=threads, spin=True)
    feed = {"x": np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)}
    return lambda: session.run(None, feed)


def load_split(folder: Path, size: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images of a labelled folder as uint8 [N, S, S, 3] plus integer labels (cached)."""
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
    key = cache / f"pixels-{folder.name}-{tag}-{size}.npz"
    if key.exists():
        data = np.load(key)
        return data["images"], data["labels"]
    refs = scan_images(folder)
    sample = samples.folder_images(folder, size, limit=len(refs))
    classes = sorted({ref.label for ref in refs if ref.label is not None})
    labels = np.array([classes.index(rel.split("/")[0]) for rel in sample.relpaths], np.int64)
    np.savez(key, images=sample.images, labels=labels)
    return sample.images, labels


def index_overlap(ref_train: np.ndarray, ref_test: np.ndarray, var_train: np.ndarray,
                  var_test: np.ndarray, k: int = 10, chunk: int = 1000) -> float:
    """Mean share of each test query's top-k train neighbours that the variant keeps."""
    shared = 0
    for start in range(0, len(ref_test), chunk):
        a = np.argpartition(-(ref_test[start:start + chunk] @ ref_train.T), k, axis=1)[:, :k]
        b = np.argpartition(-(var_test[start:start + chunk] @ var_train.T), k, axis=1)[:, :k]
        shared += sum(len(np.intersect1d(x, y)) for x, y in zip(a, b))
    return shared / (k * len(ref_test))


def cmd_knn(args: argparse.Namespace) -> None:
    args.cache.mkdir(parents=True, exist_ok=True)
    source = load_source(args.checkpoint)
    size = int(source.props["moco.image_size"])
    train_x, train_y = load_split(args.train, size, args.cache)
    test_x, test_y = load_split(args.test, size, args.cache)
    calibration = train_x[samples.spread(len(train_x), args.calibration_count, offset=0.5)]
    fp32 = export_graph(source.model, size)
    check_idx = samples.spread(len(test_x), 512)
    sha = source.props["moco.checkpoint_sha256"][:12]
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in ["fp32", *[v for v in args.variants.split(",") if v != "fp32"]]:
        key = args.cache / f"feats-{sha}-{name}-{args.train.name}-{len(train_x)}-{len(test_x)}.npz"
        if key.exists():
            data = np.load(key)
            features[name] = (data["train"], data["test"])
            continue
        t0 = time.perf_counter()
        proto = build_variant(name, fp32, source.model, size, calibration)
        session = runtime.make_session(proto.SerializeToString(), "cpu")
        t1 = time.perf_counter()
        features[name] = (runtime.embed(session, train_x, 256), runtime.embed(session, test_x, 256))
        print(f"  {name}: built in {t1 - t0:.0f} s, embedded {len(train_x) + len(test_x)} images in "
              f"{time.perf_counter() - t1:.0f} s", file=sys.stderr)
        np.savez(key, train=features[name][0], test=features[name][1])
    if args.torch_check:
        ref = torch_embed(source.model, test_x[:256])
        print(f"fp32 ONNX vs PyTorch min cosine on 256 test images: "
              f"{verify.row_cosines(ref, features['fp32'][1][:256]).min():.6f}")
    ref_train, ref_test = features["fp32"]
    base = knn_top1(ref_train, train_y, ref_test, test_y, k=200, temperature=0.1)
    report = []
    print(f"kNN (k=200, T=0.1): train {len(train_x)} images from {args.train}, "
          f"test {len(test_x)} from {args.test}")
    print(f"{'variant':<14} {'top-1':>7} {'change':>8} {'top-10 overlap':>15} {'check overlap':>14} "
          f"{'mean cos':>9}")
    for name, (tr, te) in features.items():
        acc = knn_top1(tr, train_y, te, test_y, k=200, temperature=0.1)
        overlap = index_overlap(ref_train, ref_test, tr, te)
        check = verify.neighbour_overlap(ref_test[check_idx], te[check_idx])
        cosine = float(verify.row_cosines(ref_test, te).mean())
        report.append(dict(variant=name, top1=acc, change=acc - base, overlap=overlap, check=check,
                           cosine=cosine))
        print(f"{name:<14} {acc:7.4f} {100 * (acc - base):+7.2f}pt {overlap:15.3f} {check:14.3f} "
              f"{cosine:9.5f}")
    if args.json:
        print(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("speed", help="images/s: PyTorch eager vs ONNX Runtime variants")
    speed.add_argument("--size", type=int, default=64)
    speed.add_argument("--batch", type=int, default=64)
    speed.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    speed.add_argument("--seconds", type=float, default=2.0, help="timing per variant and round")
    speed.add_argument("--plain", action="store_true", help="also time a plain torchvision export")
    speed.add_argument("--variants", default=",".join(["fp32", "fp16", *INT8_VARIANTS]))
    knn = commands.add_parser("knn", help="kNN accuracy and neighbour overlap of each variant vs fp32")
    knn.add_argument("--checkpoint", type=Path, required=True)
    knn.add_argument("--train", type=Path, required=True)
    knn.add_argument("--test", type=Path, required=True)
    knn.add_argument("--variants", default="fp32,int8-qdq")
    knn.add_argument("--calibration-count", type=int, default=256)
    knn.add_argument("--cache", type=Path, default=Path("/tmp/export-bench-cache"))
    knn.add_argument("--torch-check", action="store_true", help="also compare fp32 ONNX with PyTorch")
    knn.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    {"speed": cmd_speed, "knn": cmd_knn}[args.command](args)


if __name__ == "__main__":
    main()
