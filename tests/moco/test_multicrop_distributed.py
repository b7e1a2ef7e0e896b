"""torchrun on the CPU (gloo) with --multi-crop and --progressive: every rank makes its own
small crops and trains at the same sizes, the keys are gathered as for the two views, and a
budget plan priced by resolution is one plan on every rank (no collective is left waiting).

(No float64 comparison with one process as in test_distributed.py: the batched augmentation
draws one generator per rank's batch, so one process and two make different crops.)"""

from __future__ import annotations

import json
import math

from moco.checkpoint import load_checkpoint
from tests.moco.conftest import make_image_folder
from tests.moco.test_distributed import torchrun

COMMON = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--log-every", "1", "--seed", "1",
          "--no-channels-last", "--batch-size", "8", "--precision", "fp32"]


def test_two_processes_train_with_small_crops_and_rising_resolution_to_a_budget(tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=8)
    run = tmp_path / "run"
    done = torchrun("train", str(data), "--out", str(run), *COMMON, "--time-budget", "30s", "--multi-crop", "2",
                    "--progressive", "0.5", "--symmetric")
    assert sum(line.startswith("plan: ") for line in done.stdout.splitlines()) == 1
    state = load_checkpoint(run)
    assert state["plan"]["total_steps"] == state["progress"]["step"] > 0
    assert state["config"]["multi_crop"] == 2 and state["config"]["progressive"] == 0.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    planned = state["plan"]["total_steps"] > state["plan"]["measured"]["planned_at_step"]
    assert steps[0]["image_size"] == 16 and steps[-1]["image_size"] == (32 if planned else 16)
