"""The training loop: read it top to bottom.

`Trainer.run()` is one loop over epochs and batches. Everything a resumed run needs to continue
exactly is in the checkpoint; schedules are pure functions of the global step, so extending a
run only changes the total they are computed over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from indexer.images import working_size
from moco import distributed
from moco.augment import TwoViews, normalize_on_device
from moco.backbones import WIDTHS
from moco.batch_augment import BatchTwoViews
from moco.cache import CacheUnavailable, DecodedCache, open_cache
from moco.checkpoint import CHECKPOINT_NAME, atomic_write_bytes, save_checkpoint
from moco.config import TrainConfig
from moco.data import (
    EpochBatches,
    ImageFolder,
    RawImages,
    TrainImages,
    collate_padded,
    collate_skipping_failures,
    make_loader,
    sample_seed,
)
from moco.evaluate import KnnMonitor
from moco.model import MoCo
from moco.optim import build_optimizer, lr_at, momentum_at

METRICS_NAME = "metrics.jsonl"


class TrainingStopped(Exception):
    """Raised after a clean stop (signal): the checkpoint is written, the run can resume."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum = signum


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """CUDA when present (the GPU of this process's LOCAL_RANK under torchrun), else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def listing_digest(folder: ImageFolder) -> str:
    """Fingerprint of the file list, to tell a resumed run whether its data changed."""
    digest = hashlib.sha256()
    for ref in folder.refs:
        digest.update(ref.relpath.encode() + b"\0")
    return digest.hexdigest()


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps done in all
    elapsed: float = 0.0  # training wall seconds, summed over resumed sessions
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch records
    skipped: dict[str, str] = field(default_factory=dict)  # relpath -> reason


class MetricsLog:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when available."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / METRICS_NAME
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def _truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint: they will be redone."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        text = "".join(line + "\n" for line in kept).encode()
        atomic_write_bytes(self.path, lambda handle: handle.write(text))

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint at the end of the current step; a second SIGINT
    aborts at once (the last checkpoint stays intact)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                   "(Ctrl-C again to abort without saving)")

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    def __init__(self, config: TrainConfig, folder: ImageFolder, run_dir: Path, *, device: torch.device,
                 val: ImageFolder | None = None, state: dict[str, Any] | None = None,
                 world: distributed.World = distributed.World()) -> None:
        self.config, self.folder, self.run_dir, self.device = config, folder, run_dir, device
        self.val = val
        self.world = world
        config.embedding_dim = WIDTHS[config.arch]
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)

        self.model = MoCo(config).to(device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # DDP averages the query encoder's gradients over ranks; the key encoder, queue and
        # shuffle-BN are handled inside MoCo with explicit collectives (moco.distributed). The
        # queue is identical on every rank by construction, so buffers are not re-broadcast
        # each step (that would send the whole 65536 x 128 queue from rank 0 every time).
        self.forward = self.model
        if world.enabled:
            self.forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                   else None, broadcast_buffers=False)
        if config.compile:
            # Compiles the step's forward; self.model keeps plain state-dict keys for checkpoints.
            self.forward = torch.compile(self.forward)
        self.optimizer = build_optimizer(self.model, config)
        self.progress = Progress()
        self.pending: list[torch.Tensor] = []  # losses of steps not yet brought to the host
        self.sampler = EpochBatches(range(len(folder.refs)), config.batch_size, config.seed, rank=world.rank,
                                    world_size=world.size)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        self.total_steps = config.epochs * self.steps_per_epoch
        if state is not None:
            self._restore(state)
        self.cache = self._open_cache() if config.cache else None
        self.sampler.exclude({i for i, r in enumerate(folder.refs) if r.relpath in self.progress.skipped})
        if config.augment_on == "device":
            # Pixels to the device, augmented there in a few batched ops. Reading the cache is a
            # memory copy, so worker processes would only take cores from the model.
            self.batch_views = BatchTwoViews(config.augment, config.image_size, config.crop_min_scale)
            dataset = RawImages(folder.refs, config.image_size, self.cache)
            workers, collate = (0 if self.cache is not None else config.workers), collate_padded
        else:
            transform = TwoViews(config.augment, config.image_size, config.crop_min_scale)
            dataset = TrainImages(folder.refs, transform, config.image_size, self.cache)
            workers, collate = config.workers, collate_skipping_failures
        self.loader = make_loader(dataset, workers=workers, batch_sampler=self.sampler, collate=collate,
                                  pin_memory=device.type == "cuda")
        self.monitor = None
        if val is not None:
            self.monitor = KnnMonitor(folder, val, image_size=config.image_size, mean=config.mean,
                                      std=config.std, device=device, workers=config.workers,
                                      k=config.knn_k, temperature=config.knn_t)
        self.mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
        self.metrics = MetricsLog(run_dir, resume_step=self.progress.step if state is not None else None) \
            if world.is_main else None

    def _open_cache(self) -> DecodedCache | None:
        config = self.config
        try:
            cache = open_cache(self.folder.root, self.folder.refs, working_size(config.image_size),
                               cache_dir=Path(config.cache_dir) if config.cache_dir else None,
                               max_bytes=int(config.cache_max_gb * 2**30), workers=os.cpu_count() or 1)
        except CacheUnavailable as err:
            tqdm.write(f"note: {err}; streaming from the image files instead (see --cache-max-gb, --cache-dir)")
            return None
        for index, reason in cache.failed().items():
            self._skip(self.folder.refs[index].relpath, reason)
        return cache

    # -- checkpoints -------------------------------------------------------------------------
    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        p = state["progress"]
        self.progress = Progress(epoch=p["epoch"], batch_in_epoch=p["batch_in_epoch"], step=p["step"],
                                 elapsed=p["elapsed"], history=p["history"], skipped=p["skipped"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if state["data"]["listing_sha256"] != listing_digest(self.folder):
            tqdm.write("warning: the data folder changed since the checkpoint; resuming on its current "
                       "contents (the run will not match an uninterrupted one exactly)")

    def save(self) -> None:
        if not self.world.is_main:  # one writer: rank 0 holds the same state as every rank
            return
        state = {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "progress": vars(self.progress),
            "plan": {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                     "epochs": self.config.epochs},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "data": {"root": str(self.folder.root.resolve()),
                     "val": str(self.val.root.resolve()) if self.val else None,
                     "num_images": len(self.folder.refs),
                     "listing_sha256": listing_digest(self.folder)},
        }
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, state)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Progress:
        config, progress = self.config, self.progress
        self._mark = last_checkpoint = time.monotonic()
        with StopFlag() as stop:
            while progress.epoch < config.epochs:
                self.sampler.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
                bar = tqdm(total=self.steps_per_epoch, initial=progress.batch_in_epoch,
                           desc=f"epoch {progress.epoch + 1}/{config.epochs}", unit="step",
                           dynamic_ncols=True, disable=not self.world.is_main)
                losses: list[float] = []
                waited = computed = 0.0
                images_seen = 0
                tick = time.monotonic()
                for batch, failures in self.loader:
                    fetched = time.monotonic()
                    waited += fetched - tick
                    self._record_failures(failures)
                    stepped = batch is not None and batch[0].shape[0] >= 2
                    if stepped:
                        self._step(batch)
                        images_seen += batch[0].shape[0] * self.world.size
                        # The GPU runs ahead; losses are fetched only when they are shown or logged.
                        if self.device.type == "cpu" or progress.step % config.log_every == 0:
                            losses.extend(self._fetch_losses())
                    progress.batch_in_epoch += 1
                    tick = time.monotonic()
                    computed += tick - fetched
                    rate = images_seen / max(1e-9, waited + computed)
                    wait_share = waited / max(1e-9, waited + computed)
                    if stepped and progress.step % config.log_every == 0:
                        self._log_step(losses[-1], rate, wait_share)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-", lr=f"{self._lr():.3g}",
                                    img_s=f"{rate:.0f}", wait=f"{wait_share:.0%}")
                    bar.update(1)
                    if distributed.any_rank(stop.signum is not None, self.device):  # all ranks stop together
                        bar.close()
                        losses.extend(self._fetch_losses())
                        self._checkpoint()
                        raise TrainingStopped(stop.signum, progress.step)
                    if time.monotonic() - last_checkpoint > config.checkpoint_every * 60:
                        losses.extend(self._fetch_losses())  # never checkpoint a diverged model
                        self._checkpoint()
                        last_checkpoint = time.monotonic()
                bar.close()
                losses.extend(self._fetch_losses())
                self._end_epoch(losses, images_seen, waited, computed)
                last_checkpoint = time.monotonic()
        if self.metrics is not None:
            self.metrics.close()
        return progress

    def _account_time(self) -> None:
        now = time.monotonic()
        self.progress.elapsed += now - self._mark
        self._mark = now

    def _lr(self) -> float:
        config = self.config
        return lr_at(self.progress.step, self.total_steps, warmup_steps=round(config.warmup_epochs
                     * self.steps_per_epoch), base=config.effective_lr, schedule=config.lr_schedule)

    def _views(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.augment_on == "device":
            images, sizes, _ = batch
            p = self.progress
            # One generator per batch, seeded by its place in the run: exact on resume.
            position = p.batch_in_epoch * self.world.size + self.world.rank
            generator = torch.Generator().manual_seed(sample_seed(self.config.seed, p.epoch, position))
            return self.batch_views(images.to(self.device, non_blocking=True), sizes, generator)
        view1, view2, _ = batch
        return view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True)

    def _fetch_losses(self) -> list[float]:
        """Bring the pending losses to the host (the one synchronisation) and stop on NaN/inf."""
        if not self.pending:
            return []
        values = distributed.mean_over_ranks(torch.stack(self.pending).float()).tolist()
        first_step = self.progress.step - len(values) + 1
        self.pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDiverged(f"the loss became {value} at step {first_step + offset}; stopped, and the "
                                       "last good checkpoint was kept (try a lower --lr)")
        return values

    def _step(self, batch) -> None:
        lr = self.last_lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        m = momentum_at(self.progress.step, self.total_steps, self.config.moco_m, self.config.moco_m_cos)
        cl = self.config.channels_last
        view1, view2 = self._views(batch)
        x1 = normalize_on_device(view1, self.mean, self.std, cl)
        x2 = normalize_on_device(view2, self.mean, self.std, cl)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.forward(x1, x2, m)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.progress.step += 1
        self.pending.append(loss.detach())

    def _skip(self, relpath: str, reason: str) -> bool:
        if relpath in self.progress.skipped:
            return False
        self.progress.skipped[relpath] = reason
        if self.world.is_main:
            tqdm.write(f"skipped {relpath}: {reason}")
        return True

    def _record_failures(self, failures) -> None:
        if self.world.enabled and self.cache is None:
            # Streaming: a file fails on one rank only; all ranks must drop it alike so their
            # epoch permutations stay the same. (With the cache every rank knows them at start.)
            failures = distributed.gather_objects(list(failures))
        new = {failure.index for failure in failures if self._skip(failure.relpath, failure.reason)}
        if new:
            self.sampler.exclude(new)

    def _log_step(self, loss: float, rate: float, wait_share: float) -> None:
        p = self.progress
        if self.metrics is None:
            return
        self.metrics.write({"kind": "step", "step": p.step, "epoch": p.epoch, "loss": loss, "lr": self.last_lr,
                            "moco_m": momentum_at(p.step - 1, self.total_steps, self.config.moco_m,
                                                  self.config.moco_m_cos),
                            "img_per_s": rate, "data_wait": wait_share,
                            "time": p.elapsed + time.monotonic() - self._mark})

    def _checkpoint(self) -> None:
        self._account_time()
        self.save()

    def _end_epoch(self, losses: list[float], images: int, waited: float, computed: float) -> None:
        p = self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        record = {"kind": "epoch", "step": p.step, "epoch": p.epoch,
                  "loss": float(np.mean(losses)) if losses else float("nan"),
                  "img_per_s": images / max(1e-9, waited + computed),
                  "data_wait": waited / max(1e-9, waited + computed)}
        if self.monitor is not None and (p.epoch % self.config.eval_every == 0 or p.epoch == self.config.epochs):
            if self.world.is_main:
                record["knn_top1"] = self.monitor(self.model.encoder_q.backbone)
            distributed.barrier()
        self._account_time()
        record["time"] = p.elapsed
        p.history.append(record)
        if self.world.is_main:
            self.metrics.write(record)
            knn = f", kNN top-1 {record['knn_top1']:.4f}" if "knn_top1" in record else ""
            tqdm.write(f"epoch {p.epoch}: loss {record['loss']:.4f}, {record['img_per_s']:.1f} img/s, "
                       f"data wait {record['data_wait']:.0%}{knn}")
        self.save()
