"""Contract 1 on disk: checkpoints load without running code, old ones still load, and a run
folder left by a killed session is tidied on the next start."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from moco.__main__ import main
from moco.checkpoint import load_checkpoint, save_checkpoint
from moco.train import Trainer
from tests.moco.conftest import make_image_folder, write_crafted_checkpoint

FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last", "--deterministic"]


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Train and val folders, and a one-epoch run (two steps) trained on them."""
    root = tmp_path_factory.mktemp("ckpt")
    train = make_image_folder(root / "train", classes=2, per_class=8)
    val = make_image_folder(root / "val", classes=2, per_class=4, seed=1)
    run = root / "run"
    assert main(["train", str(train), "--out", str(run), *FAST, "--epochs", "1"]) == 0
    return train, val, run


@pytest.mark.parametrize("form", ["torch", "pickle2", "pickle"])
def test_the_crafted_payload_is_live(tmp_path, form):
    """The control for the refusal tests: loaded the old way, the file does run its code."""
    marker = tmp_path / "marker"
    path = write_crafted_checkpoint(tmp_path / "checkpoint.pt", marker, form=form)
    if form == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("form", ["torch", "pickle2", "pickle"])
@pytest.mark.parametrize("command", ["resume", "eval"])
def test_a_checkpoint_that_would_run_code_is_refused(folders, tmp_path, capsys, form, command):
    train, val, _ = folders
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    write_crafted_checkpoint(run / "checkpoint.pt", marker, form=form)
    args = {"resume": ["train", "--resume", str(run)],
            "eval": ["eval", str(run / "checkpoint.pt"), "--train", str(train), "--val", str(val)]}[command]
    assert main(args) == 2
    err = one_line_error(capsys)
    # protocol 4 stops the loader at an opcode it does not read, before any name is looked up
    needles = ["cannot read checkpoint"] if form == "pickle" else ["refused to load", "open", "could run code"]
    assert all(needle in err for needle in needles), err
    assert not marker.exists()


def test_new_checkpoints_need_no_allowed_globals(folders):
    """Everything saved is a tensor, container or number: the allow-list is for old files only."""
    _, _, run = folders
    assert torch.serialization.get_unsafe_globals_in_checkpoint(run / "checkpoint.pt") == []


def test_an_older_checkpoint_with_numpy_rng_state_resumes_the_same(folders, tmp_path):
    """Checkpoints written before safe loading hold numpy's RNG keys as an ndarray: they load
    (through the allow-list) and resume exactly like the current form."""
    train, _, run = folders
    state = load_checkpoint(run)
    name, keys, position, has_gauss, cached = state["rng"]["numpy"]
    assert torch.is_tensor(keys)
    legacy = {**state, "rng": {**state["rng"], "numpy": (name, keys.numpy().astype(np.uint32), position,
                                                         has_gauss, cached)}}
    for copy, saved in (("current", state), ("legacy", legacy)):
        (tmp_path / copy).mkdir()
        save_checkpoint(tmp_path / copy / "checkpoint.pt", saved)
        (tmp_path / copy / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "legacy" / "checkpoint.pt") != []
    for copy in ("current", "legacy"):
        assert main(["train", "--resume", str(tmp_path / copy), "--epochs", "2"]) == 0
    assert len(step_losses(tmp_path / "legacy")) == 4
    assert step_losses(tmp_path / "legacy") == step_losses(tmp_path / "current")


def test_stale_temp_files_of_our_writes_are_removed_on_resume_and_nothing_else(folders, tmp_path):
    _, _, run = folders
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (copy / name).write_bytes((run / name).read_bytes())
    ours = [".checkpoint.pt.0a1b2c3d.tmp", ".checkpoint.pt.x_9kq2zz.tmp", ".metrics.jsonl.deadbeef.tmp",
            ".monitor.png.12345678.tmp"]
    for name in ours:
        (copy / name).write_bytes(b"torn")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    others = [".checkpoint.pt.abc.tmp", ".checkpoint.pt.0a1b2c3d.tmp.keep", "checkpoint.pt.0a1b2c3d.tmp",
              ".notes.txt.0a1b2c3d.tmp", ".checkpoint.pt.ABCDEFGH.tmp", "notes.tmp"]
    for name in others:
        (copy / name).write_text("not ours")
    (copy / ".checkpoint.pt.aaaaaaaa.tmp").mkdir()  # a folder of that name: not a file we wrote
    os.symlink(outside, copy / ".checkpoint.pt.bbbbbbbb.tmp")  # nor a link
    assert main(["train", "--resume", str(copy), "--epochs", "2"]) == 0
    left = {p.name for p in copy.iterdir()}
    assert not left & set(ours)
    assert set(others) | {".checkpoint.pt.aaaaaaaa.tmp", ".checkpoint.pt.bbbbbbbb.tmp"} <= left
    assert outside.read_text() == "keep"
    assert load_checkpoint(copy)["progress"]["epoch"] == 2


def test_a_fresh_start_also_removes_them(folders, tmp_path):
    train, _, _ = folders
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.pt.0a1b2c3d.tmp").write_bytes(b"torn")
    assert main(["train", str(train), "--out", str(run), *FAST, "--epochs", "1"]) == 0
    assert not (run / ".checkpoint.pt.0a1b2c3d.tmp").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_fresh_run_after_one_killed_before_its_first_checkpoint_starts_its_own_metrics(
        folders, tmp_path, monkeypatch, capsys):
    train, _, _ = folders
    run = tmp_path / "run"
    args = ["train", str(train), "--out", str(run), *FAST, "--epochs", "1"]

    def killed(self):
        raise KeyboardInterrupt  # the kill comes just before the first checkpoint is written

    monkeypatch.setattr(Trainer, "save", killed)
    assert main(args) == 130
    assert not (run / "checkpoint.pt").exists()
    first = (run / "metrics.jsonl").read_text()
    assert '"kind": "epoch"' in first
    monkeypatch.undo()
    capsys.readouterr()

    assert main(args) == 0  # the same command again: the folder holds no run to resume
    assert "moved aside to metrics.jsonl.1" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]  # one epoch-1 record, not two
    assert (run / "metrics.jsonl.1").read_text() == first  # the earlier attempt's records are kept

    # With a checkpoint the folder holds a run: a fresh start is refused, nothing is moved.
    assert main(args) == 2
    assert "already holds a run" in one_line_error(capsys)
    assert not (run / "metrics.jsonl.2").exists()
