"""The training loop: read it top to bottom.

`Trainer.run()` is one loop over epochs and batches, until the plan's last step: `--epochs`
runs know it from the start; `--time-budget` runs time a few steps first, then plan how many
fit (`moco.budget`). Everything a resumed run needs to continue exactly is in the checkpoint,
the plan included; schedules are pure functions of the global step, so extending a run only
changes the total they are computed over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
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
from moco.budget import (
    EXTEND_UNTIL_FRACTION,
    FINISH_S,
    MEASURE_GIVE_UP_FRACTION,
    MEASURE_MIN_STEPS,
    MEASURE_SKIP_STEPS,
    MEASURE_SKIP_STEPS_COMPILED,
    RECHECK_WINDOW_FRACTION,
    RECHECK_WINDOW_MIN_S,
    TRUST_RECENT_WINDOWS,
    Plan,
    estimate_checkpoint_seconds,
    format_duration,
    margin_seconds,
    measure_seconds,
    periodic_checkpoints,
    plan_monitor_evals,
    plan_steps,
    recheck_tolerance,
)
from moco.cache import CacheUnavailable, DecodedCache, open_cache
from moco.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    capture_rng_state,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    set_aside,
)
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
from moco.defaults import fit_to_plan
from moco.evaluate import KnnMonitor
from moco.model import MoCo
from moco.optim import build_optimizer, lr_at, momentum_at
from moco.plot import PLOT_NAME, write_monitor_plot

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"


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

            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_NAME))
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
                 world: distributed.World = distributed.World(), explicit: Collection[str] = (),
                 started: float | None = None) -> None:
        """`explicit`: the config values the user set (budget-aware defaults leave them alone);
        `started`: time.monotonic() at process start, from which a time budget counts."""
        self.config, self.folder, self.run_dir, self.device = config, folder, run_dir, device
        self.val = val
        self.world = world
        self.explicit = frozenset(explicit)
        self.started = time.monotonic() if started is None else started
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
        stored_plan = (state or {}).get("plan") or {}
        if stored_plan.get("mode") == "budget":
            self.plan = Plan.from_dict(stored_plan, self.steps_per_epoch)  # resume keeps to its plan
            self.explicit = frozenset(self.plan.explicit)  # what the first session was told
        elif config.time_budget is not None:
            self.plan = Plan.for_budget(config.time_budget, self.steps_per_epoch)
            self.plan.explicit = sorted(self.explicit)
        else:
            self.plan = Plan.for_epochs(config.epochs, self.steps_per_epoch)
        if state is not None:
            self._restore(state)
        # Only the session that makes a budget plan keeps it to the budget (the safety net); a
        # resumed one finishes the stored plan.
        self.planning_session = not self.plan.planned
        self._overhead = 0.0  # seconds spent on evaluations and checkpoints, left out of the pace
        self._stamps: list[tuple[int, float]] = []  # (step, busy seconds) while timing steps
        self._pace: deque[tuple[int, float]] = deque()  # (step, busy seconds) at the safety net's checks
        self._planned_pace: tuple[int, float] = (0, 0.0)  # (step, busy seconds) where the timing began
        self._checkpoint_s: float | None = None  # the last checkpoint's write time
        self._plot_failed = False
        self.cache = self._open_cache() if config.cache else None
        self.sampler.exclude({i for i, r in enumerate(folder.refs) if r.relpath in self.progress.skipped})
        if config.augment_on == "device":
            # Pixels to the device, augmented there in a few batched ops. Reading the cache is a
            # memory copy, so worker processes would only take cores from the model.
            self.batch_views = BatchTwoViews(config.augment, config.image_size, config.crop_min_scale,
                                             blur_relative=config.blur_relative)
            dataset = RawImages(folder.refs, config.image_size, self.cache)
            workers, collate = (0 if self.cache is not None else config.workers), collate_padded
        else:
            transform = TwoViews(config.augment, config.image_size, config.crop_min_scale,
                                 blur_relative=config.blur_relative)
            dataset = TrainImages(folder.refs, transform, config.image_size, self.cache)
            workers, collate = config.workers, collate_skipping_failures
        self.loader = make_loader(dataset, workers=workers, batch_sampler=self.sampler, collate=collate,
                                  pin_memory=device.type == "cuda")
        self.monitor = None
        if val is not None:
            self.monitor = KnnMonitor(folder, val, image_size=config.image_size, mean=config.mean,
                                      std=config.std, device=device, workers=config.workers,
                                      k=config.knn_k, temperature=config.knn_t,
                                      max_images=config.knn_max_images, seed=config.seed,
                                      channels_last=config.channels_last)
            if self.monitor.capped and world.is_main:
                tqdm.write(f"kNN monitor: {self.monitor.describe()} (--knn-max-images "
                           f"{config.knn_max_images}; 0 uses all)")
        self.mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
        if world.is_main:
            self._tidy_run_dir(resuming=state is not None)
        self.metrics = MetricsLog(run_dir, resume_step=self.progress.step if state is not None else None) \
            if world.is_main else None

    def _tidy_run_dir(self, *, resuming: bool) -> None:
        """Clear what a killed session left: temp files of interrupted writes and, before a fresh
        run, the records of an attempt killed before its first checkpoint (moved aside to NAME.N,
        so the new metrics.jsonl holds this run only; a folder with a checkpoint is refused
        earlier unless resumed)."""
        run_files = (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME)
        for path in remove_stale_temp_files(self.run_dir, run_files):
            tqdm.write(f"removed {path.name}, left by an interrupted write")
        if not resuming:
            for old, new in set_aside(self.run_dir, (METRICS_NAME, PLOT_NAME, TENSORBOARD_NAME)):
                tqdm.write(f"note: {old.name} of an earlier attempt without a checkpoint moved aside to {new.name}")

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
        weights = dict(state["model"])
        # Checkpoints from before the queue counted its real keys: theirs is full (random start).
        weights.setdefault("queue_filled", torch.tensor(self.model.queue.shape[1]))
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        p = state["progress"]
        self.progress = Progress(epoch=p["epoch"], batch_in_epoch=p["batch_in_epoch"], step=p["step"],
                                 elapsed=p["elapsed"], history=p["history"], skipped=p["skipped"])
        restore_rng_state(state["rng"], self.device)
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
            "plan": self.plan.to_dict(),
            "rng": capture_rng_state(self.device),
            "data": {"root": str(self.folder.root.resolve()),
                     "val": str(self.val.root.resolve()) if self.val else None,
                     "num_images": len(self.folder.refs),
                     "listing_sha256": listing_digest(self.folder)},
        }
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, state)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Progress:
        config, progress = self.config, self.progress
        self._mark = self.started  # the first session's time counts from process start
        self._loop_start = time.monotonic()
        if config.time_budget is not None:
            self.deadline = self.started + config.time_budget - progress.elapsed
        last_checkpoint = time.monotonic()
        with StopFlag() as stop:
            while not self._done():
                self.sampler.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
                epoch_batches = self.sampler.batches_per_epoch()
                bar = tqdm(total=epoch_batches, initial=progress.batch_in_epoch, desc=self._epoch_label(),
                           unit="step", dynamic_ncols=True, disable=not self.world.is_main)
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
                        # The GPU runs ahead; losses are fetched only when they are shown or logged
                        # (and while steps are being timed, so the clock sees them finish).
                        if (self.device.type == "cpu" or not self.plan.planned
                                or progress.step % config.log_every == 0):
                            losses.extend(self._fetch_losses())
                    progress.batch_in_epoch += 1
                    computed += time.monotonic() - fetched
                    rate = images_seen / max(1e-9, waited + computed)
                    wait_share = waited / max(1e-9, waited + computed)
                    if stepped and progress.step % config.log_every == 0:
                        self._log_step(losses[-1], rate, wait_share)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-", lr=f"{self._lr():.3g}",
                                    img_s=f"{rate:.0f}", wait=f"{wait_share:.0%}")
                    bar.update(1)
                    if stepped and not self.plan.planned:
                        step_s = self._time_steps()
                        if step_s is not None:
                            self._make_plan(step_s)
                            bar.set_description(self._epoch_label())
                            last_checkpoint = time.monotonic()
                    elif stepped and self.planning_session and progress.step % config.log_every == 0:
                        self._recheck()
                    if stepped and self.plan.eval_due(progress.step):
                        self._evaluate()
                    # All ranks stop, and checkpoint, at the same step.
                    stopping, checkpoint_due = distributed.any_ranks(
                        stop.signum is not None, time.monotonic() - last_checkpoint > config.checkpoint_every * 60,
                        device=self.device)
                    if stopping:
                        bar.close()
                        losses.extend(self._fetch_losses())
                        self._checkpoint()
                        raise TrainingStopped(stop.signum, progress.step)
                    if checkpoint_due:
                        losses.extend(self._fetch_losses())  # never checkpoint a diverged model
                        self._checkpoint()
                        last_checkpoint = time.monotonic()
                    if self._done():
                        break
                    tick = time.monotonic()
                bar.close()
                losses.extend(self._fetch_losses())
                if progress.batch_in_epoch >= epoch_batches:
                    self._end_epoch(losses, images_seen, waited, computed)
                    if self.plan.mode == "epochs":
                        last_checkpoint = time.monotonic()
            self._finish()
        if self.metrics is not None:
            self.metrics.close()
        return progress

    def _done(self) -> bool:
        if self.plan.mode == "epochs":
            return self.progress.epoch >= self.config.epochs
        return self.plan.planned and self.progress.step >= self.plan.total_steps

    def _epoch_label(self) -> str:
        if not self.plan.planned:
            return f"epoch {self.progress.epoch + 1} (timing steps)"
        return f"epoch {self.progress.epoch + 1}/{self.plan.epochs}"

    def _account_time(self) -> None:
        now = time.monotonic()
        self.progress.elapsed += now - self._mark
        self._mark = now

    def _now(self) -> float:
        """Seconds since the run started, summed over resumed sessions."""
        return self.progress.elapsed + time.monotonic() - self._mark

    # -- schedules -----------------------------------------------------------------------------
    def _lr(self, step: int | None = None) -> float:
        """The plan's schedule at `step`; 0 while a budget run is still timing its first steps."""
        config, plan = self.config, self.plan
        if not plan.planned:
            return 0.0
        step = self.progress.step if step is None else step
        return lr_at(plan.schedule_step(step), plan.schedule_steps,
                     warmup_steps=round(config.warmup_epochs * self.steps_per_epoch), base=config.effective_lr,
                     schedule=config.lr_schedule)

    def _momentum(self, step: int) -> float:
        plan = self.plan
        return momentum_at(plan.schedule_step(step), plan.schedule_steps, self.config.moco_m, self.config.moco_m_cos)

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
        m = self._momentum(self.progress.step)
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
                            "moco_m": self._momentum(p.step - 1), "img_per_s": rate, "data_wait": wait_share,
                            "time": self._now()})

    def _checkpoint(self) -> None:
        began = time.monotonic()
        self._account_time()
        self.save()
        self._checkpoint_s = time.monotonic() - began
        self._overhead += self._checkpoint_s

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self) -> float | None:
        """A kNN monitor evaluation now: a record in metrics.jsonl and the plot redrawn."""
        began = time.monotonic()
        p = self.progress
        record: dict[str, Any] = {"kind": "eval", "step": p.step, "epoch": p.epoch}
        if self.world.is_main:
            record["knn_top1"] = self.monitor(self.model.encoder_q.backbone)
        distributed.barrier()
        record["time"] = self._now()
        if self.world.is_main:
            self.metrics.write(record)
            tqdm.write(f"step {p.step} ({p.step / max(1, self.steps_per_epoch):.2f} epochs): "
                       f"kNN top-1 {record['knn_top1']:.4f}")
            self._plot()
        self._overhead += time.monotonic() - began
        return record.get("knn_top1")

    def _plot(self) -> None:
        if self._plot_failed or self.metrics is None:
            return
        config = self.config
        budget = f", budget {format_duration(config.time_budget)}" if config.time_budget else ""
        title = (f"{config.preset} {config.arch} @ {config.image_size}px, {len(self.folder.refs)} images{budget}; "
                 f"kNN on {len(self.monitor.bank)} bank / {len(self.monitor.queries)} val images")
        try:
            write_monitor_plot(self.metrics.path, self.run_dir / PLOT_NAME, title=title, budget_s=config.time_budget)
        except (ImportError, OSError, ValueError, RuntimeError) as err:  # a plot never stops a run
            self._plot_failed = True
            tqdm.write(f"note: could not draw {PLOT_NAME} ({type(err).__name__}: {err}); training goes on")

    def _end_epoch(self, losses: list[float], images: int, waited: float, computed: float) -> None:
        p = self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        record = {"kind": "epoch", "step": p.step, "epoch": p.epoch,
                  "loss": float(np.mean(losses)) if losses else float("nan"),
                  "img_per_s": images / max(1e-9, waited + computed),
                  "data_wait": waited / max(1e-9, waited + computed)}
        # --epochs runs evaluate every --eval-every epochs; budget runs at planned steps (_evaluate).
        if (self.plan.mode == "epochs" and self.monitor is not None
                and (p.epoch % self.config.eval_every == 0 or p.epoch == self.config.epochs)):
            began = time.monotonic()
            if self.world.is_main:
                record["knn_top1"] = self.monitor(self.model.encoder_q.backbone)
            distributed.barrier()
            self._overhead += time.monotonic() - began
        self._account_time()
        record["time"] = p.elapsed
        p.history.append(record)
        if self.world.is_main:
            self.metrics.write(record)
            knn = f", kNN top-1 {record['knn_top1']:.4f}" if "knn_top1" in record else ""
            tqdm.write(f"epoch {p.epoch}: loss {record['loss']:.4f}, {record['img_per_s']:.1f} img/s, "
                       f"data wait {record['data_wait']:.0%}{knn}")
            if "knn_top1" in record:
                self._plot()
        if self.plan.mode == "epochs":
            self.save()  # budget runs write theirs every --checkpoint-every minutes and at the end

    def _finish(self) -> None:
        """Budget runs end on a step, often mid-epoch: a closing record and the final checkpoint."""
        if self.plan.mode != "budget":
            return
        p = self.progress
        self._account_time()
        if self.metrics is not None:
            self.metrics.write({"kind": "done", "step": p.step, "epoch": p.epoch,
                                "epochs": round(p.step / max(1, self.steps_per_epoch), 4),
                                "budget_s": self.config.time_budget, "time": self._now()})
        self._checkpoint()

    # -- the time budget -------------------------------------------------------------------------
    def _time_steps(self) -> float | None:
        """Seconds per step once enough steps are timed (None while still timing).

        The first steps are left out (allocation, autotuning, compilation); the time of the
        rest counts everything a step costs in the loop, data loading included, but not
        checkpoints. Steps that are very slow end the timing early rather than eat the budget.
        """
        now = time.monotonic()
        self._stamps.append((self.progress.step, now - self._overhead))
        skip = MEASURE_SKIP_STEPS_COMPILED if self.config.compile else MEASURE_SKIP_STEPS
        timed = self._stamps[skip - 1:]  # from the end of the last untimed step
        enough = (len(timed) - 1 >= MEASURE_MIN_STEPS
                  and timed[-1][1] - timed[0][1] >= measure_seconds(self.plan.budget_s))
        give_up = now - self._loop_start >= max(2 * measure_seconds(self.plan.budget_s),
                                                MEASURE_GIVE_UP_FRACTION * (self.deadline - self._loop_start))
        if not distributed.any_ranks(enough or give_up, device=self.device)[0]:
            return None
        if len(timed) >= 2:
            first, last = timed[0], timed[-1]
        elif len(self._stamps) >= 2:
            first, last = self._stamps[-2], self._stamps[-1]
        else:  # one step in all: its whole time, start-up of the loop included (pessimistic)
            first, last = (self.progress.step - 1, self._loop_start), self._stamps[-1]
        self._timed_steps = max(1, last[0] - first[0])
        step_s = max(1e-6, (last[1] - first[1]) / self._timed_steps)
        return distributed.reduce_over_ranks(step_s, "max", device=self.device)  # the slowest rank sets the pace

    def _state_bytes(self) -> int:
        tensors = list(self.model.state_dict().values())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _make_plan(self, step_s: float) -> None:
        """Fit the steps to the budget, adjust the defaults to them, print and store the plan."""
        config, plan, p = self.config, self.plan, self.progress
        budget = plan.budget_s
        eval_s = 0.0
        if self.monitor is not None:  # the curve's first point, and the price of one evaluation
            began = time.monotonic()
            self._evaluate()
            eval_s = distributed.reduce_over_ranks(time.monotonic() - began, "max", device=self.device)
        checkpoint_s = estimate_checkpoint_seconds(self._state_bytes())
        evals = plan_monitor_evals(config.monitor_evals, eval_s, budget) if self.monitor is not None else 0
        now = time.monotonic()
        every_s = config.checkpoint_every * 60
        steps = plan_steps(self.deadline - now, step_s=step_s, eval_s=eval_s, evals=evals,
                           checkpoint_s=checkpoint_s, checkpoints=2, checkpoint_every_s=every_s,
                           margin_s=margin_seconds(budget))
        steps = int(distributed.reduce_over_ranks(steps, "min", device=self.device))
        plan.total_steps, plan.schedule_start, plan.schedule_steps = p.step + steps, p.step, steps
        plan.monitor_evals = evals if steps else 0
        train_s = steps * step_s
        expected = (now - self.started + train_s + evals * eval_s
                    + checkpoint_s * (2 + periodic_checkpoints(train_s, every_s)))
        wall_start = time.time() - (now - self.started)
        plan.measured = {
            "img_per_s": round(config.batch_size / step_s, 2), "step_s": step_s, "timed_steps": self._timed_steps,
            "eval_s": round(eval_s, 3), "checkpoint_s": round(checkpoint_s, 3),
            "planned_at_step": p.step, "planned_at_s": round(now - self.started, 2),
            "expected_end_s": round(expected, 1),
            "started_at": datetime.fromtimestamp(wall_start).isoformat(timespec="seconds"),
            "expected_end": datetime.fromtimestamp(wall_start + expected).isoformat(timespec="seconds"),
        }
        notes = fit_to_plan(config, self.explicit, num_images=len(self.folder.refs), planned_steps=steps,
                            steps_per_epoch=self.steps_per_epoch)
        if config.queue_size and config.queue_size < self.model.queue.shape[1]:
            self.model.shrink_queue(config.queue_size)
        config.notes.extend(notes)
        config.epochs = max(1, plan.epochs)
        # The timing steps ran at learning rate 0; their gradients must not linger in momentum.
        self.optimizer.state.clear()
        if self.world.is_main:
            monitor = (f", kNN monitor {plan.monitor_evals} more x {eval_s:.1f} s" if self.monitor is not None
                       else "")
            tqdm.write(f"plan: {steps} steps ({steps / self.steps_per_epoch:.2f} epochs of {self.steps_per_epoch} "
                       f"steps) in the {format_duration(budget)} budget: {plan.measured['img_per_s']:.1f} img/s "
                       f"timed over {self._timed_steps} steps{monitor}, checkpoints ~{checkpoint_s:.1f} s; "
                       f"expected end {plan.measured['expected_end'][11:]} "
                       f"(started {plan.measured['started_at'][11:]}, {now - self.started:.0f} s ago)")
            if steps == 0:
                tqdm.write("warning: start-up and timing used up the time budget; ending with the steps done")
            for note in notes:
                tqdm.write(f"note: {note}")
            self.metrics.write({"kind": "plan", "step": p.step, "epoch": p.epoch, "total_steps": plan.total_steps,
                                "epochs": round(plan.epochs_exact(), 4), "budget_s": budget,
                                "monitor_evals": plan.monitor_evals, **plan.measured, "time": self._now()})
        if steps:
            self._checkpoint()  # a crash from here on resumes with the plan (else _finish writes the last)
        timed = self._timed_steps
        self._planned_pace = (p.step - timed, time.monotonic() - self._overhead - timed * step_s)
        self._pace = deque([self._planned_pace])

    def _recheck(self) -> None:
        """The safety net: re-measure the pace and re-plan if the run would end past its budget or
        well before it; the schedules are compressed or stretched to complete at the new end.

        Shortening follows the pace of the last few minutes (the machine got slower) once the pace
        since timing began agrees, or on its own near the deadline (TRUST_RECENT_WINDOWS). Lengthening
        is for a plan timed on first steps that were slower than the steady state (a warming
        cache, a busy disk): it needs both that pace and the pace since timing began to be ahead,
        plans with the slower of the two, and happens only while most of the schedule is ahead,
        so a noisy fast minute does not stretch a plan that the next slow one shortens again.
        """
        plan, p, config = self.plan, self.progress, self.config
        budget = plan.budget_s
        now = time.monotonic()
        busy = now - self._overhead
        self._pace.append((p.step, busy))
        window = max(RECHECK_WINDOW_MIN_S, RECHECK_WINDOW_FRACTION * budget)
        while len(self._pace) > 2 and busy - self._pace[1][1] >= window:
            self._pace.popleft()
        first_step, first_busy = self._pace[0]
        recent_s = (busy - first_busy) / max(1, p.step - first_step)
        new_total = plan.total_steps
        if p.step > first_step and plan.total_steps > p.step:
            since_timing_s = (busy - self._planned_pace[1]) / max(1, p.step - self._planned_pace[0])
            tolerance = recheck_tolerance(budget)
            final_stretch = self.deadline - now <= TRUST_RECENT_WINDOWS * window
            if self._projected_late(now, recent_s) > tolerance and (
                    final_stretch or self._projected_late(now, since_timing_s) > tolerance):
                new_total = min(plan.total_steps, p.step + self._steps_that_fit(now, recent_s))
            elif plan.schedule_step(p.step) <= EXTEND_UNTIL_FRACTION * plan.schedule_steps:
                step_s = max(recent_s, since_timing_s)
                if -self._projected_late(now, step_s) > margin_seconds(budget) + tolerance:
                    new_total = max(plan.total_steps, p.step + self._steps_that_fit(now, step_s))
        # Every rank takes part (the same number of times), and all follow the most cautious.
        new_total = int(distributed.reduce_over_ranks(new_total, "min", device=self.device))
        if new_total == plan.total_steps:
            return
        was = plan.total_steps
        plan.replan(p.step, new_total)
        rate = config.batch_size / max(1e-9, recent_s)
        event = {"step": p.step, "was": was, "total_steps": new_total, "img_per_s": round(rate, 2),
                 "at_s": round(now - self.started, 1)}
        plan.replans.append(event)
        config.epochs = max(1, plan.epochs)
        if self.world.is_main:
            change, verb = ("behind", "shortened") if new_total < was else ("ahead of", "lengthened")
            tqdm.write(f"{change} the plan: {rate:.1f} img/s now against {plan.measured['img_per_s']:.1f} timed; "
                       f"{verb} from {was} to {new_total} steps to end within the "
                       f"{format_duration(budget)} budget (LR and momentum schedules now complete at step "
                       f"{new_total})")
            self.metrics.write({"kind": "plan", "event": verb, "epoch": p.epoch, **event,
                                "time": self._now()})

    def _remaining_costs(self) -> tuple[float, int, float, float]:
        """(seconds per kNN evaluation, evaluations left, seconds per checkpoint, checkpoint
        interval in seconds): what the rest of the run costs besides its steps."""
        plan = self.plan
        eval_s = plan.measured.get("eval_s", 0.0) if self.monitor is not None else 0.0
        evals = plan.evals_left(self.progress.step) if self.monitor is not None else 0
        checkpoint_s = self._checkpoint_s or plan.measured.get("checkpoint_s", 0.0)
        return eval_s, evals, checkpoint_s, self.config.checkpoint_every * 60

    def _projected_late(self, now: float, step_s: float) -> float:
        """Seconds past the deadline the plan would end at `step_s` per step (negative: early)."""
        eval_s, evals, checkpoint_s, every_s = self._remaining_costs()
        train_s = (self.plan.total_steps - self.progress.step) * step_s
        projected = (now + train_s + evals * eval_s + FINISH_S
                     + checkpoint_s * (1 + periodic_checkpoints(train_s, every_s)))
        return projected - self.deadline

    def _steps_that_fit(self, now: float, step_s: float) -> int:
        eval_s, evals, checkpoint_s, every_s = self._remaining_costs()
        return plan_steps(self.deadline - now, step_s=step_s, eval_s=eval_s, evals=evals, checkpoint_s=checkpoint_s,
                          checkpoints=1, checkpoint_every_s=every_s, margin_s=margin_seconds(self.plan.budget_s))
