"""Training to a time budget: parsing, planning arithmetic, schedules that complete, the pacer
(timing, plan, safety net) driven by a fake clock, and tiny real runs that keep to their budget
and plan."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moco.pacer
from moco.__main__ import main
from moco.checkpoint import load_checkpoint, quality_of
from moco.config import build_config
from moco.pacer import (
    Pacer,
    Plan,
    format_duration,
    margin_seconds,
    parse_duration,
    plan_monitor_evals,
    plan_steps,
)
from moco.train import Trainer

FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last"]


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


# -- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("2h", 7200), ("90s", 90), ("1h30m", 5400),
                                           ("1.5h", 5400), ("1h0m30s", 3630), (" 20S ", 20)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


def test_durations_format():
    assert [format_duration(s) for s in (1800, 5400, 90, 20, 7200)] == ["30m", "1h30m", "1m30s", "20s", "2h"]


@pytest.mark.parametrize("text, needle", [("5x", "not a duration"), ("0s", "no time at all"),
                                          ("30", "not a duration"), ("m", "not a duration"),
                                          ("-5m", "not a duration"), ("30m1h", "not a duration"),
                                          ("0h0m", "no time at all")])
def test_bad_budgets_are_one_line_and_exit_2(text, needle, image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(image_folder), "--out", str(tmp_path / "run"), f"--time-budget={text}"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()


def test_epochs_and_a_budget_exclude_each_other(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(image_folder), "--epochs", "3", "--time-budget", "1m"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys, "not allowed with argument")
    assert main(["train", str(image_folder), "--out", str(tmp_path / "r"), "--time-budget", "1m",
                 "--eval-every", "2"]) == 2
    assert_one_line_error(capsys, "--eval-every counts epochs")


# -- planning arithmetic -------------------------------------------------------------------------------
def test_plan_steps_takes_fixed_costs_off_then_divides_by_the_step_time():
    # 100 s - 2 evaluations x 5 s - 2 checkpoints x 1 s - 2 s margin = 86 s at 0.5 s per step
    assert plan_steps(100, step_s=0.5, eval_s=5, evals=2, checkpoint_s=1, checkpoints=2, margin_s=2) == 172
    # an hour, 10 s checkpoints every 10 minutes: 3590 s of training holds 5 of them
    assert plan_steps(3600, step_s=1, checkpoint_s=10, checkpoints=1, checkpoint_every_s=600) == 3540
    assert plan_steps(5, step_s=1, eval_s=10, evals=1) == 0  # nothing left: no steps, never negative
    with pytest.raises(ValueError):
        plan_steps(10, step_s=0)


def test_monitor_evaluations_keep_within_their_share_of_the_budget():
    assert plan_monitor_evals(6, eval_s=1.0, budget_s=1800) == 6
    assert plan_monitor_evals(6, eval_s=60.0, budget_s=1800) == 2  # 180 s share: the first plus 2 more
    assert plan_monitor_evals(6, eval_s=500.0, budget_s=1800) == 1  # the final one always
    assert margin_seconds(1800) == pytest.approx(18 + 3)


def test_budget_schedules_complete_at_the_planned_last_step():
    config = build_config({"warmup_epochs": 1.0})  # 10 steps of warm-up at 10 steps per epoch
    plan = Plan.for_budget(600, steps_per_epoch=10)
    assert plan.lr(3, config) == 0.0  # timing steps, before the plan exists, learn nothing
    plan.total_steps, plan.schedule_start, plan.schedule_steps = 505, 5, 500
    base = config.effective_lr
    assert plan.lr(5, config) == pytest.approx(base / 10)  # the warm-up starts after the timing steps
    assert plan.lr(14, config) == pytest.approx(base)
    assert plan.lr(504, config) < 1e-3 * base and plan.lr(505, config) == 0.0
    lrs = [plan.lr(s, config) for s in range(14, 506)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    config.moco_m_cos = True
    assert plan.momentum(5, config) == pytest.approx(config.moco_m) and plan.momentum(505, config) == pytest.approx(1.0)

    plan.monitor_evals = 4
    due = [s for s in range(6, 506) if plan.eval_due(s)]
    assert len(due) == 4 and due[-1] == 505

    # shortened at step 200: the schedules keep their value there and complete at the new end
    before = plan.lr(200, config)
    plan.replan(200, 300)
    assert plan.lr(200, config) == pytest.approx(before)
    assert plan.lr(299, config) < 0.02 * base and plan.lr(300, config) == 0.0
    lrs = [plan.lr(s, config) for s in range(14, 301)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    due = [s for s in range(6, 301) if plan.eval_due(s)]
    assert len(due) == 4 and due[-1] == 300
    assert Plan.from_dict(plan.to_dict(), 10) == plan


def test_an_epochs_plan_is_the_plain_schedule():
    plan = Plan.for_epochs(3, steps_per_epoch=7)
    assert plan.total_steps == 21 and plan.epochs == 3 and plan.schedule_step(13) == 13.0
    assert not any(plan.eval_due(s) for s in range(22))  # --epochs runs evaluate at epoch ends


class FakeClock:
    """Seconds that move only when the test moves them."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the pacer: timing and planning ------------------------------------------------------------------
