"""Training to a wall-clock budget: `python -m moco train DIR --time-budget 30m`.

The run measures its own speed over a few steps, then plans a number of steps that fits the
budget, counting from process start to the final checkpoint: start-up, the measurement, the kNN
monitor's evaluations and the checkpoint writes included. The plan is in steps (epochs may end
in the middle); the learning-rate and key-momentum schedules are defined over the planned steps,
so they complete when the budget ends. The loop re-measures its pace at its log steps: if the
machine slows down it shortens the rest of the plan, compressing the schedules so they still
complete; if the first steps, which the plan was timed on, were slower than the steady state (a
warming cache, a busy disk), it lengthens the plan while most of the schedule is still ahead.

`Pacer` does all of it for one session: it reads the time only through the clock it is given
and learns the run's other costs through its methods, so it is tested on its own with a fake
clock; `moco.train` calls it at each step and acts on what it returns. `Plan` is what it makes,
stored in the checkpoint (`--epochs` runs have one too). The numbers below are policy, to be
tuned by measurement; each says what it guards against.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from moco.optim import lr_at, momentum_at

if TYPE_CHECKING:
    from moco.config import TrainConfig

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
MEASURE_GIVE_UP_FRACTION = 0.1  # very slow steps: plan with what is timed after 10% of what is left ...
MEASURE_GIVE_UP_MIN_STEPS = 2  # ... once at least 2 steps are timed (one step's time is mostly noise:
# issue 17's 45 s run planned from one slow step at 10 img/s against a steady 100, and ended after 12 s) ...
MEASURE_LIMIT_FRACTION = 0.25  # ... unless timing has taken a quarter of what was left: then plan with one

# -- planning ---------------------------------------------------------------------------------
SAFETY_MARGIN_FRACTION = 0.01  # plan to end 1% of the budget early: timing noise ...
FINISH_S = 3.0  # ... plus closing the logs, the loader and the interpreter after the last checkpoint
CHECKPOINT_FIXED_S = 0.2  # checkpoint write estimate before one is timed: open, fsync, rename ...
CHECKPOINT_BYTES_PER_S = 200e6  # ... plus the bytes at a modest disk speed
MONITOR_MAX_SHARE = 0.1  # the kNN monitor may take at most 10% of the budget (fewer evaluations if dearer)
MONITOR_MIN_IMAGES = 200  # ...with at least this many bank + query images: fewer leave a noise band
# so wide that no short run could show it learned (the start and the end must fit in the share)

# -- the safety net -----------------------------------------------------------------------------
RECHECK_TOLERANCE = 0.02  # shorten the plan when the projected end is 2% of the budget late ...
RECHECK_TOLERANCE_MIN_S = 2.0  # ... (at least 2 s, so timing noise in tiny runs is not chased) ...
RECHECK_TOLERANCE_MAX_S = 15.0  # ... and at most 15 s, so a long run never ends much past its budget
RECHECK_WINDOW_FRACTION = 0.05  # the pace is measured over the last 5% of the budget ...
RECHECK_WINDOW_MIN_S = 5.0  # ... or the last 5 s, whichever is longer (a 45 s run has no 10 s to spare)
RECHECK_EVERY_S = 2.0  # the pace is rechecked about every 2 s of steps (every step when steps are slower),
# and at least every --log-every steps: a 4-step plan timed on slow first steps must be able to grow
RECHECK_MIN_STEPS = 3  # the safety net judges the pace once 3 steps have run since the plan (one
# step's time is noise), and from then on measures it since the plan: the timing steps, slow by
# allocation or a busy start, are left out, so a plan timed on them grows to the budget
TRUST_RECENT_WINDOWS = 4  # within 4 windows of the deadline the recent pace alone shortens the plan
# (a late slowdown would not be averaged away in time); before that a dip must also show in the
# pace since the plan, so one slow minute on a shared machine does not cut a schedule that
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
    """How long to time steps before planning: long enough to average out noise, short in a small budget."""
    return min(MEASURE_MAX_S, max(MEASURE_MIN_S, MEASURE_FRACTION * budget_s))


def margin_seconds(budget_s: float) -> float:
    """Seconds the plan leaves unused at the end: timing noise, and the closing after the last checkpoint."""
    return SAFETY_MARGIN_FRACTION * budget_s + FINISH_S


def recheck_tolerance(budget_s: float) -> float:
    """How far off the deadline a projection may be before the safety net acts (noise is not chased)."""
    return min(RECHECK_TOLERANCE_MAX_S, max(RECHECK_TOLERANCE_MIN_S, RECHECK_TOLERANCE * budget_s))


def estimate_checkpoint_seconds(nbytes: int) -> float:
    """A checkpoint's write time before one has been timed: the plan must count them."""
    return CHECKPOINT_FIXED_S + nbytes / CHECKPOINT_BYTES_PER_S


