"""The kNN monitor: never scores a query against itself, and a budget run's monitor fits its budget."""

from __future__ import annotations

import json

import numpy as np
import torch

from moco.__main__ import main
from moco.data import open_folder
from moco.evaluate import KnnMonitor
from moco.pacer import MONITOR_MAX_SHARE, MONITOR_MIN_IMAGES, monitor_images_that_fit

from .conftest import make_image_folder


def monitor(train, val, max_images=0):
    return KnnMonitor(train, val, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"),
                      workers=0, k=5, temperature=0.1, max_images=max_images)


def test_val_as_the_training_folder_splits_queries_from_the_bank(tmp_path):
    root = make_image_folder(tmp_path / "digits", classes=3, per_class=10)
    same = monitor(open_folder(root), open_folder(root))
    assert len(same.queries) == 15 and len(same.bank) == 15
    assert not set(same.queries.tolist()) & set(same.bank.tolist()), "a query never finds itself"
    capped = monitor(open_folder(root), open_folder(root), max_images=6)
    assert len(capped.queries) == 6 and len(capped.bank) == 6
    assert not set(capped.queries.tolist()) & set(capped.bank.tolist())
    other = make_image_folder(tmp_path / "val", classes=3, per_class=4, seed=1)
    apart = monitor(open_folder(root), open_folder(other))
    assert len(apart.bank) == 30 and len(apart.queries) == 12


def test_shrink_keeps_a_fixed_subset_of_each(tmp_path):
    root = make_image_folder(tmp_path / "digits", classes=3, per_class=10)
    a, b = monitor(open_folder(root), open_folder(root)), monitor(open_folder(root), open_folder(root))
    assert a.shrink(8) and b.shrink(8)
    assert len(a.bank) == 4 and len(a.queries) == 4
    assert np.array_equal(a.bank, b.bank) and np.array_equal(a.queries, b.queries), "the same images every time"
    assert not a.shrink(100), "never grows"


def test_monitor_images_fit_two_evaluations_in_the_share():
    assert monitor_images_that_fit(45, 400) == int(MONITOR_MAX_SHARE / 2 * 45 * 400)
    assert monitor_images_that_fit(10, 5) == MONITOR_MIN_IMAGES


def test_a_short_budget_run_shrinks_its_monitor_and_says_so(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=200)
    out = tmp_path / "run"
    code = main(["train", str(data), "--out", str(out), "--val", str(data), "--time-budget", "3s", "--image-size",
                 "16", "--batch-size", "16", "--workers", "0", "--knn-max-images", "0", "--no-channels-last"])
    assert code == 0
    said = capsys.readouterr()
    assert f"to keep its evaluations within {MONITOR_MAX_SHARE:.0%} of the 3s budget" in said.out + said.err
    starts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("start") for r in starts if r["kind"] == "eval")
