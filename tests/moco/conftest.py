"""Tiny generated image folders: every test makes its own data, no downloads."""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def bf16_times_as_fp32(monkeypatch):
    """`--precision auto` on a CPU with native bf16 times the run's step (`moco eval`: the
    backbone's forward) in both precisions: a race whose winner depends on the machine's load.
    In-process runs get equal rates, so auto is fp32 there on every machine and no test's numbers
    depend on a timing; the tests of the timing itself call `moco.step_timing`'s functions as
    imported, or patch these seams with their own rates."""
    from moco import step_timing

    monkeypatch.setattr(step_timing, "precision_rates", lambda *args, **kwargs: {"fp32": 100.0, "bf16": 100.0})
    monkeypatch.setattr(step_timing, "forward_rates", lambda *args, **kwargs: {"fp32": 100.0, "bf16": 100.0})


@pytest.fixture(autouse=True)
def threads_stay_as_started(monkeypatch):
    """A CPU run changes its thread count when other processes take its cores (moco.train's
    `share_cores`), which reorders float reductions; in-process test runs keep the count they
    started with, so their numbers do not depend on what else the machine is doing."""
    from indexer.threads import CoreShare

    monkeypatch.setattr(CoreShare, "for_this_process", staticmethod(lambda *args, **kwargs: None))


COLORS = [(200, 40, 40), (40, 180, 60), (50, 60, 210), (220, 200, 40)]


def make_image_folder(root: Path, *, classes: int = 3, per_class: int = 8, seed: int = 0,
                      size: tuple[int, int] = (40, 48)) -> Path:
    """Class folders of noisy coloured blobs: easy to separate, so accuracy tests can fail."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size
            pixels = rng.integers(0, 70, (h, w, 3)).astype(np.int16)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            pixels[y:y + h // 2, x:x + w // 2] += np.array(COLORS[c % len(COLORS)], np.int16)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(folder / (f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "train")


@contextmanager
def killed_after_first_epoch(monkeypatch: pytest.MonkeyPatch):
    """Inside the block a `moco train` run is killed (KeyboardInterrupt, as Ctrl-C) right after its
    first epoch's checkpoint is written: the resume tests' crash."""
    from moco.train import Trainer

    original = Trainer.end_epoch

    def end_epoch_then_die(self, *args):
        original(self, *args)  # the epoch's checkpoint is written here
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "end_epoch", end_epoch_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "end_epoch", original)


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): the file appears if a loader runs pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_crafted_checkpoint(path: Path, marker: Path, *, form: str = "torch") -> Path:
    """A 'checkpoint' that runs code when unpickled: torch.save's zip form ("torch"), or a bare
    pickle of protocol 2 ("pickle2", the opcodes torch's safe loader reads) or the default."""
    state = {"config": {"format_version": 1}, "model": {"weights": _CreatesMarker(marker)}}
    if form == "torch":
        import torch

        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2 if form == "pickle2" else None))
    return path
