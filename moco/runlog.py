"""What a run leaves besides its checkpoint, where it stands, and how it stops early.

- `Progress`: epoch, step, time and skipped files, saved in every checkpoint.
- `MetricsLog`: `metrics.jsonl` (one JSON object per line, the record of the run that
  `moco.plot`, the app and the benchmarks read), TensorBoard events when installed, and the
  kNN monitor's plot drawn from it.
- `tidy_run_dir`: what a killed session left in the run folder, cleared before the next starts.
- `StopFlag`, `TrainingStopped`, `TrainingDiverged`: a signal asks for a checkpoint and a clean
  stop; a loss that is no longer a number stops the run without one.

None of it touches the model: the loop in `moco.train` fills these in and decides when.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from indexer.files import atomic_write_bytes, remove_stale_temp_files
from moco.checkpoint import CHECKPOINT_NAME, set_aside
from moco.plot import PLOT_NAME, write_monitor_plot

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps done in all
    elapsed: float = 0.0  # training wall seconds, summed over resumed sessions
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch records
    skipped: dict[str, str] = field(default_factory=dict)  # relpath -> reason

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """The checkpoint's form (`vars(progress)`), keeping only the fields this version knows."""
        return cls(epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"], step=saved["step"],
                   elapsed=saved["elapsed"], history=saved["history"], skipped=saved["skipped"])


def tidy_run_dir(run_dir: Path, *, resuming: bool) -> None:
    """Clear what a killed session left: temp files of interrupted writes and, before a fresh
    run, the records of an attempt killed before its first checkpoint (moved aside to NAME.N,
    so the new metrics.jsonl holds this run only; a folder with a checkpoint is refused
    earlier unless resumed)."""
    for path in remove_stale_temp_files(run_dir, (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME)):
        tqdm.write(f"removed {path.name}, left by an interrupted write")
    if not resuming:
        for old, new in set_aside(run_dir, (METRICS_NAME, PLOT_NAME, TENSORBOARD_NAME)):
            tqdm.write(f"note: {old.name} of an earlier attempt without a checkpoint moved aside to {new.name}")


class MetricsLog:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when available."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / METRICS_NAME
        self.plot_path = run_dir / PLOT_NAME
        self.plot_failed = False
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_NAME))
        except ImportError:  # tensorboard is optional
            pass

    def _truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint: they will be redone."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        text = "".join(line + "\n" for line in kept).encode()
        atomic_write_bytes(self.path, text)

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def plot(self, *, title: str, budget_s: float | None) -> None:
        """Redraw the monitor plot from the records so far. A plot never stops a run: the first
        failure is reported once and later ones are not tried."""
        if self.plot_failed:
            return
        try:
            write_monitor_plot(self.path, self.plot_path, title=title, budget_s=budget_s)
        except (ImportError, OSError, ValueError, RuntimeError) as err:
            self.plot_failed = True
            tqdm.write(f"note: could not draw {PLOT_NAME} ({type(err).__name__}: {err}); training goes on")

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class TrainingStopped(Exception):
    """Raised after a clean stop (signal): the checkpoint is written, the run can resume."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum = signum


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint at the end of the current step; a second SIGINT
    aborts at once (the last checkpoint stays intact)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                   "(Ctrl-C again to abort without saving)")

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