def test_the_pacer_times_steps_after_the_first_ones_and_leaves_evaluations_out():
    clock = FakeClock(0.0)  # the loop starts 5 s after the process
    plan = Plan.for_budget(1000.0, steps_per_epoch=100)
    pacer = Pacer(plan, clock=clock, started=-5.0, batch_size=8, checkpoint_every_s=600, monitor=True)
    clock.now = 3.0  # the first two steps pay for allocation and autotuning: not timed
    assert pacer.time_step(1) is None
    clock.now = 5.0
    assert pacer.time_step(2) is None
    for step in range(3, 12):  # then 1 s per step, with a 4 s evaluation after step 6 left out
        clock.now += 1.0
        assert pacer.time_step(step) is None  # 10 s of timing for a 1000 s budget: not yet
        if step == 6:
            clock.now += 4.0
            pacer.set_aside(4.0)
    clock.now += 1.0
    assert pacer.time_step(12) == pytest.approx(1.0) and pacer.timed_steps == 10

    # 1 s per step; 6 evaluations of 2 s; checkpoints of 0.2 s + 200 MB at 200 MB/s, two fixed
    # and one for the 10-minute interval; the 13 s margin; from second 19 to the deadline at 995
    steps = pacer.make_plan(12, eval_s=2.0, evals_wanted=6, state_bytes=200_000_000)
    assert steps == int(995 - 19 - 6 * 2.0 - 2 * 1.2 - 13 - 1.2)
    assert (plan.total_steps, plan.schedule_start, plan.schedule_steps) == (12 + steps, 12, steps)
    assert plan.monitor_evals == 6
    assert plan.measured["img_per_s"] == 8.0 and plan.measured["checkpoint_s"] == 1.2
    assert plan.measured["expected_end_s"] == pytest.approx(24 + steps + 6 * 2.0 + 3 * 1.2)
    summary = pacer.summary()
    assert summary.startswith(f"plan: {steps} steps (9.47 epochs of 100 steps) in the 16m40s budget: 8.0 img/s")
    assert "timed over 10 steps, kNN monitor 6 more x 2.0 s, checkpoints ~1.2 s" in summary
    assert plan.lr(12, build_config({})) > 0.0


