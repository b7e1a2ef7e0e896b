"""Training to a wall-clock budget: `python -m moco train DIR --time-budget 30m`.

The run measures its own speed over a few steps, then plans a number of steps that fits the
budget, counting from process start to the final checkpoint: start-up, the measurement, the kNN
monitor's evaluations and the checkpoint writes included. The plan is in steps (epochs may end
in the middle); the learning-rate and key-momentum schedules are defined over the planned steps,
so they complete when the budget ends. The loop re-measures its pace at its log steps: if the
machine slows down it shortens the rest of the plan, compressing the schedules so they still
complete; if the first steps, which the plan was timed on, were slower than the steady state (a
warming cache, a busy disk), it lengthens the plan while most of the schedule is still ahead.

Everything here is arithmetic (parsing, planning, the step -> schedule mapping); the loop that
measures and acts on it is in `moco.train`. The numbers below are policy, to be tuned by
measurement; each says what it guards against.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# -- measuring --------------------------------------------------------------------------------
# The first steps pay for memory allocation, cuDNN autotuning and torch.compile; they are not
# timed. Steps before the plan exists run at learning rate 0 (they measure speed, fill the
# queue and settle batch-norm statistics, and leave no trace in the optimizer).
MEASURE_SKIP_STEPS = 2
MEASURE_SKIP_STEPS_COMPILED = 3
MEASURE_MIN_STEPS = 3  # timed steps, at least
MEASURE_FRACTION = 0.01  # time spent measuring: 1% of the budget ...
MEASURE_MIN_S = 2.0  # ... but at least 2 s (a few GPU steps are too noisy to time) ...
MEASURE_MAX_S = 20.0  # ... and at most 20 s
MEASURE_GIVE_UP_FRACTION = 0.1  # very slow steps: plan with what is timed after 10% of what is left

# -- planning ---------------------------------------------------------------------------------
SAFETY_MARGIN_FRACTION = 0.01  # plan to end 1% of the budget early: timing noise ...
FINISH_S = 3.0  # ... plus closing the logs, the loader and the interpreter after the last checkpoint
CHECKPOINT_FIXED_S = 0.2  # checkpoint write estimate before one is timed: open, fsync, rename ...
CHECKPOINT_BYTES_PER_S = 200e6  # ... plus the bytes at a modest disk speed
MONITOR_MAX_SHARE = 0.1  # the kNN monitor may take at most 10% of the budget (fewer evaluations if dearer)

# -- the safety net -----------------------------------------------------------------------------
RECHECK_TOLERANCE = 0.02  # shorten the plan when the projected end is 2% of the budget late ...
RECHECK_TOLERANCE_MIN_S = 2.0  # ... (at least 2 s, so timing noise in tiny runs is not chased) ...
RECHECK_TOLERANCE_MAX_S = 15.0  # ... and at most 15 s, so a long run never ends much past its budget
RECHECK_WINDOW_FRACTION = 0.05  # the pace is measured over the last 5% of the budget ...
RECHECK_WINDOW_MIN_S = 10.0  # ... or the last 10 s, whichever is longer
TRUST_RECENT_WINDOWS = 4  # within 4 windows of the deadline the recent pace alone shortens the plan
# (a late slowdown would not be averaged away in time); before that a dip must also show in the
# pace since timing began, so one slow minute on a shared machine does not cut a schedule that
# cannot be lengthened again in its second half
EXTEND_UNTIL_FRACTION = 0.5  # lengthen a plan that would end early (by more than the margin and the
# tolerance) only in the first half of its schedule: later the LR is already decaying, and the
# momentum and queue were fitted to the planned length

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m', '1.5h' -> seconds. Raises ValueError with a one-line reason."""
    cleaned = text.strip().lower().replace(" ", "")
    match = _DURATION.match(cleaned)
    if not cleaned or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration; write it like 90s, 30m, 2h or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} is no time at all; give a positive duration such as 30m")
    return total


