"""A CPU run leaves cores to processes that start after it and takes them back when they end
(moco.train's `share_cores`, indexer.threads.CoreShare)."""

from __future__ import annotations

import pytest
import torch

import moco.train
from indexer.threads import CoreShare
from moco.__main__ import main
from tests.moco.conftest import make_image_folder

FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--no-channels-last", "--epochs", "2"]


class Neighbours:
    """Other processes' load as the run sees it, look after look."""

    def __init__(self, *loads: float) -> None:
        self.loads = list(loads)

    def others_busy(self) -> float | None:
        return self.loads.pop(0) if self.loads else None


@pytest.fixture
def two_cores(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(moco.train, "available_cores", lambda: 2)
    monkeypatch.setattr(moco.train, "SHARE_CHECK_S", 0.0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_run_gives_a_core_to_a_newcomer_and_takes_it_back(tmp_path, monkeypatch, capsys, two_cores,
                                                            deterministic):
    monkeypatch.setattr(CoreShare, "for_this_process", staticmethod(lambda: Neighbours(0.1, 1.0, 1.0, 0.2)))
    data = make_image_folder(tmp_path / "data")
    extra = ["--deterministic"] if deterministic else []
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *FAST, *extra]) == 0
    out = capsys.readouterr().out
    if deterministic:  # its float reductions must not change order: it keeps its threads
        assert "threads 2 -> 1" not in out
    else:
        assert "threads 2 -> 1: other processes keep 1.0 of this run's 2 cores busy" in out
        assert "threads 1 -> 2: other processes keep 0.2 of this run's 2 cores busy" in out
        assert out.index("threads 2 -> 1") < out.index("threads 1 -> 2")


def test_the_precision_is_timed_again_with_the_threads_left_when_others_took_cores(tmp_path, monkeypatch, capsys,
                                                                                   two_cores):
    """Two runs started together time their steps while both hold every core, where bf16 looks far
    slower than it is on a core of its own; the run times again once it has given cores up."""
    from moco import precision, step_timing

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(CoreShare, "for_this_process", staticmethod(lambda: Neighbours(1.0, 1.0)))
    monkeypatch.setattr(moco.train, "SHARE_CHECK_S", 3600.0)  # only the look right after the timing
    timed_at = []

    def contended(config, device, world_size=1):
        timed_at.append(torch.get_num_threads())
        return {"fp32": 60.0, "bf16": 10.0} if len(timed_at) == 1 else {"fp32": 68.0, "bf16": 118.0}

    monkeypatch.setattr(step_timing, "precision_rates", contended)
    data = make_image_folder(tmp_path / "data")
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *FAST]) == 0
    out = capsys.readouterr().out
    assert timed_at == [2, 1]
    assert out.index("threads 2 -> 1") < out.index("precision: bf16: the model step timed at 118 img/s")
