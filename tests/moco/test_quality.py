"""What a run ships: never worse than its start by its own monitor (moco.quality), stored in the
checkpoint (quality, shipped_encoder) and used by the exporter's loader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moco.__main__ import main
from moco.checkpoint import backbone_from_state, load_checkpoint, quality_of
from moco.quality import QualityTracker, noise_margin
from tests.moco.conftest import killed_after_first_epoch

FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last"]


def test_the_noise_margin_is_two_standard_errors_of_a_proportion_at_least_a_point():
    assert noise_margin(0.3, 1000) == pytest.approx(2 * (0.3 * 0.7 / 1000) ** 0.5)  # ~0.029
    assert noise_margin(0.5, 100) == pytest.approx(0.1)
    assert noise_margin(0.5, 10**6) == 0.01  # the floor
    assert noise_margin(1.0, 50) == 0.01


class Net(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        nn.init.constant_(self.backbone.weight, value)


def tracker_with(start: float, *scores: tuple[int, float]) -> QualityTracker:
    tracker = QualityTracker("weighted kNN top-1, k=20, 1000 bank / 1000 query images, val folder 'val'", 1000)
    tracker.observe_start(0, start, Net(-1.0).state_dict())
    for step, score in scores:
        tracker.observe(step, score, Net(float(step)))
    return tracker


def test_a_run_that_fell_below_its_start_ships_the_start_and_says_why():
    # issue 17's demo: 0.433 at the start, 0.385 after 10 steps
    tracker = tracker_with(0.433, (10, 0.385))
    quality = tracker.decide(10, "the 2m30s budget (10 training steps)")
    assert quality["verdict"] == "not_learned" and quality["shipped"] == "start"
    assert quality["shipped_score"] == 0.433 and quality["start"] == 0.433 and quality["end"] == 0.385
    assert quality["reason"].startswith("kNN 0.433 at the random start, 0.385 at the end")
    assert "the 2m30s budget (10 training steps) was too short" in quality["reason"]
    assert quality["reason"].endswith("the model shipped is the random start")
    assert torch.equal(tracker.shipped_weights(quality)["backbone.weight"], torch.full((2, 2), -1.0))


def test_a_gain_within_the_noise_is_not_learning():
    margin = noise_margin(0.40, 1000)
    quality = tracker_with(0.40, (20, 0.40 + margin - 0.001)).decide(20, "3 epochs (20 steps)")
    # above the start, within the noise: the trained weights ship, and the verdict says no gain was shown
    assert quality["verdict"] == "not_learned" and quality["shipped"] == "final"
    assert "not measurably better than the random start" in quality["reason"]
    quality = tracker_with(0.40, (10, 0.40 + margin / 2), (20, 0.39)).decide(20, "3 epochs (20 steps)")
    assert quality["verdict"] == "not_learned" and quality["shipped"] == "best", "the final fell below the start"
    quality = tracker_with(0.40, (20, 0.40)).decide(20, "3 epochs (20 steps)")
    assert quality["shipped"] == "start", "nothing scored above the start"
    quality = tracker_with(0.40, (20, 0.40 + margin + 0.001)).decide(20, "3 epochs (20 steps)")
    assert quality["verdict"] == "learned" and quality["shipped"] == "final" and quality["shipped_score"] > 0.42


def test_the_best_network_ships_when_the_final_one_fell_clearly_below_it():
    tracker = tracker_with(0.30, (10, 0.36), (20, 0.45), (30, 0.38))
    quality = tracker.decide(30, "the 3m budget (30 training steps)")
    assert (quality["verdict"], quality["shipped"], quality["best"], quality["best_step"]) == ("learned", "best",
                                                                                                0.45, 20)
    assert torch.equal(tracker.shipped_weights(quality)["backbone.weight"], torch.full((2, 2), 20.0))
    # a final score within the noise of the best: the final network ships (no evidence it is worse)
    tracker = tracker_with(0.30, (10, 0.45), (20, 0.44))
    quality = tracker.decide(20, "x")
    assert quality["shipped"] == "final" and quality["shipped_score"] == 0.44
    assert tracker.shipped_weights(quality) is None


def test_the_tracker_survives_a_checkpoint_round_trip():
    tracker = tracker_with(0.30, (10, 0.45), (20, 0.32))
    saved = tracker.state_dict(step=20)
    assert saved["start_weights"] is None  # learning is shown: the start can no longer ship
    again = QualityTracker(tracker.monitor, 1000)
    again.load_state_dict(saved, Net(99.0))
    assert again.decide(20, "x") == tracker.decide(20, "x")
    # the best being the saved network itself: its weights come from the resumed encoder
    tracker = tracker_with(0.30, (10, 0.45))
    again = QualityTracker(tracker.monitor, 1000)
    again.load_state_dict(tracker.state_dict(step=10), Net(10.0))
    assert torch.equal(again.best_weights["backbone.weight"], torch.full((2, 2), 10.0))


def test_without_a_monitor_the_final_network_ships_unmeasured():
    quality = QualityTracker(None, 0).decide(5, "x")
    assert quality["verdict"] == "unmeasured" and quality["shipped"] == "final" and quality["start"] is None
    old = quality_of({"config": {}, "model": {}})  # a checkpoint from before quality was recorded
    assert old["verdict"] == "unmeasured" and old["reason"] == "trained before quality was recorded"


# -- real runs --------------------------------------------------------------------------------------
@pytest.fixture
def val_folder(tmp_path):
    from tests.moco.conftest import make_image_folder

    return make_image_folder(tmp_path / "val", per_class=4, seed=1)


def test_an_absurd_learning_rate_ships_no_worse_than_the_start(image_folder, val_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "2", "--lr", "50",
                 "--val", str(val_folder)]) == 0
    out = capsys.readouterr().out
    assert "at the start (the random network" in out
    state = load_checkpoint(run)
    quality = quality_of(state)
    assert quality["verdict"] == "not_learned", quality
    # the start ships exactly when no trained network scored above it (a tiny monitor is coarse)
    assert (quality["shipped"] == "start") == (quality["best"] <= quality["start"]), quality
    assert quality["start_step"] == 0 and quality["end_step"] == state["progress"]["step"] == 6
    assert quality["end"] is not None and "val folder 'val'" in quality["monitor"]
    assert f"warning: {quality['reason']}" in out
    if quality["shipped"] == "final":
        assert "shipped_encoder" not in state
        return
    # the exporter's loader builds the shipped network (the start's or the best's), not the final one
    backbone, _ = backbone_from_state(state)
    weights = backbone.state_dict()
    assert torch.equal(weights["conv1.weight"], state["shipped_encoder"]["backbone.conv1.weight"])
    assert not torch.equal(weights["conv1.weight"], state["model"]["encoder_q.backbone.conv1.weight"])


def test_a_run_without_val_ships_its_final_weights_unmeasured(image_folder, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "1"]) == 0
    state = load_checkpoint(run)
    assert quality_of(state)["verdict"] == "unmeasured" and "shipped_encoder" not in state
    backbone, _ = backbone_from_state(state)
    assert torch.equal(backbone.state_dict()["conv1.weight"], state["model"]["encoder_q.backbone.conv1.weight"])


def test_resume_keeps_the_quality_record(image_folder, val_folder, tmp_path, monkeypatch):
    args = [*FAST, "--epochs", "2", "--deterministic", "--val", str(val_folder)]
    assert main(["train", str(image_folder), "--out", str(tmp_path / "straight"), *args]) == 0
    with killed_after_first_epoch(monkeypatch):
        assert main(["train", str(image_folder), "--out", str(tmp_path / "killed"), *args]) == 130
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "killed")
    assert quality_of(resumed) == quality_of(straight)
    assert quality_of(resumed)["start"] is not None
    if "shipped_encoder" in straight:
        for key, value in straight["shipped_encoder"].items():
            assert torch.equal(value, resumed["shipped_encoder"][key]), key
