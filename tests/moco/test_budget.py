"""Training to a time budget: parsing, planning arithmetic, schedules that complete, the
budget-aware defaults, the safety net, and tiny real runs that keep to their budget and plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import moco.train
from moco import distributed
from moco.__main__ import main
from moco.budget import (
    Plan,
    format_duration,
    margin_seconds,
    parse_duration,
    plan_monitor_evals,
    plan_steps,
)
from moco.checkpoint import load_checkpoint
from moco.config import TrainConfig, build_config
from moco.defaults import SHORT_RUN_BASE_LR, fit_recipe, fit_to_plan
from moco.evaluate import subset
from moco.model import MoCo
from moco.plot import write_monitor_plot
from moco.train import Progress, Trainer

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


def stand_in(plan: Plan, config: TrainConfig, step: int = 0) -> Trainer:
    """A Trainer without model or data, for the pure parts of the loop (schedules, safety net)."""
    trainer = Trainer.__new__(Trainer)
    trainer.plan, trainer.config, trainer.progress = plan, config, Progress(step=step)
    trainer.steps_per_epoch = plan.steps_per_epoch
    return trainer


def test_budget_schedules_complete_at_the_planned_last_step():
    config = build_config({"warmup_epochs": 1.0})  # 10 steps of warm-up at 10 steps per epoch
    plan = Plan.for_budget(600, steps_per_epoch=10)
    trainer = stand_in(plan, config)
    assert trainer._lr(3) == 0.0  # timing steps, before the plan exists, learn nothing
    plan.total_steps, plan.schedule_start, plan.schedule_steps = 505, 5, 500
    base = config.effective_lr
    assert trainer._lr(5) == pytest.approx(base / 10)  # the warm-up starts after the timing steps
    assert trainer._lr(14) == pytest.approx(base)
    assert trainer._lr(504) < 1e-3 * base and trainer._lr(505) == 0.0
    lrs = [trainer._lr(s) for s in range(14, 506)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    config.moco_m_cos = True
    assert trainer._momentum(5) == pytest.approx(config.moco_m) and trainer._momentum(505) == pytest.approx(1.0)

    plan.monitor_evals = 4
    due = [s for s in range(6, 506) if plan.eval_due(s)]
    assert len(due) == 4 and due[-1] == 505

    # shortened at step 200: the schedules keep their value there and complete at the new end
    before = trainer._lr(200)
    plan.replan(200, 300)
    assert trainer._lr(200) == pytest.approx(before)
    assert trainer._lr(299) < 0.02 * base and trainer._lr(300) == 0.0
    lrs = [trainer._lr(s) for s in range(14, 301)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    due = [s for s in range(6, 301) if plan.eval_due(s)]
    assert len(due) == 4 and due[-1] == 300
    assert Plan.from_dict(plan.to_dict(), 10) == plan


def test_an_epochs_plan_is_the_plain_schedule():
    plan = Plan.for_epochs(3, steps_per_epoch=7)
    assert plan.total_steps == 21 and plan.epochs == 3 and plan.schedule_step(13) == 13.0
    assert not any(plan.eval_due(s) for s in range(22))  # --epochs runs evaluate at epoch ends


def safety_net_stand_in(total_steps: int, timed_img_per_s: float) -> tuple[Trainer, list[dict]]:
    """A 1000 s budget run of batch 8 at step 100, planned for `total_steps`, for `_recheck`;
    also the list its metrics records are written to."""
    config = build_config({"time_budget": 1000.0, "batch_size": 8})
    plan = Plan(mode="budget", steps_per_epoch=10, total_steps=total_steps, schedule_steps=total_steps,
                budget_s=1000.0, measured={"img_per_s": timed_img_per_s, "eval_s": 0.0, "checkpoint_s": 0.0})
    trainer = stand_in(plan, config, step=100)
    trainer.started, trainer.deadline, trainer._mark, trainer._overhead = 0.0, 1000.0, 0.0, 0.0
    written: list[dict] = []
    trainer._pace, trainer._planned_pace = deque([(0, 0.0)]), (0, 0.0)
    trainer._checkpoint_s, trainer.monitor = None, None
    trainer.metrics = SimpleNamespace(write=written.append)
    trainer.world, trainer.device = distributed.World(), torch.device("cpu")
    return trainer, written


def test_the_safety_net_shortens_a_run_that_fell_behind(monkeypatch, capsys):
    trainer, written = safety_net_stand_in(total_steps=1000, timed_img_per_s=8.0)
    plan = trainer.plan

    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 100.0)  # on pace: 1 s per step
    trainer._recheck()
    assert plan.total_steps == 1000 and not plan.knots

    trainer.progress.step = 150
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 200.0)  # 2 s per step since: late
    trainer._recheck()
    # 2 s per step over the last 50 s (5% of the budget); 800 s left, less the 13 s margin
    assert plan.total_steps == 150 + int((800 - 13) / 2)
    assert plan.knots == [[150, 150.0]] and plan.replans[0]["was"] == 1000
    assert "shortened from 1000 to 543 steps" in capsys.readouterr().out
    assert written[0]["event"] == "shortened" and written[0]["total_steps"] == 543
    assert trainer._lr(plan.total_steps) == 0.0


def test_a_passing_dip_shortens_only_near_the_deadline(monkeypatch, capsys):
    trainer, written = safety_net_stand_in(total_steps=900, timed_img_per_s=8.0)  # 1 s per step planned
    plan = trainer.plan

    # mid-run, 3 s per step over the last minute but 1.1 s per step since timing began: a dip on a
    # shared machine, not a slower machine; the plan (which cannot grow again later) is kept
    trainer.progress.step, trainer._pace = 420, deque([(400, 400.0)])
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 460.0)
    trainer._recheck()
    assert plan.total_steps == 900 and not plan.knots and not written

    # the same dip within four windows (200 s) of the deadline shortens on the recent pace alone
    trainer.progress.step, trainer._pace = 800, deque([(790, 790.0)])
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 820.0)
    trainer._recheck()
    assert plan.total_steps == 800 + int((180 - 13) / 3)  # 180 s left, less the 13 s margin
    assert written[0]["event"] == "shortened" and "shortened from 900 to 855 steps" in capsys.readouterr().out


def test_the_safety_net_lengthens_a_plan_timed_on_slow_first_steps_only_early(monkeypatch, capsys):
    trainer, written = safety_net_stand_in(total_steps=500, timed_img_per_s=4.0)
    plan = trainer.plan

    # planned at 2 s per step, running at 1 s: 400 steps left would end at 500 s of 1000
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 100.0)
    trainer._recheck()
    assert plan.total_steps == 100 + int((900 - 13) / 1)  # to the deadline less the 13 s margin
    assert plan.knots == [[100, 100.0]] and written[0]["event"] == "lengthened"
    assert "lengthened from 500 to 987 steps" in capsys.readouterr().out
    assert trainer._lr(plan.total_steps) == 0.0 and trainer._lr(500) > 0.0

    # past half of the schedule an early end is left alone (the LR is already decaying)
    plan.total_steps, plan.knots, plan.schedule_start = 500, [], 0
    trainer.progress.step, trainer._pace = 300, deque([(0, 0.0)])
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 300.0)
    trainer._recheck()
    assert plan.total_steps == 500 and not plan.knots

    # within the margin and tolerance of the deadline: no change (no chasing of timing noise)
    plan.total_steps = 985
    trainer.progress.step, trainer._pace = 100, deque([(0, 0.0)])
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 100.0)
    trainer._recheck()
    assert plan.total_steps == 985 and not plan.knots

    # a fast last stretch alone does not lengthen: the pace since timing began must agree
    plan.total_steps = 550
    trainer._pace = deque([(90, 180.0)])  # 1 s per step lately, 1.9 s per step since timing began
    monkeypatch.setattr(moco.train.time, "monotonic", lambda: 190.0)
    trainer._recheck()
    assert plan.total_steps == 550 and not plan.knots

# -- budget-aware defaults ---------------------------------------------------------------------------
def test_defaults_fit_momentum_queue_and_warmup_to_a_short_plan():
    config = build_config({})
    notes = fit_to_plan(config, set(), num_images=100_000, planned_steps=511, steps_per_epoch=390)
    assert config.moco_m == pytest.approx(0.9022)
    assert notes[0] == ("moco_m 0.999 -> 0.9022: an averaging horizon of 1000 steps would exceed 2% of the "
                        "511 planned steps")
    assert config.queue_size == 10 * 256 and notes[1].startswith("queue_size 65536 -> 2560: ")
    assert round(config.warmup_epochs * 390) == 26 and notes[2].startswith("warmup_epochs 0 -> ")
    assert len(notes) == 3

    tiny = build_config({"moco_m_cos": True})
    fit_to_plan(tiny, set(), num_images=1000, planned_steps=30, steps_per_epoch=3)
    assert tiny.moco_m == 0.9  # the floor


def test_defaults_keep_what_the_user_set_and_what_a_long_run_needs():
    config = build_config({"moco_m": 0.999, "queue_size": 65536})
    notes = fit_to_plan(config, {"moco_m", "queue_size"}, num_images=100_000, planned_steps=511, steps_per_epoch=390)
    assert (config.moco_m, config.queue_size) == (0.999, 65536) and all("warmup" in n for n in notes)

    long = build_config({})
    fit_to_plan(long, set(), num_images=1_000_000, planned_steps=100_000, steps_per_epoch=3900)
    assert (long.moco_m, long.queue_size) == (0.999, 65536)

    v3 = build_config({"preset": "v3"})  # 10 warm-up epochs: most of a 20-epoch run
    notes = fit_to_plan(v3, set(), num_images=100_000, planned_steps=2000, steps_per_epoch=100)
    assert round(v3.warmup_epochs * 100) == 400 and "the preset's 10 epochs" in notes[-1]


def test_paper_defaults_keep_the_published_values():
    config = build_config({"paper_defaults": True, "batch_size": 128})
    assert fit_to_plan(config, set(), num_images=100_000, planned_steps=300, steps_per_epoch=781) == []
    assert (config.moco_m, config.queue_size, config.temperature, config.lr_schedule) == (0.999, 65536, 0.2, "cosine")
    assert config.effective_lr == pytest.approx(0.03 * 128 / 256) and config.warmup_epochs == 0


def test_the_short_run_recipe_changes_v2_and_says_why():
    config = build_config({"image_size": 32})
    notes = fit_recipe(config, set())
    assert (config.head, config.batch_negatives, config.queue_start, config.blur_relative) == \
        ("mlp_bn", True, "empty", True)
    assert config.base_lr == SHORT_RUN_BASE_LR and len(notes) == 5
    assert any("0.03 -> 0.6" in note for note in notes)


def test_the_short_run_recipe_keeps_what_the_user_set():
    config = build_config({"image_size": 32, "head": "mlp", "lr": 0.1, "queue_start": "random"})
    fit_recipe(config, {"head", "lr", "queue_start"})
    assert (config.head, config.queue_start, config.base_lr, config.effective_lr) == ("mlp", "random", 0.03, 0.1)
    assert config.batch_negatives and config.blur_relative


def test_paper_defaults_and_other_presets_keep_their_recipe():
    paper = build_config({"paper_defaults": True, "image_size": 32})
    v3 = build_config({"preset": "v3", "image_size": 32})
    assert fit_recipe(paper, set()) == [] and fit_recipe(v3, set()) == []
    assert (paper.head, paper.batch_negatives, paper.queue_start, paper.blur_relative) == \
        ("mlp", False, "random", False)


def test_a_shrunk_queue_keeps_the_newest_keys():
    fake = SimpleNamespace(queue=torch.arange(10.0).repeat(2, 1), queue_ptr=torch.tensor(3),
                           queue_filled=torch.tensor(10))
    MoCo.shrink_queue(fake, 4)  # slots 3.. are oldest; newest are 9, 0, 1, 2 in order of arrival
    assert fake.queue[0].tolist() == [9.0, 0.0, 1.0, 2.0] and int(fake.queue_ptr) == 0
    assert int(fake.queue_filled) == 4


# -- the kNN monitor and its plot --------------------------------------------------------------------------
def test_the_monitor_uses_a_fixed_subset_when_capped():
    chosen = subset(np.arange(100), 10, seed=0)
    assert len(chosen) == 10 and list(chosen) == sorted(chosen)
    assert list(chosen) == list(subset(np.arange(100), 10, seed=0))
    assert len(subset(np.arange(100), 0, seed=0)) == 100


def test_the_plot_is_written_atomically(tmp_path):
    lines = [{"kind": "step", "step": s, "loss": 5 - s / 10, "time": 6.0 * s} for s in range(1, 20)]
    lines += [{"kind": "eval", "step": s, "knn_top1": s / 40, "time": 6.0 * s} for s in (1, 10, 19)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    write_monitor_plot(tmp_path / "metrics.jsonl", tmp_path / "monitor.png", title="t", budget_s=120)
    assert (tmp_path / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "monitor.png"]


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


def test_a_resumed_budget_run_keeps_its_plan_and_finishes_it(image_folder, tmp_path, monkeypatch, capsys):
    # Plan after two steps, for exactly four more, whatever this machine's speed.
    monkeypatch.setattr(moco.train, "MEASURE_SKIP_STEPS", 1)
    monkeypatch.setattr(moco.train, "MEASURE_MIN_STEPS", 1)
    monkeypatch.setattr(moco.train, "measure_seconds", lambda budget: 0.0)
    monkeypatch.setattr(moco.train, "plan_steps", lambda *args, **kwargs: 4)
    monkeypatch.setattr(moco.train, "EXTEND_UNTIL_FRACTION", -1.0)  # 4 steps in 10 minutes: never lengthen
    original = Trainer._step

    def die_after_the_plan(self, batch):
        if self.plan.planned and self.progress.step == self.plan.schedule_start + 1:
            raise KeyboardInterrupt  # killed, one step into the plan (checkpointed every step)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_step", die_after_the_plan)
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--time-budget", "10m",
                 "--checkpoint-every", "0"]) == 130
    crashed = load_checkpoint(run)
    assert crashed["progress"]["step"] == 3 and crashed["plan"]["total_steps"] == 6
    # the adjusted defaults are in the checkpoint config (Contract 1)
    assert crashed["config"]["moco_m"] == 0.9 and any(n.startswith("moco_m 0.999 -> 0.9") for n in
                                                        crashed["config"]["notes"])
    assert "plan: 4 steps" in capsys.readouterr().out

    monkeypatch.setattr(Trainer, "_step", original)
    monkeypatch.setattr(moco.train, "plan_steps", lambda *args, **kwargs: 1000)  # a re-plan would show
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