def format_duration(seconds: float) -> str:
    """Seconds -> '1h30m', '30m', '1m30s', '20s' (whole seconds)."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so that the budget counts interpreter
    start-up and imports too; 0 where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields_after_name = handle.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields_after_name[19])  # field 22 of proc(5): starttime, in clock ticks
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


# -- planning arithmetic ---------------------------------------------------------------------------
def measure_seconds(budget_s: float) -> float:
    return min(MEASURE_MAX_S, max(MEASURE_MIN_S, MEASURE_FRACTION * budget_s))


def margin_seconds(budget_s: float) -> float:
    return SAFETY_MARGIN_FRACTION * budget_s + FINISH_S


def recheck_tolerance(budget_s: float) -> float:
    return min(RECHECK_TOLERANCE_MAX_S, max(RECHECK_TOLERANCE_MIN_S, RECHECK_TOLERANCE * budget_s))


def estimate_checkpoint_seconds(nbytes: int) -> float:
    return CHECKPOINT_FIXED_S + nbytes / CHECKPOINT_BYTES_PER_S


def plan_monitor_evals(requested: int, eval_s: float, budget_s: float) -> int:
    """How many kNN evaluations to spread over the run (after the one at the start, which was
    timed): as many as asked, as long as all of them, the first included, stay within
    MONITOR_MAX_SHARE of the budget; always at least the final one."""
    if requested <= 0:
        return 0
    affordable = math.floor(MONITOR_MAX_SHARE * budget_s / max(eval_s, 1e-9)) - 1
    return max(1, min(requested, affordable))


def plan_steps(remaining_s: float, *, step_s: float, eval_s: float = 0.0, evals: int = 0,
               checkpoint_s: float = 0.0, checkpoints: int = 1, checkpoint_every_s: float = math.inf,
               margin_s: float = 0.0) -> int:
    """Training steps that fit in `remaining_s` seconds.

    Fixed costs come off first: `evals` monitor evaluations, `checkpoints` checkpoint writes
    (the final one, and the one right after planning) and the safety margin. Time-based
    checkpoints, one per `checkpoint_every_s` of training, come off what is left; the rest is
    divided by the measured seconds per step (data loading included).
    """
    if step_s <= 0:
        raise ValueError(f"seconds per step must be positive, got {step_s}")
    train_s = remaining_s - evals * eval_s - checkpoints * checkpoint_s - margin_s
    if train_s <= 0:
        return 0
    if math.isfinite(checkpoint_every_s) and checkpoint_every_s > 0:
        train_s -= math.floor(train_s / checkpoint_every_s) * checkpoint_s
    return max(0, math.floor(train_s / step_s))


def periodic_checkpoints(train_s: float, checkpoint_every_s: float) -> int:
    if not math.isfinite(checkpoint_every_s) or checkpoint_every_s <= 0:
        return 0
    return max(0, math.floor(train_s / checkpoint_every_s))


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class Plan:
    """How long the run is, in optimizer steps, and where its schedules stand at each step.

    `--epochs` runs: total_steps = epochs x steps_per_epoch and the schedules span all of them.
    `--time-budget` runs: total_steps is None until the speed is measured; then the schedules
    span the steps from `schedule_start` (the first step after the measurement) to
    `total_steps`. When the safety net shortens or lengthens the plan, a knot (step, schedule
    position) is added: the schedules keep their value at that step and are compressed (or
    stretched) over what remains, so the LR still decays to zero at the new last step. All of it
    is a pure function of the step, stored in the checkpoint, so a resumed run lands on exactly
    the same values.
    """

    mode: str  # "epochs" | "budget"
    steps_per_epoch: int
    total_steps: int | None
    schedule_start: int = 0
    schedule_steps: int = 0  # the length the schedules were first planned over
    knots: list[list[float]] = field(default_factory=list)  # [step, schedule position] per re-plan
    budget_s: float | None = None
    monitor_evals: int = 0  # budget runs: kNN evaluations spread over the schedule (the last at the end)
    measured: dict[str, Any] = field(default_factory=dict)  # img/s, seconds per step, eval and checkpoint costs
    replans: list[dict[str, Any]] = field(default_factory=list)
    explicit: list[str] = field(default_factory=list)  # values the user set, kept by the defaults at planning

    @classmethod
    def for_epochs(cls, epochs: int, steps_per_epoch: int) -> Plan:
        total = epochs * steps_per_epoch
        return cls(mode="epochs", steps_per_epoch=steps_per_epoch, total_steps=total, schedule_steps=total)

    @classmethod
    def for_budget(cls, budget_s: float, steps_per_epoch: int) -> Plan:
        return cls(mode="budget", steps_per_epoch=steps_per_epoch, total_steps=None, budget_s=budget_s)

    @classmethod
    def from_dict(cls, data: dict[str, Any], steps_per_epoch: int) -> Plan:
        plan = cls(**{k: v for k, v in data.items() if k in {f for f in cls.__dataclass_fields__}})
        plan.steps_per_epoch = steps_per_epoch  # follows the data as it is now
        return plan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["epochs"] = self.epochs  # derived, for display and for older readers
        return out

    @property
    def planned(self) -> bool:
        return self.total_steps is not None

    @property
    def epochs(self) -> int:
        """Epochs the plan reaches into (the last one may be partial)."""
        if self.total_steps is None:
            return 0
        return math.ceil(self.total_steps / max(1, self.steps_per_epoch))

    def epochs_exact(self, step: int | None = None) -> float:
        return (self.total_steps if step is None else step) / max(1, self.steps_per_epoch)

    def schedule_step(self, step: float) -> float:
        """Where the schedules stand at `step`, in [0, schedule_steps]."""
        if self.total_steps is None or step <= self.schedule_start:
            return 0.0
        if step >= self.total_steps:
            return float(self.schedule_steps)
        if not self.knots and self.schedule_start == 0 and self.total_steps == self.schedule_steps:
            return float(min(step, self.total_steps))  # the plain case: the step itself
        points = [(self.schedule_start, 0.0), *((s, v) for s, v in self.knots),
                  (self.total_steps, float(self.schedule_steps))]
        for (s0, v0), (s1, v1) in zip(points, points[1:]):
            if step <= s1:
                return v0 + (step - s0) * (v1 - v0) / max(1e-9, s1 - s0)
        return float(self.schedule_steps)

    def replan(self, step: int, new_total: int) -> None:
        """End at `new_total` instead (sooner or later); the schedules keep their value at `step`
        and complete there."""
        position = self.schedule_step(step)
        self.knots.append([step, position])
        self.total_steps = max(step, new_total)

    def eval_bucket(self, step: int) -> int:
        """Budget runs evaluate when the schedule crosses each 1/monitor_evals of its length."""
        if not self.monitor_evals or not self.schedule_steps:
            return 0
        return math.floor(self.monitor_evals * self.schedule_step(step) / self.schedule_steps + 1e-9)

    def eval_due(self, step: int) -> bool:
        return self.mode == "budget" and self.planned and self.eval_bucket(step) > self.eval_bucket(step - 1)

    def evals_left(self, step: int) -> int:
        return max(0, self.monitor_evals - self.eval_bucket(step))