def test_very_slow_steps_end_the_timing_early_but_never_on_one_step():
    # a 1000 s budget times for at most 10% of what is left after the loop started (100 s), once
    # two steps past the untimed first ones are timed: one step's time is too noisy to plan on
    clock = FakeClock(0.0)
    pacer = Pacer(Plan.for_budget(1000.0, 10), clock=clock, started=0.0, batch_size=8, checkpoint_every_s=600,
                  monitor=False)
    for step in (1, 2, 3):
        clock.now = 60.0 * step
        assert pacer.time_step(step) is None  # 180 s in, but only one step timed
    clock.now = 240.0
    assert pacer.time_step(4) == 60.0 and pacer.timed_steps == 2

    # steps so slow that timing two would take over a quarter of the budget: plan with what there is
    clock = FakeClock(0.0)
    pacer = Pacer(Plan.for_budget(1000.0, 10), clock=clock, started=0.0, batch_size=8, checkpoint_every_s=600,
                  monitor=False)
    clock.now = 150.0
    assert pacer.time_step(1) is None
    clock.now = 300.0
    assert pacer.time_step(2) == 150.0 and pacer.timed_steps == 1


def test_the_slowest_process_sets_the_pace_and_the_fewest_steps_win():
    agreed = []

    def agree(value: float, op: str) -> float:  # another process is twice as slow and plans fewer steps
        agreed.append(op)
        return {"max": max(value, 2.0 * value), "min": min(value, 300)}[op]

    clock = FakeClock(0.0)
    plan = Plan.for_budget(1000.0, 10)
    pacer = Pacer(plan, clock=clock, started=0.0, batch_size=8, checkpoint_every_s=600, monitor=False, agree=agree)
    for step in range(1, 15):
        clock.now = float(step)
        if (step_s := pacer.time_step(step)) is not None:
            break
    assert step_s == 2.0 and agreed[-2:] == ["max", "max"]
    assert pacer.make_plan(step, eval_s=0.0, evals_wanted=0, state_bytes=0) == 300 and plan.total_steps == step + 300


# -- the pacer: the safety net ------------------------------------------------------------------------
def planned_pacer(total_steps: int, timed_img_per_s: float) -> tuple[Pacer, FakeClock]:
    """A 1000 s budget run of batch 8, planned at step 0 and second 0 for `total_steps`; the
    safety net watches from there."""
    config = build_config({"time_budget": 1000.0, "batch_size": 8})
    plan = Plan(mode="budget", steps_per_epoch=10, total_steps=total_steps, schedule_steps=total_steps,
                budget_s=1000.0, measured={"img_per_s": timed_img_per_s, "eval_s": 0.0, "checkpoint_s": 0.0})
    clock = FakeClock(0.0)
    pacer = Pacer(plan, clock=clock, started=0.0, batch_size=config.batch_size,
                  checkpoint_every_s=config.checkpoint_every * 60, monitor=False)
    pacer.start_safety_net(0)
    return pacer, clock


def test_the_safety_net_shortens_a_run_that_fell_behind():
    pacer, clock = planned_pacer(total_steps=1000, timed_img_per_s=8.0)
    plan = pacer.plan

    clock.now = 100.0  # on pace: 1 s per step
    assert pacer.recheck(100) is None
    assert plan.total_steps == 1000 and not plan.knots

    clock.now = 200.0  # 2 s per step since: late
    change = pacer.recheck(150)
    # 2 s per step over the last 50 s (5% of the budget); 800 s left, less the 13 s margin
    assert plan.total_steps == 150 + int((800 - 13) / 2)
    assert plan.knots == [[150, 150.0]] and plan.replans[0]["was"] == 1000
    assert "shortened from 1000 to 543 steps" in pacer.replan_summary(change)
    assert change.verb == "shortened" and change.record()["total_steps"] == 543
    assert plan.lr(plan.total_steps, build_config({})) == 0.0


