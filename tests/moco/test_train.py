"""Training-loop behaviour: exact resume, robustness to bad files, clean stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moco.__main__ import main
from moco.checkpoint import load_checkpoint
from moco.train import Trainer
from tests.moco.conftest import killed_after_first_epoch

# Small and fast: ImageNet stem at 32 px, NCHW (channels-last is slower at batch 8 on this CPU).
FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last"]


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_resume_after_an_epoch_repeats_the_uninterrupted_run_exactly(image_folder, tmp_path, monkeypatch):
    args = [*FAST, "--epochs", "2", "--deterministic"]
    assert main(["train", str(image_folder), "--out", str(tmp_path / "straight"), *args]) == 0

    with killed_after_first_epoch(monkeypatch):
        assert main(["train", str(image_folder), "--out", str(tmp_path / "killed"), *args]) == 130
    assert load_checkpoint(tmp_path / "killed")["progress"]["epoch"] == 1
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0

    expected = step_losses(tmp_path / "straight")
    assert len(expected) == 6
    assert step_losses(tmp_path / "killed") == expected


def test_resume_in_the_middle_of_an_epoch_is_exact_too(image_folder, tmp_path, monkeypatch):
    args = [*FAST, "--epochs", "1", "--deterministic", "--checkpoint-every", "0"]
    assert main(["train", str(image_folder), "--out", str(tmp_path / "straight"), *args]) == 0
    original = Trainer.train_step
    calls = []

    def die_on_third_step(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after two steps and their time-based checkpoints
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", die_on_third_step)
    assert main(["train", str(image_folder), "--out", str(tmp_path / "killed"), *args]) == 130
    state = load_checkpoint(tmp_path / "killed")
    assert (state["progress"]["epoch"], state["progress"]["batch_in_epoch"]) == (0, 2)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    assert step_losses(tmp_path / "killed") == step_losses(tmp_path / "straight")


def test_extending_a_run_replans_the_schedule(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "1"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "re-planning the LR and momentum schedules over 2 epochs (was 1)" in out
    state = load_checkpoint(run)
    assert state["progress"]["epoch"] == 2 and state["plan"]["total_steps"] == 2 * state["plan"]["steps_per_epoch"]
    assert main(["train", "--resume", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_corrupt_files_are_skipped_named_once_and_counted(image_folder, tmp_path, capsys):
    (image_folder / "class0" / "empty.jpg").write_bytes(b"")
    (image_folder / "class1" / "text.png").write_text("not an image")
    good = (image_folder / "class2" / "img001.png").read_bytes()
    (image_folder / "class2" / "truncated.png").write_bytes(good[: len(good) // 2])
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "3"]) == 0
    captured = capsys.readouterr()
    for name in ("class0/empty.jpg", "class1/text.png", "class2/truncated.png"):
        assert (captured.out + captured.err).count(f"skipped {name}") == 1
    assert "3 files skipped" in captured.out
    skipped = load_checkpoint(run)["progress"]["skipped"]
    assert set(skipped) == {"class0/empty.jpg", "class1/text.png", "class2/truncated.png"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, monkeypatch, capsys,
                                                                     precision):
    run = tmp_path / "run"
    original = Trainer.train_step

    def nan_in_second_epoch(self, batch):
        if self.progress.epoch == 1:  # weights blow up: the next loss is NaN
            with torch.no_grad():
                for p in self.model.encoder_q.parameters():
                    p.fill_(float("nan"))
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", nan_in_second_epoch)
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "3", "--precision", precision]) == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err and "a lower --lr" in err
    assert ("--precision fp32" in err) == (precision == "bf16")  # the other way out of a bf16 divergence
    state = load_checkpoint(run)
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_the_loss_check_catches_a_real_divergence(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "2", "--lr", "1e30"]) == 1
    assert "the loss became" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_checkpoint_and_the_run_resumes(image_folder, tmp_path, signum):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moco", "train", str(image_folder), "--out", str(run), *FAST, "--epochs", "200"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()  # still running at the deadline: stop it, so its output can be read at once
            pytest.fail(f"no two metrics lines within 120 s: {proc.communicate(timeout=60)}")
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert f"Continue with: python -m moco train --resume {run}" in out
    steps = load_checkpoint(run)["progress"]["step"]
    assert steps >= 2
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert load_checkpoint(run)["progress"]["epoch"] == 3


def test_compile_trains_and_checkpoints_like_the_eager_step(image_folder, tmp_path):
    # torch.compile (inductor, C++ on this CPU; about two minutes here) wraps only the step's
    # forward: the checkpoint keeps the plain module's keys, so it resumes, exports and evaluates
    # like any other. Both in fp32: like for like (auto avoids bf16 under compile on a CPU, see moco.precision).
    args = [*FAST, "--epochs", "1", "--precision", "fp32"]
    assert main(["train", str(image_folder), "--out", str(tmp_path / "eager"), *args]) == 0
    assert main(["train", str(image_folder), "--out", str(tmp_path / "compiled"), *args, "--compile"]) == 0
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert len(compiled) == len(eager) == 3 and all(map(torch.isfinite, torch.tensor(compiled)))
    assert compiled[0] == pytest.approx(eager[0], rel=1e-3)  # same seed, same first batch, same loss
    state = load_checkpoint(tmp_path / "compiled")
    assert state["config"]["compile"] and state["model"].keys() == load_checkpoint(tmp_path / "eager")["model"].keys()
