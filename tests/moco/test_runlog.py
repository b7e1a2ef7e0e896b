"""What a run leaves besides its checkpoint (`moco.runlog`): the metrics file on a fresh start and
on resume, the run folder tidied after a kill, progress as the checkpoint stores it, the stop
signals, and the kNN monitor's curve."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from moco.evaluate import subset
from moco.plot import write_monitor_plot
from moco.runlog import METRICS_NAME, MetricsLog, Progress, StopFlag, TrainingStopped, tidy_run_dir


def write_records(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def read_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# -- the metrics file ---------------------------------------------------------------------------------
def test_a_resumed_log_drops_the_records_written_after_the_checkpoint(tmp_path):
    write_records(tmp_path / METRICS_NAME, [{"kind": "step", "step": s, "loss": 1.0} for s in range(1, 6)],
                  tail='{"kind": "step", "st')  # the line the kill tore
    log = MetricsLog(tmp_path, resume_step=3)  # the checkpoint was written at step 3
    log.write({"kind": "step", "step": 4, "loss": 0.5})
    log.close()
    assert read_steps(tmp_path / METRICS_NAME) == [1, 2, 3, 4]  # steps 4 and 5 are redone, once
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_fresh_log_appends_every_record_on_its_own_line(tmp_path):
    log = MetricsLog(tmp_path, resume_step=None)
    for step in (1, 2):
        log.write({"kind": "step", "step": step, "loss": 2.0 / step})
    assert read_steps(tmp_path / METRICS_NAME) == [1, 2]  # flushed as written: a kill loses nothing
    log.close()


def test_tidying_removes_torn_writes_and_sets_an_earlier_attempt_aside(tmp_path, capsys):
    (tmp_path / ".checkpoint.pt.0a1b2c3d.tmp").write_bytes(b"torn")
    (tmp_path / ".notes.txt.0a1b2c3d.tmp").write_text("not ours")
    write_records(tmp_path / METRICS_NAME, [{"kind": "step", "step": 1}])
    tidy_run_dir(tmp_path, resuming=True)  # a resumed run keeps its records
    assert not (tmp_path / ".checkpoint.pt.0a1b2c3d.tmp").exists() and (tmp_path / ".notes.txt.0a1b2c3d.tmp").exists()
    assert (tmp_path / METRICS_NAME).exists()
    assert "removed .checkpoint.pt.0a1b2c3d.tmp" in capsys.readouterr().out

    tidy_run_dir(tmp_path, resuming=False)  # a fresh run starts its own, the old ones kept aside
    assert not (tmp_path / METRICS_NAME).exists() and read_steps(tmp_path / f"{METRICS_NAME}.1") == [1]
    assert "moved aside to metrics.jsonl.1" in capsys.readouterr().out


def test_progress_round_trips_through_the_checkpoint_form():
    progress = Progress(epoch=2, batch_in_epoch=3, step=23, elapsed=61.5, history=[{"kind": "epoch", "epoch": 2}],
                        skipped={"a/b.jpg": "cannot decode"})
    assert Progress.from_dict(vars(progress)) == progress
    assert Progress.from_dict({**vars(progress), "from_a_newer_version": 1}) == progress


# -- stopping -----------------------------------------------------------------------------------------
def test_a_signal_asks_for_a_stop_and_a_second_interrupt_aborts(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        assert stop.signum is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the loop saves at the end of the step, then stops
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # asked twice: at once, the last checkpoint intact
    assert signal.getsignal(signal.SIGINT) is before
    assert "SIGTERM received: saving a checkpoint after this step" in capsys.readouterr().out
    assert str(TrainingStopped(signal.SIGTERM, 12)) == "stopped by SIGTERM at step 12"


# -- the kNN monitor and its plot -------------------------------------------------------------------------
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


def test_a_plot_that_cannot_be_written_is_reported_once_and_never_stops_the_run(tmp_path, capsys):
    (tmp_path / "monitor.png").mkdir()  # where the picture should go, a folder
    log = MetricsLog(tmp_path, resume_step=None)
    log.write({"kind": "eval", "step": 1, "knn_top1": 0.5, "time": 6.0})
    log.plot(title="t", budget_s=None)
    log.plot(title="t", budget_s=None)
    log.write({"kind": "eval", "step": 2, "knn_top1": 0.6, "time": 12.0})
    log.close()
    out = capsys.readouterr().out
    assert out.count("could not draw monitor.png") == 1 and "training goes on" in out
    assert read_steps(tmp_path / METRICS_NAME) == [1, 2]