def test_a_passing_dip_shortens_only_near_the_deadline():
    pacer, clock = planned_pacer(total_steps=900, timed_img_per_s=8.0)  # 1 s per step planned
    plan = pacer.plan

    # mid-run, 3 s per step over the last minute but 1.1 s per step since timing began: a dip on a
    # shared machine, not a slower machine; the plan (which cannot grow again later) is kept
    assert pacer.decide(420, 460.0, recent_s=3.0, since_plan_s=460 / 420) == 900
    # the same, measured by the pacer: on pace to step 480 (past half: not lengthened), then 20
    # steps at 3 s per step
    clock.now = 480.0
    assert pacer.recheck(480) is None
    clock.now = 540.0
    assert pacer.recheck(500) is None
    assert plan.total_steps == 900 and not plan.knots and not plan.replans

    # the same dip within four windows (200 s) of the deadline shortens on the recent pace alone
    clock.now = 760.0
    assert pacer.recheck(780) is None  # ahead of the plan, in its second half: left alone
    clock.now = 820.0
    change = pacer.recheck(800)  # 3 s per step over the last minute
    assert plan.total_steps == 800 + int((180 - 13) / 3)  # 180 s left, less the 13 s margin
    assert change.verb == "shortened" and "shortened from 900 to 855 steps" in pacer.replan_summary(change)


def test_the_safety_net_lengthens_a_plan_timed_on_slow_first_steps_only_early():
    config = build_config({})
    pacer, clock = planned_pacer(total_steps=500, timed_img_per_s=4.0)
    plan = pacer.plan

    # planned at 2 s per step, running at 1 s: 400 steps left would end at 500 s of 1000
    clock.now = 100.0
    change = pacer.recheck(100)
    assert plan.total_steps == 100 + int((900 - 13) / 1)  # to the deadline less the 13 s margin
    assert plan.knots == [[100, 100.0]] and change.verb == "lengthened"
    assert "lengthened from 500 to 987 steps" in pacer.replan_summary(change)
    assert plan.lr(plan.total_steps, config) == 0.0 and plan.lr(500, config) > 0.0

    # past half of the schedule an early end is left alone (the LR is already decaying)
    pacer, clock = planned_pacer(total_steps=500, timed_img_per_s=4.0)
    clock.now = 300.0
    assert pacer.recheck(300) is None
    assert pacer.plan.total_steps == 500 and not pacer.plan.knots

    # within the margin and tolerance of the deadline: no change (no chasing of timing noise)
    pacer, clock = planned_pacer(total_steps=985, timed_img_per_s=4.0)
    clock.now = 100.0
    assert pacer.recheck(100) is None
    assert pacer.plan.total_steps == 985 and not pacer.plan.knots

    # a fast last stretch alone does not lengthen: the pace since timing began must agree
    pacer, clock = planned_pacer(total_steps=550, timed_img_per_s=4.0)
    # 1 s per step lately, 1.9 s per step since timing began
    assert pacer.decide(100, 190.0, recent_s=1.0, since_plan_s=1.9) == 550
    assert pacer.decide(100, 190.0, recent_s=1.0, since_plan_s=1.0) > 550  # (both fast: lengthened)


def run_on_fake_clock(budget_s: float, step_seconds, *, loop_start: float = 8.0,
                      checkpoint_s: float = 0.3) -> tuple[int, float, Plan]:
    """Drive a Pacer as `moco.train` does (time the first steps, plan, write a checkpoint, then
    recheck when due) with steps that take `step_seconds(step, now)` on a fake clock; returns
    the steps done, the end (final checkpoint written) in seconds since process start, and the plan."""
    clock = FakeClock(loop_start)
    plan = Plan.for_budget(budget_s, steps_per_epoch=4)
    pacer = Pacer(plan, clock=clock, started=0.0, batch_size=256, checkpoint_every_s=600, monitor=False)
    step = 0
    while not plan.planned:
        step += 1
        clock.now += step_seconds(step, clock.now)
        if pacer.time_step(step) is not None:
            pacer.make_plan(step, eval_s=0.0, evals_wanted=0, state_bytes=0)
            clock.now += checkpoint_s
            pacer.checkpoint_written(checkpoint_s)
            pacer.start_safety_net(step)
    while step < plan.total_steps:
        step += 1
        clock.now += step_seconds(step, clock.now)
        if pacer.recheck_due(step, log_every=10):
            pacer.recheck(step)
    return step, clock.now + checkpoint_s, plan