def monitor_images_that_fit(budget_s: float, forward_img_s: float) -> int:
    """Bank + query images one kNN evaluation may use so that two of them (the start, which the
    run must beat, and the end) stay within MONITOR_MAX_SHARE of the budget, at the measured
    forward rate; never fewer than MONITOR_MIN_IMAGES."""
    return max(MONITOR_MIN_IMAGES, math.floor(MONITOR_MAX_SHARE / 2 * budget_s * max(forward_img_s, 1e-9)))


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
    """Time-based checkpoints written during `train_s` seconds of training."""
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

    def lr(self, step: float, config: TrainConfig) -> float:
        """The learning rate at `step`; 0 while a budget run is still timing its first steps (they
        measure speed, fill the queue and settle batch-norm statistics, and leave no trace)."""
        if not self.planned:
            return 0.0
        return lr_at(self.schedule_step(step), self.schedule_steps,
                     warmup_steps=round(config.warmup_epochs * self.steps_per_epoch), base=config.effective_lr,
                     schedule=config.lr_schedule)

    def momentum(self, step: float, config: TrainConfig) -> float:
        """The key encoder's momentum at `step`."""
        return momentum_at(self.schedule_step(step), self.schedule_steps, config.moco_m, config.moco_m_cos)

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


# -- the pacer ----------------------------------------------------------------------------------
def alone(value: float, op: str) -> float:
    """`Pacer`'s `agree` in a single process: its own value is everyone's."""
    return value


@dataclass
class Replan:
    """The safety net moved the plan's end at `step` from `was` to `total_steps`."""

    step: int
    was: int
    total_steps: int
    img_per_s: float  # the recent pace that decided it
    at_s: float  # seconds since process start

    @property
    def verb(self) -> str:
        return "shortened" if self.total_steps < self.was else "lengthened"

    def record(self) -> dict[str, Any]:
        """The form stored in `Plan.replans` (and, with `verb`, in metrics.jsonl)."""
        return {"step": self.step, "was": self.was, "total_steps": self.total_steps,
                "img_per_s": round(self.img_per_s, 2), "at_s": round(self.at_s, 1)}


