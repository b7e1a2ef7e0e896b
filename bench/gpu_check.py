"""One-shot GPU check (issue 18): what this project does on the GPU machine it is given, in minutes.

    bash bench/gpu_check.sh                 # on a machine with a GPU: about 5-7 minutes
    python bench/gpu_check.py --device cpu --quick    # the same sections as a smoke test on a CPU

Prints, each section on its own and never stopping the others (a section that cannot run says
SKIP and why, one that breaks says FAIL and why):
  1. the machine: GPUs, PyTorch / CUDA, ONNX Runtime providers, FAISS and its GPUs;
  2. trainer model-only images/s (MoCo step on ready tensors, bf16 autocast, channels-last):
     ResNet-18 at 128 px and ResNet-50 at 224 px;
  3. trainer end to end: `python -m moco train` on generated pictures (batched augmentation on
     the GPU, bf16, channels-last), steady-state images/s from its metrics file;
  4. a 2-GPU torchrun smoke run when two GPUs exist;
  5. ONNX Runtime CUDA embedding images/s of a model exported by `python -m exports`;
  6. FAISS GPU search over 1M vectors when FAISS with GPU support is importable.
Targets (one H200): ResNet-18@128 at least 2,500 img/s and ResNet-50@224 at least 1,500 img/s end
to end. Nothing is downloaded: the pictures are generated, the networks start from random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def section(title: str, body: Callable[[], None]) -> None:
    print(f"\n== {title}", flush=True)
    began = time.monotonic()
    try:
        body()
    except Skip as reason:
        print(f"SKIP: {reason}", flush=True)
    except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
        print(f"FAIL: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=3)
    print(f"({time.monotonic() - began:.0f} s)", flush=True)


class Skip(Exception):
    """A section that cannot run on this machine, with the reason."""


def machine(device: str) -> None:
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
    try:
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())}")
    except ImportError:
        print("onnxruntime: not installed")
    try:
        import faiss

        print(f"faiss {faiss.__version__}: {faiss.get_num_gpus()} GPU(s)")
    except ImportError:
        print("faiss: not installed")
    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device: the GPU sections below will skip")


def model_only(device: str, quick: bool) -> None:
    import torch

    from bench.precision_speed import build, timed_steps

    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    shapes = [("resnet18", 128, 256), ("resnet50", 224, 128)]
    if quick:
        shapes = [("resnet18", 32, 16)]
    for arch, size, batch in shapes:
        model, optimizer = build("bf16", arch, size, batch, torch.device(device))
        x1 = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        x2 = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        timed_steps(model, optimizer, x1, x2, 2 if quick else 5)  # warm-up: cuDNN autotuning, allocator
        seconds = timed_steps(model, optimizer, x1, x2, 2 if quick else 20)
        print(f"model only  {arch} @ {size} px, batch {batch}, bf16, channels-last: {batch / seconds:,.0f} img/s",
              flush=True)


def make_pictures(folder: Path, count: int, size: int) -> Path:
    """`count` generated JPEGs in 4 class folders: shapes on noise, distinct per image."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for i in range(count):
        target = folder / f"class{i % 4}" / f"img{i:05d}.jpg"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 90, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        x, y = rng.integers(0, size // 2, 2)
        colour = tuple(rng.integers(60, 255, 3).tolist())
        draw.ellipse([int(x), int(y), int(x) + size // 2, int(y) + size // 3], fill=colour)
        img.save(target, quality=90)
    return folder


def run_quietly(command: list[str], timeout: float) -> None:
    """Run a project command; on failure, raise with the last line it printed (its progress bars
    and logs stay out of the report otherwise)."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"{' '.join(command[1:4])} exited {done.returncode}: {lines[-1][-300:]}")


def steady_rate(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r["img_per_s"] for r in records if r.get("kind") == "epoch"]
    return float(np.median(epochs[1:] or epochs))


def end_to_end(work: Path, device: str, quick: bool) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    shapes = [("resnet18", 128, 256, 4096), ("resnet50", 224, 128, 2048)]
    if quick:
        shapes = [("resnet18", 32, 16, 64)]
    for arch, size, batch, images in shapes:
        data = make_pictures(work / f"pictures-{size}", images, max(size + size // 4, 40))
        run = work / f"run-{arch}-{size}"
        shutil.rmtree(run, ignore_errors=True)
        command = [sys.executable, "-m", "moco", "train", str(data), "--out", str(run), "--arch", arch,
                   "--image-size", str(size), "--batch-size", str(batch), "--epochs", "2" if quick else "4",
                   "--device", device, "--precision", "bf16" if device == "cuda" else "fp32",
                   "--workers", str(min(8, os.cpu_count() or 1))]
        began = time.monotonic()
        run_quietly(command, timeout=240)
        print(f"end to end  {arch} @ {size} px, batch {batch}: {steady_rate(run):,.0f} img/s steady "
              f"(whole process {time.monotonic() - began:.0f} s for {images} images x epochs)", flush=True)


def torchrun_smoke(work: Path, device: str) -> None:
    import torch

    if device != "cuda" or torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count() if device == 'cuda' else 0} GPU(s): needs 2")
    data = make_pictures(work / "pictures-64", 1024, 80)
    run = work / "run-ddp"
    shutil.rmtree(run, ignore_errors=True)
    run_quietly(["torchrun", "--nproc_per_node", "2", "-m", "moco", "train", str(data), "--out", str(run),
                 "--image-size", "64", "--batch-size", "128", "--epochs", "2", "--device", "cuda"], timeout=180)
    print(f"torchrun 2 GPUs: finished, {steady_rate(run):,.0f} img/s per process steady")


def onnx_embedding(work: Path, device: str, quick: bool) -> None:
    import onnxruntime

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        raise Skip(f"ONNX Runtime has no {provider}")
    runs = sorted(work.glob("run-resnet18-*"))
    if not runs:
        raise Skip("no trained run to export (the end-to-end section did not finish)")
    model = work / "resnet18.onnx"
    run_quietly([sys.executable, "-m", "exports", str(runs[0]), "-o", str(model)], timeout=180)
    session = onnxruntime.InferenceSession(str(model), providers=[provider])
    meta = session.get_modelmeta().custom_metadata_map
    size = int(meta["moco.image_size"])
    batch = 16 if quick else 256
    images = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: images})
    rounds = 2 if quick else 20
    began = time.perf_counter()
    for _ in range(rounds):
        session.run(None, {name: images})
    print(f"ONNX Runtime {provider}: {batch * rounds / (time.perf_counter() - began):,.0f} img/s at {size} px "
          f"(batch {batch}, model only)", flush=True)


def faiss_gpu(quick: bool) -> None:
    try:
        import faiss
    except ImportError as exc:
        raise Skip("FAISS is not importable here") from exc
    if faiss.get_num_gpus() < 1:
        raise Skip("FAISS has no GPU support or sees no GPU")
    n, d, queries = (20_000, 128, 1_000) if quick else (1_000_000, 128, 10_000)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d), dtype=np.float32)
    faiss.normalize_L2(base)
    index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))
    index.add(base)
    q = base[:queries] + 0.01 * rng.standard_normal((queries, d), dtype=np.float32)
    index.search(q[:100], 10)
    began = time.perf_counter()
    index.search(q, 10)
    print(f"FAISS GPU flat search: {queries / (time.perf_counter() - began):,.0f} queries/s over {n:,} x {d}, k 10")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of the script")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: device {args.device}{', quick' if args.quick else ''}; scratch {work}")
    section("machine", lambda: machine(args.device))
    section("trainer, model only", lambda: model_only(args.device, args.quick))
    section("trainer, end to end", lambda: end_to_end(work, args.device, args.quick))
    section("torchrun, 2 GPUs", lambda: torchrun_smoke(work, args.device))
    section("ONNX Runtime embedding", lambda: onnx_embedding(work, args.device, args.quick))
    section("FAISS GPU search", lambda: faiss_gpu(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
