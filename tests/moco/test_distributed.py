"""torchrun on the CPU (gloo): two processes train, checkpoint and resume, and their loss curve
matches one process with the same global batch.

Why they can match: the sampler cuts each global batch into contiguous per-rank slices, the key
shuffle uses one permutation drawn on rank 0, the queue takes keys gathered from every rank, and
per-image augmentation is seeded per sample. One process with --bn-splits 2 then normalises
exactly the groups two processes with --bn-splits 1 do. What differs is float summation order
(gradient all-reduce against one backward pass): the stated tolerance is 1e-3 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moco.__main__ import main
from moco.checkpoint import load_checkpoint
from tests.moco.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--log-every", "1", "--seed", "1",
          "--no-channels-last", "--augment-on", "workers", "--deterministic", "--batch-size", "8"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moco", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "imgs", classes=2, per_class=8)


def test_two_processes_match_one_and_resume_on_any_world_size(data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", str(data), "--out", str(single), *COMMON, "--bn-splits", "2", "--epochs", "2"]) == 0
    done = torchrun("train", str(data), "--out", str(ddp), *COMMON, "--bn-splits", "1", "--epochs", "2")
    assert "2 processes" in done.stdout and done.stdout.count("configuration:") == 1  # rank 0 speaks
    expected, got = step_losses(single), step_losses(ddp)
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-3)
    assert load_checkpoint(ddp)["progress"]["epoch"] == 2

    # resume on another world size: one process continues the two-process run, then two again
    assert main(["train", "--resume", str(ddp), "--epochs", "3"]) == 0
    torchrun("train", "--resume", str(ddp), "--epochs", "4")
    state = load_checkpoint(ddp)
    assert state["progress"]["epoch"] == 4 and state["progress"]["step"] == 8
    assert len(step_losses(ddp)) == 8


def test_two_processes_keep_to_one_time_budget(data, tmp_path):
    """Every rank times, plans, evaluates and checkpoints at the same steps (no collective is
    left waiting), and rank 0 stores the one plan."""
    val = make_image_folder(tmp_path / "val", classes=2, per_class=4, seed=1)
    run = tmp_path / "budget"
    done = torchrun("train", str(data), "--out", str(run), *COMMON, "--time-budget", "30s", "--val", str(val))
    assert done.stdout.count("plan: ") == 1
    state = load_checkpoint(run)
    assert state["plan"]["mode"] == "budget" and state["plan"]["total_steps"] == state["progress"]["step"]
    assert (run / "monitor.png").exists()


def test_the_global_batch_must_divide_over_processes(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moco",
           "train", str(data), "--out", str(tmp_path / "run"), *COMMON[:-2], "--batch-size", "5", "--epochs", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "must be divisible by the 2 processes" in done.stderr