class Pacer:
    """Keeps one session of a `--time-budget` run to its deadline: times the first steps
    (`time_step`), makes the plan (`make_plan`), then re-plans when the pace asks for it
    (`recheck`, the safety net).

    Time comes only from `clock` (monotonic seconds; `started` is process start on that clock,
    `elapsed` the training seconds of earlier sessions), so a test can drive it with a fake one.
    What the loop spends besides steps (kNN evaluations, checkpoints) it reports through
    `set_aside` and `checkpoint_written`: the pace leaves that time out, and the plan counts the
    evaluations and checkpoints still to come at their measured price. `agree(value, "max" |
    "min")` makes every process of a distributed run decide alike (each calls the same methods
    the same number of times). A resumed session keeps to the stored plan: it never starts the
    safety net, so `recheck` leaves the plan alone.

    `cost(fraction)`: a step's price at `fraction` of the schedule relative to a full one, for
    steps that grow dearer as the run goes (progressive resolution). The timing steps (at
    fraction 0) then give the price of a full step, the plan fits the summed prices of its
    steps to the budget, and the safety net measures the pace per full step, so a run whose
    later steps cost four times its first ones neither overruns nor sees a slowdown where
    there is none. None: every step costs the same (the timed pace is the pace).
    """

    def __init__(self, plan: Plan, *, clock: Callable[[], float], started: float, elapsed: float = 0.0,
                 batch_size: int, checkpoint_every_s: float, monitor: bool, compiled: bool = False,
                 agree: Callable[[float, str], float] = alone, wall: Callable[[], float] = time.time,
                 cost: Callable[[float], float] | None = None) -> None:
        self.plan = plan
        self.cost = cost
        self.clock, self.agree, self.wall = clock, agree, wall
        self.started = started
        self.batch_size, self.checkpoint_every_s = batch_size, checkpoint_every_s
        self.monitor, self.compiled = monitor, compiled
        self.loop_start = clock()
        self.deadline = started + plan.budget_s - elapsed if plan.budget_s is not None else math.inf
        self.overhead = 0.0  # seconds spent on evaluations and checkpoints, left out of the pace
        self.checkpoint_s: float | None = None  # the last checkpoint's write time
        self.step_s = 0.0  # seconds per step, as timed
        self.unit_s = 0.0  # seconds per full-price step (= step_s without a cost function)
        self.timed_steps = 0
        self._stamps: list[tuple[int, float]] = []  # (step, busy seconds) while timing steps
        self._planned_pace: tuple[int, float] = (0, 0.0)  # (step, busy seconds) where the timing began
        self._pace: deque[tuple[int, float]] = deque()  # (step, busy seconds) at the safety net's checks
        self._watching = False
        self._planned_at = 0.0
        self._eval_s = self._checkpoint_estimate = 0.0

    # -- what the loop reports ------------------------------------------------------------------
    def set_aside(self, seconds: float) -> None:
        """Seconds spent on something other than training steps (a kNN evaluation)."""
        self.overhead += seconds

    def checkpoint_written(self, seconds: float) -> None:
        """A checkpoint took `seconds`: left out of the pace, and the price of the ones to come."""
        self.checkpoint_s = seconds
        self.overhead += seconds

    # -- timing and planning ----------------------------------------------------------------------
    def time_step(self, step: int) -> float | None:
        """Called after each step until the plan exists: seconds per step once enough steps are
        timed (None while still timing).

        The first steps are left out (allocation, autotuning, compilation); the time of the
        rest counts everything a step costs in the loop, data loading included, but not
        checkpoints. Steps that are very slow end the timing early rather than eat the budget.
        """
        now = self.clock()
        budget = self.plan.budget_s
        self._stamps.append((step, now - self.overhead))
        skip = MEASURE_SKIP_STEPS_COMPILED if self.compiled else MEASURE_SKIP_STEPS
        timed = self._stamps[skip - 1:]  # from the end of the last untimed step
        timed_steps = len(timed) - 1
        enough = timed_steps >= MEASURE_MIN_STEPS and timed[-1][1] - timed[0][1] >= measure_seconds(budget)
        # (the monitor's first evaluation may come before the timing: its time is not the steps')
        spent, left = now - self.overhead - self.loop_start, self.deadline - self.loop_start
        give_up = ((timed_steps >= MEASURE_GIVE_UP_MIN_STEPS
                    and spent >= max(2 * measure_seconds(budget), MEASURE_GIVE_UP_FRACTION * left))
                   or spent >= MEASURE_LIMIT_FRACTION * left)
        if not self.agree(float(enough or give_up), "max"):
            return None
        if len(timed) >= 2:
            first, last = timed[0], timed[-1]
        elif len(self._stamps) >= 2:
            first, last = self._stamps[-2], self._stamps[-1]
        else:  # one step in all: its whole time, start-up of the loop included (pessimistic)
            first, last = (step - 1, self.loop_start), self._stamps[-1]
        self.timed_steps = max(1, last[0] - first[0])
        step_s = max(1e-6, (last[1] - first[1]) / self.timed_steps)
        self.step_s = self.agree(step_s, "max")  # the slowest process sets the pace
        self.unit_s = self.step_s if self.cost is None else self.step_s / self.cost(0.0)
        return self.step_s

    def make_plan(self, step: int, *, eval_s: float, evals_wanted: int, state_bytes: int) -> int:
        """Fit the steps from `step` on to the budget, at the timed pace: `eval_s` is the price of
        one kNN evaluation (of which `evals_wanted` are asked for), `state_bytes` the size of what a
        checkpoint writes. Stores the plan and what it was made of in `plan`; returns its steps."""
        plan, budget, step_s = self.plan, self.plan.budget_s, self.step_s
        checkpoint_s = estimate_checkpoint_seconds(state_bytes)
        evals = plan_monitor_evals(evals_wanted, eval_s, budget) if self.monitor else 0
        now = self.clock()
        every_s = self.checkpoint_every_s

        def fit(seconds_per_step: float) -> int:
            return plan_steps(self.deadline - now, step_s=seconds_per_step, eval_s=eval_s, evals=evals,
                              checkpoint_s=checkpoint_s, checkpoints=2, checkpoint_every_s=every_s,
                              margin_s=margin_seconds(budget))

        steps = fit(step_s)
        if self.cost is not None:  # the steps' mean price over the schedule, then over exactly that many
            step_s = self.unit_s * mean_cost(self.cost, 0.0)
            steps = fit(step_s)
            if steps:
                exact = self.unit_s * sum(self.cost((i + 1) / steps) for i in range(steps)) / steps
                steps, step_s = min(steps, fit(exact)), max(step_s, exact)
        steps = int(self.agree(steps, "min"))
        plan.total_steps, plan.schedule_start, plan.schedule_steps = step + steps, step, steps
        plan.monitor_evals = evals if steps else 0
        train_s = steps * step_s
        expected = (now - self.started + train_s + evals * eval_s
                    + checkpoint_s * (2 + periodic_checkpoints(train_s, every_s)))
        wall_start = self.wall() - (now - self.started)
        plan.measured = {
            "img_per_s": round(self.batch_size / self.step_s, 2), "step_s": self.step_s,
            "timed_steps": self.timed_steps,
            "eval_s": round(eval_s, 3), "checkpoint_s": round(checkpoint_s, 3),
            "planned_at_step": step, "planned_at_s": round(now - self.started, 2),
            "expected_end_s": round(expected, 1),
            "started_at": datetime.fromtimestamp(wall_start).isoformat(timespec="seconds"),
            "expected_end": datetime.fromtimestamp(wall_start + expected).isoformat(timespec="seconds"),
        }
        if self.cost is not None:
            plan.measured["full_step_s"] = self.unit_s  # the timed pace at the full price
            plan.measured["mean_step_s"] = step_s  # ... and at the planned steps' mean price
        self._planned_at, self._eval_s, self._checkpoint_estimate = now, eval_s, checkpoint_s
        return steps

    def recheck_due(self, step: int, log_every: int) -> bool:
        """Whether the loop should call `recheck` after `step`: about every RECHECK_EVERY_S seconds
        of steps at the timed pace (every step when a step takes longer), at least every
        `log_every` steps. A function of the step and the agreed timed pace only, so every
        process of a distributed run rechecks at the same steps."""
        every = max(1, min(max(1, log_every), math.floor(RECHECK_EVERY_S / max(self.step_s, 1e-9))))
        return step % every == 0

    def summary(self) -> str:
        """The plan in words, for the console."""
        plan, measured, steps = self.plan, self.plan.measured, self.plan.schedule_steps
        monitor = f", kNN monitor {plan.monitor_evals} more x {self._eval_s:.1f} s" if self.monitor else ""
        text = (f"plan: {steps} steps ({steps / plan.steps_per_epoch:.2f} epochs of {plan.steps_per_epoch} "
                f"steps) in the {format_duration(plan.budget_s)} budget: {measured['img_per_s']:.1f} img/s "
                f"timed over {self.timed_steps} steps{monitor}, checkpoints ~{self._checkpoint_estimate:.1f} s; "
                f"expected end {measured['expected_end'][11:]} "
                f"(started {measured['started_at'][11:]}, {self._planned_at - self.started:.0f} s ago)")
        if self.cost is not None:
            text += (f"; steps priced by resolution: {self.batch_size / max(1e-9, self.unit_s):.1f} img/s at the "
                     f"full size, {self.batch_size / max(1e-9, measured['mean_step_s']):.1f} over the plan")
        if steps == 0:
            text += "\nwarning: start-up and timing used up the time budget; ending with the steps done"
        return text

    # -- the safety net -----------------------------------------------------------------------------
    def start_safety_net(self, step: int) -> None:
        """The plan is made (and its first checkpoint written): from here `recheck` keeps the run
        to the budget, measuring the pace from here (the timing steps are left out)."""
        self._planned_pace = (step, self.clock() - self.overhead)
        self._pace = deque([self._planned_pace])
        self._watching = True

    def recheck(self, step: int) -> Replan | None:
        """Re-measure the pace at `step` and re-plan if the run would end past its budget or
        well before it (`decide`); the plan's schedules are compressed or stretched to complete
        at the new end. Returns the change, or None."""
        if not self._watching:
            return None
        plan = self.plan
        now = self.clock()
        busy = now - self.overhead
        self._pace.append((step, busy))
        window = self._window()
        while len(self._pace) > 2 and busy - self._pace[1][1] >= window:
            self._pace.popleft()
        first_step, first_busy = self._pace[0]
        recent_s = self._per_step(busy - first_busy, first_step, step)
        new_total = plan.total_steps
        if step - self._planned_pace[0] >= RECHECK_MIN_STEPS and step > first_step and plan.total_steps > step:
            since_plan_s = self._per_step(busy - self._planned_pace[1], self._planned_pace[0], step)
            new_total = self.decide(step, now, recent_s=recent_s, since_plan_s=since_plan_s)
        # Every process takes part (the same number of times), and all follow the most cautious.
        new_total = int(self.agree(new_total, "min"))
        if new_total == plan.total_steps:
            return None
        change = Replan(step=step, was=plan.total_steps, total_steps=new_total,
                        img_per_s=self.batch_size / max(1e-9, recent_s), at_s=now - self.started)
        plan.replan(step, new_total)
        plan.replans.append(change.record())
        return change

    def decide(self, step: int, now: float, *, recent_s: float, since_plan_s: float) -> int:
        """The plan's last step, given the seconds per step over the last few minutes
        (`recent_s`) and since the plan was made (`since_plan_s`), at time `now` (per full-price
        step, with a cost function).

        Shortening follows the recent pace (the machine got slower) once the pace since the plan
        agrees, or on its own near the deadline (TRUST_RECENT_WINDOWS). Lengthening is for
        a plan timed on first steps that were slower than the steady state (a warming cache, a
        busy disk): it needs both paces to be ahead, plans with the slower of the two, and
        happens only while most of the schedule is ahead, so a noisy fast minute does not
        stretch a plan that the next slow one shortens again.
        """
        plan, budget = self.plan, self.plan.budget_s
        tolerance = recheck_tolerance(budget)
        final_stretch = self.deadline - now <= TRUST_RECENT_WINDOWS * self._window()
        if self._projected_late(step, now, recent_s) > tolerance and (
                final_stretch or self._projected_late(step, now, since_plan_s) > tolerance):
            return min(plan.total_steps, step + self._steps_that_fit(step, now, recent_s))
        if plan.schedule_step(step) <= EXTEND_UNTIL_FRACTION * plan.schedule_steps:
            step_s = max(recent_s, since_plan_s)
            if -self._projected_late(step, now, step_s) > margin_seconds(budget) + tolerance:
                return max(plan.total_steps, step + self._steps_that_fit(step, now, step_s))
        return plan.total_steps

    def replan_summary(self, change: Replan) -> str:
        """A re-plan in words, for the console."""
        behind = "behind" if change.verb == "shortened" else "ahead of"
        timed, priced = self.plan.measured["img_per_s"], ""
        if self.cost is not None:  # both paces per full-price step
            timed, priced = self.batch_size / max(1e-9, self.unit_s), " at the full size"
        return (f"{behind} the plan: {change.img_per_s:.1f} img/s{priced} now against {timed:.1f} "
                f"timed; {change.verb} from {change.was} to {change.total_steps} steps to end within the "
                f"{format_duration(self.plan.budget_s)} budget (LR and momentum schedules now complete at step "
                f"{change.total_steps})")

    def _window(self) -> float:
        return max(RECHECK_WINDOW_MIN_S, RECHECK_WINDOW_FRACTION * self.plan.budget_s)

    def _remaining_costs(self, step: int) -> tuple[float, int, float, float]:
        """(seconds per kNN evaluation, evaluations left, seconds per checkpoint, checkpoint
        interval in seconds): what the rest of the run costs besides its steps."""
        plan = self.plan
        eval_s = plan.measured.get("eval_s", 0.0) if self.monitor else 0.0
        evals = plan.evals_left(step) if self.monitor else 0
        checkpoint_s = self.checkpoint_s or plan.measured.get("checkpoint_s", 0.0)
        return eval_s, evals, checkpoint_s, self.checkpoint_every_s

    def _projected_late(self, step: int, now: float, step_s: float) -> float:
        """Seconds past the deadline the plan would end at `step_s` per step (negative: early)."""
        eval_s, evals, checkpoint_s, every_s = self._remaining_costs(step)
        train_s = self._cost_between(step, self.plan.total_steps) * step_s
        projected = (now + train_s + evals * eval_s + FINISH_S
                     + checkpoint_s * (1 + periodic_checkpoints(train_s, every_s)))
        return projected - self.deadline

    def _steps_that_fit(self, step: int, now: float, step_s: float) -> int:
        eval_s, evals, checkpoint_s, every_s = self._remaining_costs(step)
        if self.cost is not None:  # a re-plan spreads the rest of the schedule over the new steps
            step_s *= mean_cost(self.cost, self._fraction(step))
        return plan_steps(self.deadline - now, step_s=step_s, eval_s=eval_s, evals=evals, checkpoint_s=checkpoint_s,
                          checkpoints=1, checkpoint_every_s=every_s, margin_s=margin_seconds(self.plan.budget_s))

    # -- steps of unequal price (a cost function) -------------------------------------------------
    def _fraction(self, step: float) -> float:
        plan = self.plan
        if not plan.planned or not plan.schedule_steps:
            return 0.0
        return plan.schedule_step(step) / plan.schedule_steps

    def _cost_between(self, first: int, last: int) -> float:
        """The summed price of the steps after `first` up to `last` (`last - first` without a
        cost function); step i (counting from 0) is priced where the schedule stands when it is
        done (at i + 1), as `moco.train` sizes it."""
        if self.cost is None:
            return last - first
        return sum(self.cost(self._fraction(i + 1)) for i in range(first, last))

    def _per_step(self, seconds: float, first: int, last: int) -> float:
        """`seconds` spent on the steps after `first` up to `last`, per (full-price) step."""
        if self.cost is None:
            return seconds / max(1, last - first)
        return seconds / max(1e-9, self._cost_between(first, last)) if last > first else seconds


def mean_cost(cost: Callable[[float], float], start: float, samples: int = 256) -> float:
    """The mean of `cost` over the schedule from `start` (a fraction) to its end."""
    width = (1.0 - start) / samples
    return sum(cost(start + (k + 0.5) * width) for k in range(samples)) / samples