def test_slow_first_steps_then_fast_use_the_whole_budget():
    # issue 17: a 45 s budget timed on slow first steps (2.5 s, a busy start) planned a few
    # steps and ended after 12 s; the steady pace (0.6 s) must fill the budget instead
    steps, end, plan = run_on_fake_clock(45.0, lambda step, now: 2.5 if step <= 4 else 0.6)
    assert plan.measured["timed_steps"] >= 2
    assert plan.replans and plan.replans[0]["was"] < plan.replans[-1]["total_steps"]
    assert 45.0 - margin_seconds(45.0) - 2.0 <= end <= 45.0, end
    assert steps >= 35  # ~ (45 - 8 s start-up - timing - margin) / 0.6
    # a 150 s budget whose timing steps took 12 s each and the rest 2.3 s
    steps, end, _ = run_on_fake_clock(150.0, lambda step, now: 12.0 if step <= 3 else 2.3)
    assert 150.0 - margin_seconds(150.0) - 3.0 <= end <= 150.0, end


def test_a_machine_that_slows_down_still_ends_on_time():
    steps, end, plan = run_on_fake_clock(300.0, lambda step, now: 1.0 if now < 150 else 3.0)
    assert plan.replans and plan.replans[0]["total_steps"] < plan.replans[0]["was"]
    assert 300.0 - margin_seconds(300.0) - 10.0 <= end <= 300.0, end


def test_a_busy_machine_uses_the_budget_and_ends_on_time():
    # a second training process comes and goes: each step takes 1, 3 or 8 s at random
    rng = random.Random(0)
    steps, end, plan = run_on_fake_clock(180.0, lambda step, now: rng.choice([1.0, 3.0, 8.0]))
    assert 0.85 * 180.0 <= end <= 180.0 + 8.0, end  # at worst one step past the deadline
    rng = random.Random(1)
    steps, end, plan = run_on_fake_clock(600.0, lambda step, now: rng.uniform(2.0, 20.0))
    assert 0.85 * 600.0 <= end <= 600.0 + 20.0, end


def test_the_pace_is_rechecked_every_step_when_steps_are_slow():
    pacer, _ = planned_pacer(total_steps=4, timed_img_per_s=1.0)
    pacer.step_s = 8.0  # as timed: one step every 8 s
    assert all(pacer.recheck_due(step, log_every=10) for step in range(1, 5))
    pacer.step_s = 0.05  # fast steps: every 10 (2 s of them would be 40 steps; --log-every caps it)
    assert [s for s in range(1, 31) if pacer.recheck_due(s, log_every=10)] == [10, 20, 30]
    pacer.step_s = 0.5
    assert [s for s in range(1, 13) if pacer.recheck_due(s, log_every=10)] == [4, 8, 12]


def test_a_resumed_session_keeps_to_the_stored_plan():
    plan = Plan(mode="budget", steps_per_epoch=10, total_steps=500, schedule_steps=500, budget_s=1000.0,
                measured={"img_per_s": 4.0, "eval_s": 0.0, "checkpoint_s": 0.0})
    clock = FakeClock(0.0)
    pacer = Pacer(plan, clock=clock, started=0.0, elapsed=400.0, batch_size=8, checkpoint_every_s=600,
                  monitor=False)
    assert pacer.deadline == 600.0  # what the first session left of the budget
    for step in (100, 200):  # 1 s per step, far ahead of the 2 s it was planned at: not its plan
        clock.now = float(step)
        assert pacer.recheck(step) is None
    assert plan.total_steps == 500 and not plan.knots


