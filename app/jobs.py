"""Long jobs (the demo build, collection builds and updates) as child processes in the background.

Why child processes: the app must not import torch (Architecture: the serving side is
torch-free), and a build holds CPU and memory for minutes; in a child it cannot stall the
server's other sessions, and it is the very same command a user would type. Why a background
thread per job, kept in a process-wide registry: a Streamlit script run is stopped whenever its
session interacts or closes; a job owned by a script run would die with it (or be started twice
by two sessions). Pages only *look* at a job: each rerun draws its stages from :class:`Job`.

Progress comes from the children's own tqdm bars: their output is read as it arrives, split at
carriage returns, and the last bar's percentage becomes the stage's fraction.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.threads import child_environment

__all__ = ["Job", "Stage", "StageState", "get", "python_module", "start"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PERCENT = re.compile(r"(\d{1,3})%\|")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def python_module(module: str, *args: str | os.PathLike[str]) -> list[str]:
    """``python -m module args…`` with this interpreter (the one serving the app)."""
    return [sys.executable, "-m", module, *map(str, args)]


@dataclass(frozen=True)
class Stage:
    """One command of a job; ``skip`` says (when called just before it runs) that it is done."""

    label: str
    argv: Sequence[str]
    skip: Callable[[], bool] | None = None


@dataclass
class StageState:
    label: str
    status: str = "pending"  # pending, running, done, skipped, failed
    fraction: float | None = None
    line: str = ""  # the latest progress or output line
    started: float | None = None
    ended: float | None = None

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started


@dataclass
class Job:
    """A sequence of commands run one after another in a background thread."""

    key: str
    title: str
    stages: list[Stage]
    cwd: Path
    states: list[StageState] = field(init=False)
    log: deque[str] = field(init=False)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _cancelled: bool = False

    def __post_init__(self) -> None:
        self.states = [StageState(s.label) for s in self.stages]
        self.log = deque(maxlen=200)

    @property
    def status(self) -> str:
        """running, done, failed or cancelled."""
        if self.ended is None:
            return "running"
        if self._cancelled:
            return "cancelled"
        return "failed" if self.error else "done"

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def start(self) -> Job:
        self._thread = threading.Thread(target=self._run, name=f"job:{self.key}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (tests and the command line); False on timeout."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ended is not None

    def cancel(self) -> None:
        self._cancelled = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def _run(self) -> None:
        try:
            for stage, state in zip(self.stages, self.states):
                if self._cancelled:
                    break
                state.started = time.monotonic()
                if stage.skip is not None and stage.skip():
                    state.status, state.ended, state.fraction = "skipped", time.monotonic(), 1.0
                    continue
                state.status = "running"
                code = self._run_stage(stage, state)
                state.ended = time.monotonic()
                if code != 0:
                    state.status = "failed"
                    if not self._cancelled:
                        self.error = f"{stage.label} failed: {self._last_message()}"
                    break
                state.status, state.fraction = "done", 1.0
        except Exception as exc:  # noqa: BLE001 - a job thread must record, never vanish silently
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended = time.monotonic()

    def _run_stage(self, stage: Stage, state: StageState) -> int:
        # The children are this project's own commands: make them importable from any cwd.
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        # passive OpenMP waiting in the children (indexer.threads): they share the cores with the app
        env = child_environment({**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
        self.log.append("$ " + " ".join(map(str, stage.argv)))
        process = subprocess.Popen(list(map(str, stage.argv)), cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._process = process
        if self._cancelled:  # cancel() came between the stage starting and the child existing
            process.terminate()
        assert process.stdout is not None
        pending = b""
        while chunk := process.stdout.read1(65536):
            pending += chunk
            *segments, pending = re.split(rb"[\r\n]", pending)
            for segment in segments:
                self._take(segment, state)
        self._take(pending, state)
        return process.wait()

    def _take(self, raw: bytes, state: StageState) -> None:
        text = _ANSI.sub("", raw.decode("utf-8", "replace")).strip()
        if not text:
            return
        state.line = text
        match = _PERCENT.search(text)
        if match:
            state.fraction = min(1.0, int(match.group(1)) / 100.0)
        elif not self.log or self.log[-1] != text:
            self.log.append(text)

    def _last_message(self) -> str:
        for line in reversed(self.log):
            if not line.startswith("$ "):
                return line
        return "no output"


_jobs: dict[str, Job] = {}
_lock = threading.Lock()


def get(key: str) -> Job | None:
    with _lock:
        return _jobs.get(key)


def start(key: str, title: str, stages: list[Stage], cwd: Path) -> Job:
    """Start a job unless one with this key is running already (then return that one), so two
    sessions asking for the same build share it."""
    with _lock:
        job = _jobs.get(key)
        if job is not None and job.status == "running":
            return job
        job = Job(key, title, stages, cwd)
        _jobs[key] = job
        return job.start()
