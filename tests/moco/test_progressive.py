"""Progressive resolution (--progressive): the size schedule, the views at a given size, the
pacer planning steps that grow dearer (fake clock), and tiny real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moco.__main__ import main
from moco.batch_augment import BatchTwoViews
from moco.checkpoint import load_checkpoint
from moco.pacer import Pacer, Plan, margin_seconds
from moco.progressive import RAMP_END, progressive_size, relative_cost

FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last"]


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- the schedule -----------------------------------------------------------------------------------
def test_the_size_rises_from_low_to_full_by_the_ramp_end_in_multiples():
    fractions = [i / 200 for i in range(201)]
    sizes = [progressive_size(f, 64, 0.5) for f in fractions]
    assert sizes[0] == 32 and sizes[-1] == 64
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(s % 8 == 0 for s in sizes)
    assert {progressive_size(f, 64, 0.5) for f in fractions if f >= RAMP_END} == {64}
    assert progressive_size(RAMP_END - 0.1, 64, 0.5) < 64
    assert len(set(sizes)) == 5  # 32, 40, 48, 56, 64
    small = [progressive_size(f, 32, 0.5) for f in fractions]
    assert small[0] == 16 and small[-1] == 32 and all(s % 4 == 0 for s in small) and len(set(small)) == 5


def test_off_is_always_the_full_size_and_sizes_never_drop_below_8():
    assert {progressive_size(f, 64, 0.0) for f in (0.0, 0.3, 1.0)} == {64}
    assert progressive_size(0.0, 16, 0.1) == 8
    assert relative_cost(0.0, 64, 0.5) == 0.25 and relative_cost(1.0, 64, 0.5) == 1.0


def test_the_batched_views_come_out_at_the_asked_size_and_the_default_is_unchanged():
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    sizes = torch.tensor([[40, 48], [36, 40], [40, 44], [38, 48]])
    views = BatchTwoViews("v2", 32, 0.2, blur_relative=True)
    a = views(images, sizes, torch.Generator().manual_seed(3))
    b = views(images, sizes, torch.Generator().manual_seed(3), size=None)
    small = views(images, sizes, torch.Generator().manual_seed(3), size=16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [tuple(v.shape) for v in small] == [(4, 3, 16, 16)] * 2
    assert [tuple(v.shape) for v in a] == [(4, 3, 32, 32)] * 2


# -- the pacer with steps that grow dearer (fake clock) --------------------------------------------------
class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fraction(plan: Plan, step: int) -> float:
    if not plan.planned or not plan.schedule_steps:
        return 0.0
    return plan.schedule_step(step) / plan.schedule_steps


def progressive_run(budget_s: float, *, full_step_s: float, aware: bool, low: float = 0.5,
                    image_size: int = 64) -> tuple[int, float, Plan]:
    """Drive a Pacer as moco.train does, on a fake clock where a step costs its pixels' share of
    `full_step_s`; `aware`: the pacer is given that cost function. Returns (steps, end, plan)."""
    def cost(f: float) -> float:
        return relative_cost(f, image_size, low)

    clock = FakeClock(8.0)
    plan = Plan.for_budget(budget_s, steps_per_epoch=50)
    pacer = Pacer(plan, clock=clock, started=0.0, batch_size=256, checkpoint_every_s=600, monitor=False,
                  cost=cost if aware else None)
    step = 0
    while not plan.planned:
        clock.now += full_step_s * cost(fraction(plan, step + 1))
        step += 1
        if pacer.time_step(step) is not None:
            pacer.make_plan(step, eval_s=0.0, evals_wanted=0, state_bytes=0)
            clock.now += 0.3
            pacer.checkpoint_written(0.3)
            pacer.start_safety_net(step)
    while step < plan.total_steps:
        clock.now += full_step_s * cost(fraction(plan, step + 1))
        step += 1
        if pacer.recheck_due(step, log_every=10):
            pacer.recheck(step)
    return step, clock.now + 0.3, plan


def test_a_plan_for_dearer_later_steps_ends_on_time_without_replanning():
    steps, end, plan = progressive_run(600.0, full_step_s=1.0, aware=True)
    assert not plan.replans, plan.replans
    assert 600.0 - margin_seconds(600.0) - 15.0 <= end <= 600.0, end
    # the cheap early steps buy more steps than a full-size run's ~570
    assert steps > 650
    assert plan.measured["full_step_s"] == pytest.approx(1.0)


def test_a_pacer_blind_to_the_rising_cost_must_cut_its_plan_again_and_again():
    # what the cost function is for: timed on quarter-price steps, the plan is four times too
    # long, and the safety net keeps shortening it (compressing the schedules) to end in time
    steps, end, plan = progressive_run(600.0, full_step_s=1.0, aware=False)
    assert plan.replans and all(r["total_steps"] < r["was"] for r in plan.replans)
    assert plan.replans[0]["was"] > 1.5 * steps


def test_the_pacer_keeps_a_rising_cost_run_on_time_when_the_machine_slows_down():
    def run() -> tuple[int, float, Plan]:
        clock = FakeClock(8.0)
        plan = Plan.for_budget(300.0, steps_per_epoch=50)

        def cost(f: float) -> float:
            return relative_cost(f, 64, 0.5)

        pacer = Pacer(plan, clock=clock, started=0.0, batch_size=256, checkpoint_every_s=600, monitor=False,
                      cost=cost)
        step = 0
        while step < (plan.total_steps if plan.planned else 10 ** 9):
            slow = 2.0 if clock.now > 150 else 1.0
            clock.now += 0.5 * slow * cost(fraction(plan, step + 1))
            step += 1
            if not plan.planned:
                if pacer.time_step(step) is not None:
                    pacer.make_plan(step, eval_s=0.0, evals_wanted=0, state_bytes=0)
                    pacer.start_safety_net(step)
            elif pacer.recheck_due(step, log_every=10):
                pacer.recheck(step)
        return step, clock.now, plan

    steps, end, plan = run()
    assert plan.replans and plan.replans[0]["total_steps"] < plan.replans[0]["was"]
    assert 300.0 - margin_seconds(300.0) - 10.0 <= end <= 300.0 + 1.0, end


# -- tiny real runs ------------------------------------------------------------------------------------------
def test_an_epochs_run_trains_at_rising_sizes_and_records_them(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "3",
                 "--progressive", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "progressive 0.5: training size rises from 16 px to 32 px" in out
    sizes = [r["image_size"] for r in records_of(run) if r["kind"] == "step"]
    # each step at where the schedule stands when it is done: 1/9 of the way for the first
    assert len(sizes) == 9 and sizes[0] == progressive_size(1 / 9, 32, 0.5) == 20 and sizes[-1] == 32
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert load_checkpoint(run)["config"]["progressive"] == 0.5


def test_a_budget_run_with_progressive_resolution_ends_in_time(image_folder, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--time-budget", "25s",
                 "--progressive", "0.5"]) == 0
    records = records_of(run)
    done = [r for r in records if r["kind"] == "done"][0]
    assert done["time"] <= 25.0 + 3.0  # the budget, and the closing of the logs
    plan = [r for r in records if r["kind"] == "plan"][0]
    assert "full_step_s" in plan and plan["full_step_s"] >= plan["step_s"]
    sizes = [r["image_size"] for r in records if r["kind"] == "step"]
    # the timing steps at the start size; the last planned step at the full size (a loaded
    # machine can leave no time for any planned step)
    assert sizes[0] == 16 and sizes[-1] == (32 if plan["total_steps"] > plan["planned_at_step"] else 16)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("flags, needle", [
    (["--progressive", "1.5"], "--progressive must be a fraction"),
    (["--progressive", "-0.5"], "--progressive must be a fraction"),
    (["--progressive", "0.5", "--augment-on", "workers"], "--progressive needs --augment-on device"),
])
def test_bad_progressive_flags_are_one_line_and_exit_2(flags, needle, image_folder, tmp_path, capsys):
    assert main(["train", str(image_folder), "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
