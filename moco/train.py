"""The training loop: read it top to bottom.

`Trainer.run()` is one loop over epochs and batches until the plan's last step; each batch goes
through the same stages, in this order: data, step, log, plan, evaluate, checkpoint, stop.
`--epochs` runs know their last step from the start; `--time-budget` runs time a few steps
first, then `moco.pacer` plans how many fit and re-plans when the pace changes. Everything a
resumed run needs to continue exactly is in the checkpoint, the plan included; the schedules are
pure functions of the global step (`Plan.lr`, `Plan.momentum`), so extending a run only changes
the total they are computed over. The metrics file, progress and stop signals are `moco.runlog`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from indexer.threads import CoreShare, available_cores, threads_beside
from moco import distributed, step_timing
from moco.backbones import WIDTHS
from moco.cache import training_cache
from moco.checkpoint import CHECKPOINT_NAME, checkpoint_bytes, restore_training_state, save_checkpoint, training_state
from moco.config import TrainConfig
from moco.data import EpochBatches, ImageFolder, training_batches
from moco.defaults import default_small_crop_size, fit_stem_to_precision, fit_to_plan
from moco.evaluate import KnnMonitor, calibrated_copy
from moco.model import MoCo
from moco.optim import build_optimizer
from moco.pacer import MONITOR_MAX_SHARE, Pacer, Plan, Replan, format_duration, monitor_images_that_fit
from moco.precision import resolve_precision
from moco.progressive import progressive_size, relative_cost
from moco.quality import QualityTracker, cpu_copy
from moco.runlog import MetricsLog, Progress, StopFlag, TrainingDiverged, TrainingStopped, tidy_run_dir

CALIBRATION_IMAGES = 512
"""Training images whose batch-norm statistics calibrate the network measured at the start (and
whose forward pass times the monitor's cost for a budget run)."""
SHARE_CHECK_S = 10.0
"""How often a CPU run looks at how much of its cores other processes use (`Trainer.share_cores`)."""


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
        if config.multi_crop and not config.small_crop_size:  # `python -m moco` derives it and says so
            config.small_crop_size = default_small_crop_size(config.image_size)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if device.type == "cpu":  # one thread per core this process may use: spinning extra threads cost far more
            torch.set_num_threads(max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
        # A lone CPU run leaves cores to processes started after it and takes them back (see `share_cores`).
        self.core_share = (CoreShare.for_this_process() if device.type == "cpu" and not world.enabled
                           and not config.deterministic else None)
        self._cores_checked = time.monotonic()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)

        # -- the model and its optimizer; the encoders' forward in the run's precision (resolved
        # here, after the thread count, since auto may time the step; stored in the config, so a
        # resumed run keeps it; `python -m moco` prints it)
        if config.precision == "auto" or not config.precision_reason:
            config.precision, config.precision_reason = resolve_precision(
                config.precision, device, compiled=config.compile, rates=lambda: self._precision_rates(device, world))
        if state is None:  # a resumed run keeps the stem its weights have
            for note in fit_stem_to_precision(config, device.type):
                config.notes.append(note)
                if world.is_main:
                    tqdm.write(f"note: {note}")
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

        # -- where the run stands, and how long it is
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
            restore_training_state(state, model=self.model, optimizer=self.optimizer, device=device, folder=folder)
            self.progress = Progress.from_dict(state["progress"])

        # -- the data: the decoded cache (files that failed to decode are known from it at once),
        # the loader over the sampler's batches, and `views`, which makes each batch's two views
        # (augmented and normalized, on the device)
        self.cache = training_cache(config, folder) if config.cache else None
        if self.cache is not None:
            for index, reason in self.cache.failed().items():
                self._skip(folder.refs[index].relpath, reason)
        self.sampler.exclude({i for i, r in enumerate(folder.refs) if r.relpath in self.progress.skipped})
        self.loader, self.views = training_batches(config, folder, self.cache, self.sampler, device)

        # -- evaluation, the records, the time budget
        self.monitor = None
        if val is not None:
            self.monitor = KnnMonitor(folder, val, image_size=config.image_size, mean=config.mean,
                                      std=config.std, device=device, workers=config.workers,
                                      k=config.knn_k, temperature=config.knn_t,
                                      max_images=config.knn_max_images, seed=config.seed,
                                      channels_last=config.channels_last, precision=config.precision)
            if self.monitor.capped and world.is_main:
                tqdm.write(f"kNN monitor: {self.monitor.describe()} (--knn-max-images "
                           f"{config.knn_max_images}; 0 uses all)")
        # -- what the run ships (moco.quality): the network before training, the best one seen
        self.quality = QualityTracker(self.monitor.line() if self.monitor else None,
                                      len(self.monitor.queries) if self.monitor else 0)
        if state is not None and state.get("monitor"):
            saved_queries = int(state["monitor"].get("queries") or 0)
            if self.monitor is not None and 0 < saved_queries < len(self.monitor.queries):
                self.monitor.shrink(2 * saved_queries)  # the same seeded subset the first session scored on
                self.quality.monitor, self.quality.queries = self.monitor.line(), len(self.monitor.queries)
            self.quality.load_state_dict(state["monitor"], self.model.encoder_q)
        self.start_eval_s: float | None = None  # one monitor evaluation's price, timed at the start
        # The step of the last monitor evaluation, known alike on every rank (only rank 0 scores, so
        # the tracker's own record exists there alone): every rank must take part in the same ones.
        self.last_eval_step: int | None = self.quality.last_step
        self.last_quality: dict[str, Any] | None = None  # as the last checkpoint stored it
        if world.is_main:
            tidy_run_dir(run_dir, resuming=state is not None)
        self.metrics = MetricsLog(run_dir, resume_step=self.progress.step if state is not None else None) \
            if world.is_main else None
        # Made last, as the loop starts: only the session that makes a budget plan keeps it to
        # the budget (the safety net); a resumed one finishes the stored plan.
        self.pacer = Pacer(self.plan, clock=time.monotonic, started=self.started, elapsed=self.progress.elapsed,
                           batch_size=config.batch_size, checkpoint_every_s=config.checkpoint_every * 60,
                           monitor=self.monitor is not None, compiled=config.compile,
                           agree=lambda value, op: distributed.reduce_over_ranks(value, op, device=device),
                           cost=self._step_cost if config.progressive else None)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Progress:
        config, progress, plan = self.config, self.progress, self.plan
        self._mark = self.started  # the first session's time counts from process start
        last_checkpoint = time.monotonic()
        with StopFlag() as stop:
            if self.monitor is not None and not self.quality.has_start and (progress.step == 0 or not plan.planned):
                self._measure_start()  # before any step changes the weights (timing steps run at LR 0)
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
                    # data
                    fetched = time.monotonic()
                    waited += fetched - tick
                    self._record_failures(failures)
                    # step
                    stepped = batch is not None and batch[0].shape[0] >= 2
                    if stepped:
                        self.train_step(batch)
                        images_seen += batch[0].shape[0] * self.world.size
                        # The GPU runs ahead; losses are fetched only when they are shown or logged
                        # (and while steps are being timed, so the clock sees them finish).
                        if self.device.type == "cpu" or not plan.planned or progress.step % config.log_every == 0:
                            losses.extend(self._fetch_losses())
                    progress.batch_in_epoch += 1
                    self.share_cores()
                    computed += time.monotonic() - fetched
                    # log
                    rate = images_seen / max(1e-9, waited + computed)
                    wait_share = waited / max(1e-9, waited + computed)
                    if stepped and progress.step % config.log_every == 0:
                        self._log_step(losses[-1], rate, wait_share)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-",
                                    lr=f"{plan.lr(progress.step, config):.3g}", img_s=f"{rate:.0f}",
                                    wait=f"{wait_share:.0%}")
                    bar.update(1)
                    # plan (time budget): time the first steps and plan, then keep to the budget
                    if stepped and not plan.planned:
                        if self.pacer.time_step(progress.step) is not None:
                            self._make_plan()
                            bar.set_description(self._epoch_label())
                            last_checkpoint = time.monotonic()
                    elif stepped and self.pacer.recheck_due(progress.step, config.log_every):
                        self._replanned(self.pacer.recheck(progress.step))
                    # evaluate
                    if stepped and plan.eval_due(progress.step):
                        self._evaluate()
                    # checkpoint and stop: all ranks at the same step
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
                    self.end_epoch(losses, images_seen, waited, computed)
                    if plan.mode == "epochs":
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

    # -- data ----------------------------------------------------------------------------------
    def _record_failures(self, failures) -> None:
        if self.world.enabled and self.cache is None:
            # Streaming: a file fails on one rank only; all ranks must drop it alike so their
            # epoch permutations stay the same. (With the cache every rank knows them at start.)
            failures = distributed.gather_objects(list(failures))
        new = {failure.index for failure in failures if self._skip(failure.relpath, failure.reason)}
        if new:
            self.sampler.exclude(new)

    def _skip(self, relpath: str, reason: str) -> bool:
        if relpath in self.progress.skipped:
            return False
        self.progress.skipped[relpath] = reason
        if self.world.is_main:
            tqdm.write(f"skipped {relpath}: {reason}")
        return True

    # -- step ----------------------------------------------------------------------------------
    def _precision_rates(self, device: torch.device, world: distributed.World) -> dict[str, float]:
        """This run's step timed in fp32 and bf16 (moco.step_timing); under torchrun every rank
        times its share and all take the slowest rank's figures, so all make the same choice."""
        rates = step_timing.precision_rates(self.config, device, world_size=world.size)
        if self.share_cores(now=True):  # others took cores while it timed: time again with the threads left
            rates = step_timing.precision_rates(self.config, device, world_size=world.size)
        return {name: distributed.reduce_over_ranks(rate, "min", device) for name, rate in rates.items()}

    def train_step(self, batch) -> None:
        """One optimisation step on `batch` (the loader's tensors). The loop's unit of work, public
        so that a subclass or a test can wrap it (a kill or a fault at a chosen step) without
        reaching into the loop; the loop counts the step and fetches its loss around it."""
        config, plan, step = self.config, self.plan, self.progress.step
        lr = self.last_lr = plan.lr(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        size = self.training_size(step)
        views = self.views(batch, self.progress.epoch, self.progress.batch_in_epoch, size=size)
        # (view1, view2[, small crops]); the model autocasts its encoders (moco.model)
        loss = self.forward(views[0], views[1], plan.momentum(step, config), *views[2:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.progress.step += 1
        self.pending.append(loss.detach())

    def share_cores(self, *, now: bool = False) -> bool:
        """Every SHARE_CHECK_S, one thread per core that other processes leave free (at least
        one). Threads sized at start oversubscribe the cores once another process starts: two
        MoCo step loops of two threads each on two cores ran at 8 img/s each in bf16 (67 in
        fp32), of one thread each at 118 (68). Changing the thread count changes the order of float reductions, so
        runs asked to be --deterministic keep theirs. `now`: look whatever the time since the
        last look. True when the thread count changed."""
        if self.core_share is None or (not now and time.monotonic() - self._cores_checked < SHARE_CHECK_S):
            return False
        self._cores_checked = time.monotonic()
        others = self.core_share.others_busy()
        if others is None:
            return False
        cores = available_cores()
        threads, before = threads_beside(cores, others), torch.get_num_threads()
        if threads == before:
            return False
        torch.set_num_threads(threads)
        tqdm.write(f"threads {before} -> {threads}: other processes keep {others:.1f} of this run's "
                   f"{cores} cores busy")
        return True

    def training_size(self, step: int) -> int | None:
        """The views' size for step `step` (counting from 0) with --progressive (None without):
        from where the plan's schedule stands once the step is done, so it follows a re-planned
        budget and the last step of any plan is at the full size; the timing steps run at the
        start size."""
        if not self.config.progressive:
            return None
        return progressive_size(self._schedule_fraction(step + 1), self.config.image_size, self.config.progressive)

    def _schedule_fraction(self, step: float) -> float:
        plan = self.plan
        if not plan.planned or not plan.schedule_steps:
            return 0.0
        return plan.schedule_step(step) / plan.schedule_steps

    def _step_cost(self, fraction: float) -> float:
        """The pacer's price of a step at `fraction` of the schedule, relative to a full-size one."""
        return relative_cost(fraction, self.config.image_size, self.config.progressive)

    def _fetch_losses(self) -> list[float]:
        """Bring the pending losses to the host (the one synchronisation) and stop on NaN/inf."""
        if not self.pending:
            return []
        values = distributed.mean_over_ranks(torch.stack(self.pending).float()).tolist()
        first_step = self.progress.step - len(values) + 1
        self.pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                hint = "a lower --lr" + (" or --precision fp32" if self.config.precision == "bf16" else "")
                raise TrainingDiverged(f"the loss became {value} at step {first_step + offset}; stopped, and the "
                                       f"last good checkpoint was kept (try {hint})")
        return values

    # -- log -----------------------------------------------------------------------------------
    def _log_step(self, loss: float, rate: float, wait_share: float) -> None:
        p = self.progress
        if self.metrics is None:
            return
        record = {"kind": "step", "step": p.step, "epoch": p.epoch, "loss": loss, "lr": self.last_lr,
                  "moco_m": self.plan.momentum(p.step - 1, self.config), "img_per_s": rate,
                  "data_wait": wait_share, "time": self._now()}
        if self.config.progressive:
            record["image_size"] = self.training_size(p.step - 1)
        self.metrics.write(record)

    def end_epoch(self, losses: list[float], images: int, waited: float, computed: float) -> None:
        """Close an epoch: count it, log its record, checkpoint it (epoch plans). Public for the
        same reason as `train_step`: "killed right after an epoch's checkpoint" wraps this."""
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
                record["knn_top1"] = self._score()
            self.last_eval_step = p.step
            distributed.barrier()
            self.pacer.set_aside(time.monotonic() - began)
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

    def _account_time(self) -> None:
        now = time.monotonic()
        self.progress.elapsed += now - self._mark
        self._mark = now

    def _now(self) -> float:
        """Seconds since the run started, summed over resumed sessions."""
        return self.progress.elapsed + time.monotonic() - self._mark

    # -- plan (time budget; moco.pacer decides, the loop applies) -------------------------------
    def _make_plan(self) -> None:
        """Fit the steps to the budget, adjust the defaults to them, print and store the plan."""
        config, plan, p = self.config, self.plan, self.progress
        eval_s = 0.0
        if self.monitor is not None:  # the price of one evaluation: timed at the start, else now
            if self.start_eval_s is None:
                began = time.monotonic()
                self._evaluate()
                self.start_eval_s = time.monotonic() - began
            eval_s = distributed.reduce_over_ranks(self.start_eval_s, "max", device=self.device)
        steps = self.pacer.make_plan(p.step, eval_s=eval_s, evals_wanted=config.monitor_evals,
                                     state_bytes=checkpoint_bytes(self.model, self.optimizer))
        notes = fit_to_plan(config, self.explicit, num_images=len(self.folder.refs), planned_steps=steps,
                            steps_per_epoch=self.steps_per_epoch)
        if config.queue_size and config.queue_size < self.model.queue.shape[1]:
            self.model.shrink_queue(config.queue_size)
        config.notes.extend(notes)
        config.epochs = max(1, plan.epochs)
        # The timing steps ran at learning rate 0; their gradients must not linger in momentum.
        self.optimizer.state.clear()
        if self.world.is_main:
            tqdm.write(self.pacer.summary())
            for note in notes:
                tqdm.write(f"note: {note}")
            self.metrics.write({"kind": "plan", "step": p.step, "epoch": p.epoch, "total_steps": plan.total_steps,
                                "epochs": round(plan.epochs_exact(), 4), "budget_s": plan.budget_s,
                                "monitor_evals": plan.monitor_evals, **plan.measured, "time": self._now()})
        if steps:
            self._checkpoint()  # a crash from here on resumes with the plan (else _finish writes the last)
        self.pacer.start_safety_net(p.step)

    def _replanned(self, change: Replan | None) -> None:
        """The safety net moved the plan's end: the schedules already follow; say so."""
        if change is None:
            return
        self.config.epochs = max(1, self.plan.epochs)
        if self.world.is_main:
            tqdm.write(self.pacer.replan_summary(change))
            self.metrics.write({"kind": "plan", "event": change.verb, "epoch": self.progress.epoch,
                                **change.record(), "time": self._now()})

    # -- evaluate ------------------------------------------------------------------------------
    def _evaluate(self) -> float | None:
        """A kNN monitor evaluation now: a record in metrics.jsonl and the plot redrawn."""
        began = time.monotonic()
        p = self.progress
        record: dict[str, Any] = {"kind": "eval", "step": p.step, "epoch": p.epoch}
        if self.world.is_main:
            record["knn_top1"] = self._score()
        self.last_eval_step = p.step
        distributed.barrier()
        record["time"] = self._now()
        if self.world.is_main:
            self.metrics.write(record)
            tqdm.write(f"step {p.step} ({p.step / max(1, self.steps_per_epoch):.2f} epochs): "
                       f"kNN top-1 {record['knn_top1']:.4f}")
            self._plot()
        self.pacer.set_aside(time.monotonic() - began)
        return record.get("knn_top1")

    def _score(self) -> float:
        """The monitor on the current network; a new best is copied (moco.quality). The monitor
        observes only: it runs on a forked random generator, so a run trains alike with or
        without --val."""
        with torch.random.fork_rng(devices=[]):
            score = self.monitor(self.model.encoder_q.backbone)
        self.quality.observe(self.progress.step, score, self.model.encoder_q)
        return score

    def _measure_start(self) -> None:
        """The monitor on the network before training: the figure the run must beat to ship its
        own weights. Batch-norm statistics of a fresh network are 0 and 1, which would cripple
        it (and flatter any trained one), so it is measured, and kept, as a copy whose statistics
        are measured on the training images, like `moco eval --random-init`."""
        config, p = self.config, self.progress
        began = time.monotonic()
        self.start_eval_s = 0.0
        self.last_eval_step = p.step
        if self.world.is_main:
            with torch.random.fork_rng(devices=[]):
                start = calibrated_copy(self.model.encoder_q, self.folder, image_size=config.image_size,
                                        mean=config.mean, std=config.std, device=self.device,
                                        workers=config.workers, seed=config.seed, max_images=CALIBRATION_IMAGES)
                calibrated = time.monotonic()
                self._fit_monitor_to_budget(min(CALIBRATION_IMAGES, len(self.folder.refs)) / (calibrated - began))
                score = self.monitor(start.backbone)
            self.start_eval_s = time.monotonic() - calibrated
            self.quality.observe_start(p.step, score, cpu_copy(start))
            del start
            self.metrics.write({"kind": "eval", "step": p.step, "epoch": p.epoch, "knn_top1": score, "start": True,
                                "time": self._now()})
            tqdm.write(f"kNN top-1 {score:.4f} at the start (the random network, batch-norm statistics measured "
                       f"on the training images): the run ships its own weights only if it beats this by more "
                       f"than {self.quality.margin():.3f}")
        distributed.barrier()
        self.pacer.set_aside(time.monotonic() - began)

    def _fit_monitor_to_budget(self, forward_img_s: float) -> None:
        """A budget run's monitor uses no more images than two evaluations can afford within the
        monitor's share of the budget (moco.pacer), at the forward rate the batch-norm calibration
        just measured: a 45-second run must not spend itself measuring."""
        if self.plan.mode != "budget" or self.plan.budget_s is None:
            return
        images = monitor_images_that_fit(self.plan.budget_s, forward_img_s)
        if self.monitor.shrink(images):
            self.quality.monitor, self.quality.queries = self.monitor.line(), len(self.monitor.queries)
            tqdm.write(f"kNN monitor: {self.monitor.describe()}, to keep its evaluations within "
                       f"{MONITOR_MAX_SHARE:.0%} of the {format_duration(self.plan.budget_s)} budget at "
                       f"{forward_img_s:.0f} img/s")

    def length_in_words(self) -> str:
        """The run's length for the quality's reason: 'the 2m30s budget (10 training steps)'."""
        plan, step = self.plan, self.progress.step
        if plan.mode == "budget":
            trained = max(0, step - plan.schedule_start) if plan.planned else 0
            return f"the {format_duration(plan.budget_s)} budget ({trained} training step{'s' * (trained != 1)})"
        epochs = self.progress.epoch
        return f"{epochs} epoch{'s' * (epochs != 1)} ({step} step{'s' * (step != 1)})"

    def _plot(self) -> None:
        config = self.config
        budget = f", budget {format_duration(config.time_budget)}" if config.time_budget else ""
        self.metrics.plot(title=f"{config.preset} {config.arch} @ {config.image_size}px, {len(self.folder.refs)} "
                          f"images{budget}; kNN on {len(self.monitor.bank)} bank / {len(self.monitor.queries)} "
                          "val images", budget_s=config.time_budget)

    # -- checkpoint ----------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        began = time.monotonic()
        self._account_time()
        self.save()
        self.pacer.checkpoint_written(time.monotonic() - began)

    def save(self) -> None:
        if not self.world.is_main:  # one writer: rank 0 holds the same state as every rank
            return
        quality = self.last_quality = self.quality.decide(self.progress.step, self.length_in_words())
        state = training_state(self.config, model=self.model, optimizer=self.optimizer, progress=self.progress,
                               plan=self.plan, device=self.device, folder=self.folder, val=self.val,
                               quality=quality, shipped_encoder=self.quality.shipped_weights(quality),
                               monitor=self.quality.state_dict(self.progress.step) if self.quality.measured else None)
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, state)

    # -- stop ----------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The final network is always measured (the quality decides what ships from it); budget
        runs end on a step, often mid-epoch: a closing record and the final checkpoint."""
        p = self.progress
        trained = self.plan.mode == "epochs" or (self.plan.planned and p.step > self.plan.schedule_start)
        # (a budget run with no training step has the start's weights: nothing new to measure)
        if self.monitor is not None and self.last_eval_step != p.step and trained:
            self._evaluate()
            if self.plan.mode == "epochs":
                self.save()
        if self.plan.mode != "budget":
            return
        self._account_time()
        if self.metrics is not None:
            self.metrics.write({"kind": "done", "step": p.step, "epoch": p.epoch,
                                "epochs": round(p.step / max(1, self.steps_per_epoch), 4),
                                "budget_s": self.config.time_budget, "time": self._now()})
        self._checkpoint()
