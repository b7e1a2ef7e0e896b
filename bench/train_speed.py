"""Training throughput: our trainer against a reference loop written as the original MoCo code runs.

Three figures on the same images, in one script run (the last two once per precision):
  reference   PIL decode + per-image torchvision augmentation in DataLoader workers, fp32 NCHW,
              plain BN, momentum update as a Python loop over parameters (facebookresearch/moco
              main_moco.py + builder.py, single process)
  ours        `python -m moco train` end to end, as a user runs it (defaults: decoded-image cache,
              batched augmentation on the device, channels-last, split-BN, fused momentum update)
  model-only  our MoCo step (same model, batch and memory format) fed with ready tensors: the
              ceiling the data pipeline can at best reach
Rates are images/s in steady state (epochs after the first); whole-process wall time for the
same number of epochs, start-up, cache fill and checkpoints included, is printed too. Where the
machine computes bf16 natively (CUDA, or a CPU with AMX / AVX-512-BF16) ours and model-only run in
fp32 and in bf16 (`--precision`), and the issue-18 ratios are printed: bf16 end to end against the
fp32 model-only rate (what the original code can at best reach) and against the bf16 ceiling.

    python bench/train_speed.py /tmp/data/flowers/train --image-size 64 --batch-size 128 --epochs 8 --model-steps 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from torchvision import models, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from bench.train_step_variants import images_per_second  # noqa: E402
from moco.precision import cpu_has_fast_bf16, cuda_has_fast_bf16  # noqa: E402


# -- the reference: the original code's structure, single process ------------------------------
class PILBlur:
    def __init__(self, sigma=(0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class FolderTwoCrops(torch.utils.data.Dataset):
    def __init__(self, root: Path, size: int) -> None:
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([PILBlur()], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as handle:
            image = Image.open(handle).convert("RGB")
        return self.transform(image), self.transform(image)


class ReferenceMoCo(nn.Module):
    def __init__(self, dim: int = 128, K: int = 4096, m: float = 0.999, T: float = 0.2) -> None:
        super().__init__()
        self.K, self.m, self.T = K, m, T

        def encoder() -> nn.Module:
            net = models.resnet18(num_classes=dim)
            width = net.fc.weight.shape[1]
            net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), net.fc)
            return net

        self.encoder_q, self.encoder_k = encoder(), encoder()
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.data.copy_(q.data)
            k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        ptr = int(self.queue_ptr)
        n = k.shape[0]
        idx = (ptr + torch.arange(n)) % self.K
        self.queue[:, idx] = k.T
        self.queue_ptr[0] = (ptr + n) % self.K
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))


def reference_run(root: Path, size: int, batch: int, epochs: int, workers: int) -> tuple[list[float], float]:
    start = time.monotonic()
    torch.manual_seed(0)
    data = FolderTwoCrops(root, size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    model = ReferenceMoCo(K=max(batch, (len(data) - batch) // batch * batch))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03 * batch / 256, momentum=0.9,
                                weight_decay=1e-4)
    rates = []
    for _ in range(epochs):
        t0, seen = time.monotonic(), 0
        for im_q, im_k in loader:
            loss = model(im_q, im_k)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += im_q.shape[0]
        rates.append(seen / (time.monotonic() - t0))
        with tempfile.TemporaryDirectory() as tmp:  # the original saves a checkpoint every epoch
            torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / "c.pt")
    return rates, time.monotonic() - start


# -- ours --------------------------------------------------------------------------------------
def ours_run(root: Path, size: int, batch: int, epochs: int, workers: int,
             precision: str) -> tuple[list[float], float]:
    out = Path(tempfile.mkdtemp(prefix="moco-speed-"))
    cache = Path(tempfile.mkdtemp(prefix="moco-speed-cache-"))
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "moco", "train", str(root), "--out", str(out / "run"), "--image-size",
                    str(size), "--batch-size", str(batch), "--epochs", str(epochs), "--workers", str(workers),
                    "--cache-dir", str(cache), "--precision", precision],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in records if r["kind"] == "epoch"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return rates, wall


def model_only(size: int, batch: int, steps: int, precision: str) -> float:
    """Our step on ready tensors, in the trainer's default format (channels-last, split-BN 8)."""
    return images_per_second(size, batch, channels_last=True, splits=8, steps=steps, precision=precision)


def default_precisions() -> str:
    """bf16 is worth timing only where the hardware computes it natively (moco.precision)."""
    if torch.cuda.is_available():
        return "fp32,bf16" if cuda_has_fast_bf16(torch.device("cuda")) else "fp32"
    return "fp32,bf16" if cpu_has_fast_bf16() else "fp32"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ref-workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--workers", type=int, default=1, help="--workers for our trainer")
    parser.add_argument("--model-steps", type=int, default=8)
    parser.add_argument("--precisions", default=default_precisions(),
                        help="comma-separated, of fp32 and bf16 (default: bf16 too where it is native here)")
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        parser.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    print(f"{cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs", flush=True)
    results = {}
    rates, wall = reference_run(args.data_dir, args.image_size, args.batch_size, args.epochs, args.ref_workers)
    results["reference"] = {"img_per_s": sum(rates[1:]) / len(rates[1:]), "wall_s": wall, "epochs": rates}
    print(f"reference: {results['reference']['img_per_s']:.1f} img/s steady, {wall:.0f} s for {args.epochs} epochs",
          flush=True)
    for precision in precisions:
        rates, wall = ours_run(args.data_dir, args.image_size, args.batch_size, args.epochs, args.workers, precision)
        ours = results[f"ours_{precision}"] = {"img_per_s": sum(rates[1:]) / len(rates[1:]), "wall_s": wall,
                                               "epochs": rates}
        print(f"ours {precision}: {ours['img_per_s']:.1f} img/s steady, {wall:.0f} s for {args.epochs} epochs",
              flush=True)
        ceiling = results[f"model_only_{precision}"] = {
            "img_per_s": model_only(args.image_size, args.batch_size, args.model_steps, precision)}
        print(f"model-only {precision}: {ceiling['img_per_s']:.1f} img/s", flush=True)
    ref = results["reference"]["img_per_s"]
    fp32_ceiling = results.get("model_only_fp32", {}).get("img_per_s")
    for precision in precisions:
        ours, ceiling = results[f"ours_{precision}"]["img_per_s"], results[f"model_only_{precision}"]["img_per_s"]
        line = (f"{precision}: ours / reference = {ours / ref:.2f}x; ours / its model-only = {ours / ceiling:.0%} "
                f"(target >= 90%)")
        if precision == "bf16" and fp32_ceiling:
            line += f"; ours / fp32 model-only = {ours / fp32_ceiling:.2f}x (target >= 1.6x)"
        print(line + f"; whole process {results[f'ours_{precision}']['wall_s']:.0f} s "
                     f"(reference {results['reference']['wall_s']:.0f} s)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
