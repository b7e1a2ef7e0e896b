"""torchrun on the CPU (gloo): two processes train, checkpoint and resume, and their loss curve
matches one process with the same global batch.

Why they can match: the sampler cuts each global batch into contiguous per-rank slices, the key
shuffle uses one permutation drawn on rank 0, the queue takes keys gathered from every rank, and
per-image augmentation is seeded per sample. One process with --bn-splits 2 then normalises
exactly the groups two processes with --bn-splits 1 do.

What still differs is the order of floating-point sums (the gradient all-reduce of two halves
against one backward pass; convolution kernels chosen for batch 4 against batch 8). In float32
that is ~1e-7 relative on the first steps, and training amplifies it: on an AVX-512 Xeon the
losses differed by 1e-6, 1e-5, then 3e-3 at the fourth step, so no float32 tolerance separates
noise from a bug on every CPU. The comparison therefore runs both sides in float64
(tests/moco/run_float64.py): the same computation with unit roundoff 1.1e-16 instead of 6e-8.
Measured there: 0, 1e-15, 3e-14, 1e-13. Even the worst amplification seen in float32 (about
3,000x from step 2 to step 4) applied to float64's ~1e-15 gives ~3e-12, so FLOAT64_REL = 1e-8
leaves a margin of thousands on any CPU, while a real shuffle-BN / gather bug stays far above
it: returning another rank's keys, shuffling keys within each rank only, or enqueueing only
the local keys each changed the losses by 5e-2 to 0.18 relative at some step (tried as
mutations of MoCo.keys and MoCo.enqueue).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moco.checkpoint import load_checkpoint
from tests.moco.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
FLOAT64_REL = 1e-8  # the argument is in the module docstring
COMMON = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--log-every", "1", "--seed", "1",
          "--no-channels-last", "--augment-on", "workers", "--deterministic", "--batch-size", "8"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def torchrun(*args: str, module: str = "moco") -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", module, *args])


def float64(*args: str) -> subprocess.CompletedProcess:
    """One process of `python -m moco` computing in float64 (its own process: the setting is global)."""
    return run([sys.executable, "-m", "tests.moco.run_float64", *args])


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "imgs", classes=2, per_class=8)


def test_two_processes_match_one_and_resume_on_any_world_size(data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    float64("train", str(data), "--out", str(single), *COMMON, "--bn-splits", "2", "--epochs", "2")
    done = torchrun("train", str(data), "--out", str(ddp), *COMMON, "--bn-splits", "1", "--epochs", "2",
                    module="tests.moco.run_float64")
    assert "2 processes" in done.stdout and done.stdout.count("configuration:") == 1  # rank 0 speaks
    expected, got = step_losses(single), step_losses(ddp)
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=FLOAT64_REL, abs=0)
    assert load_checkpoint(ddp)["progress"]["epoch"] == 2

    # resume on another world size: one process continues the two-process run, then two again
    float64("train", "--resume", str(ddp), "--epochs", "3")
    torchrun("train", "--resume", str(ddp), "--epochs", "4", module="tests.moco.run_float64")
    state = load_checkpoint(ddp)
    assert state["progress"]["epoch"] == 4 and state["progress"]["step"] == 8
    assert len(step_losses(ddp)) == 8


def test_two_processes_keep_to_one_time_budget(data, tmp_path):
    """Every rank times, plans, evaluates and checkpoints at the same steps (no collective is
    left waiting), and rank 0 stores the one plan."""
    val = make_image_folder(tmp_path / "val", classes=2, per_class=4, seed=1)
    run = tmp_path / "budget"
    # fp32: the plan, not the arithmetic, is under test; bf16 (auto on an AMX CPU) at lr 0.6 on 16 images
    # diverged to NaN at step 46 in one run of this test (issue 18), fp32 had not
    done = torchrun("train", str(data), "--out", str(run), *COMMON, "--precision", "fp32", "--time-budget", "30s",
                    "--val", str(val))
    assert sum(line.startswith("plan: ") for line in done.stdout.splitlines()) == 1, "one plan, printed once"
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