# -- real runs --------------------------------------------------------------------------------------
def test_a_budget_run_ends_in_time_and_stores_its_plan(tmp_path):
    from tests.moco.conftest import make_image_folder

    train = make_image_folder(tmp_path / "train", per_class=8)
    val = make_image_folder(tmp_path / "val", per_class=4, seed=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moco", "train", str(train), "--out", str(run), *FAST, "--time-budget", "20s",
           "--val", str(val)]
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          cwd=Path(__file__).resolve().parents[2], timeout=180)
    wall = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert wall <= 20 + 45, wall  # the budget, plus the allowance for start-up
    assert "plan: " in proc.stdout and "of the 20s budget" in proc.stdout

    state = load_checkpoint(run)
    plan, config = state["plan"], state["config"]
    assert plan["mode"] == "budget" and plan["budget_s"] == 20.0
    assert plan["total_steps"] == state["progress"]["step"] >= 1
    assert plan["measured"]["img_per_s"] > 0 and plan["measured"]["expected_end"]
    assert state["progress"]["elapsed"] <= 20 + 15  # process start to final checkpoint (a busy machine)
    assert config["time_budget"] == 20.0 and config["epochs"] >= 1
    records = records_of(run)
    assert [r["kind"] for r in records].count("plan") >= 1 and records[-1]["kind"] == "done"
    assert any("knn_top1" in r for r in records)
    assert (run / "monitor.png").read_bytes()[:4] == b"\x89PNG"
    # the monitor measured the random network before any step, and the final one at the end
    start = next(r for r in records if r["kind"] == "eval")
    assert start["step"] == 0 and start["start"] is True
    quality = quality_of(state)
    assert quality["start"] == start["knn_top1"] and quality["end_step"] == state["progress"]["step"]
    assert quality["end"] is not None and quality["verdict"] in ("learned", "not_learned")
    assert "the model shipped is the" in quality["reason"]


def test_a_resumed_budget_run_keeps_its_plan_and_finishes_it(image_folder, tmp_path, monkeypatch, capsys):
    # Plan after two steps, for exactly four more, whatever this machine's speed.
    monkeypatch.setattr(moco.pacer, "MEASURE_SKIP_STEPS", 1)
    monkeypatch.setattr(moco.pacer, "MEASURE_MIN_STEPS", 1)
    monkeypatch.setattr(moco.pacer, "measure_seconds", lambda budget: 0.0)
    monkeypatch.setattr(moco.pacer, "plan_steps", lambda *args, **kwargs: 4)
    monkeypatch.setattr(moco.pacer, "EXTEND_UNTIL_FRACTION", -1.0)  # 4 steps in 10 minutes: never lengthen
    original = Trainer.train_step

    def die_after_the_plan(self, batch):
        if self.plan.planned and self.progress.step == self.plan.schedule_start + 1:
            raise KeyboardInterrupt  # killed, one step into the plan (checkpointed every step)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", die_after_the_plan)
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--time-budget", "10m",
                 "--checkpoint-every", "0"]) == 130
    crashed = load_checkpoint(run)
    assert crashed["progress"]["step"] == 3 and crashed["plan"]["total_steps"] == 6
    # the adjusted defaults are in the checkpoint config (Contract 1)
    assert crashed["config"]["moco_m"] == 0.9 and any(n.startswith("moco_m 0.999 -> 0.9") for n in
                                                        crashed["config"]["notes"])
    assert "plan: 4 steps" in capsys.readouterr().out

    monkeypatch.setattr(Trainer, "train_step", original)
    monkeypatch.setattr(moco.pacer, "plan_steps", lambda *args, **kwargs: 1000)  # a re-plan would show
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 3 of the 6 planned steps" in out and "plan: " not in out
    finished = load_checkpoint(run)
    assert finished["progress"]["step"] == 6
    assert {k: v for k, v in finished["plan"].items()} == crashed["plan"]
    assert finished["config"]["moco_m"] == 0.9

    assert main(["train", "--resume", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--epochs", "5"]) == 2
    assert_one_line_error(capsys, "planned for a 10m time budget")
    assert main(["train", "--resume", str(run), "--time-budget", "5m"]) == 2
    assert_one_line_error(capsys, "keeps to the run's stored plan")
