"""Fault trials: how the product behaves when things go wrong (issue 15, BENCHMARKS.md reliability).

    OMP_NUM_THREADS=1 python bench/fault_trials.py --work /tmp/fault-trials [--quick] [--json OUT]
    git archive OLD | tar -x -C /tmp/old && python bench/fault_trials.py --work /tmp/ft-old --repo /tmp/old

Everything runs against the project's own command lines (and, for the app's upload path and the
readers, its public Python API) in child processes, each with a time limit and a memory cap, on
data this script makes itself: tiny generated pictures, a three-epoch ResNet-18 trained with
``python -m moco train`` at 32 px and exported with ``python -m exports``. No file of the
repository is written; everything lands under ``--work``.

Trial families (one function each, below):

- kills during ``indexer build`` / ``update``: SIGKILL at random moments, then ``indexer info``
  and ``indexer search`` must answer from the old or the new generation, with no file lost, and
  the next run must finish the job;
- kills during ``moco train``: then ``--resume`` must finish and the checkpoint must load;
- readers during updates: one process keeps a ``Collection`` open and searches in a loop (and
  opens a fresh one now and then) while updates commit; errors, short results (fewer than k
  hits when the collection holds k or more) and empty thumbnails are counted;
- bad files: truncated, empty, garbage, huge-aspect, sparse 2 GB, bomb, non-UTF-8 names, a FIFO,
  a folder named like an image, an unreadable folder, a dangling link; build, update and train
  over them; each must be indexed or recorded (``Collection.skipped``, the trainer's output);
- odd images: the peak memory of a build over one odd image against a build without it;
- bad command lines: wrong invocations of the three tools, damaged collections, models whose
  metadata lies; each must exit 2 with one line on stderr;
- bad uploads: ``app.query.embed_upload`` with files that are not usable images;
- a crafted checkpoint (a pickle whose ``__reduce__`` creates a marker file) given to
  ``exports``, ``moco eval`` and ``--resume``: refused, and the marker never created.

Counts printed per family: cases tried; crashes (a non-zero exit other than a clean 2, death by a
signal we did not send, or a time-out); tracebacks ('Traceback' on stderr); wrong/lost (the
family's own notion of a wrong outcome, printed under the table); the children's peak memory
(``ru_maxrss`` from ``wait4``). Exit code: 0 when every trial passed, 1 when any failed, 2 for a
usage error or a set-up that could not run.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pickle
import platform
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.indexer.conftest import picture  # noqa: E402  (the tests' own tiny pictures: one recipe)

SCRIPT = Path(__file__).resolve()
PY = sys.executable
IMAGE_SIZE = 32
COLORS = [(200, 40, 40), (40, 180, 60), (50, 60, 210)]
SEARCH_K = 10
TRAIN_EPOCHS = 3
"""Epochs of the set-up run and of the killed runs: checkpoints at epoch ends give kills something to resume."""
MIN_FAMILY_SECONDS = 20
"""Each family may start cases for at least this long, even when the ones before it ran over."""
MEMORY_SLACK_MB = 300
"""An odd image may cost this much more than the baseline before it counts as unbounded memory."""

INDEXER = [PY, "-m", "indexer"]
MOCO = [PY, "-m", "moco"]
EXPORTS = [PY, "-m", "exports"]
WRITER_FLAGS = ["--device", "cpu", "--no-progress", "--workers", "1", "--threads", "1"]


# --------------------------------------------------------------------------------------------
# Running children: time limit, memory cap, optional SIGKILL at a chosen moment, peak memory.
# --------------------------------------------------------------------------------------------

@dataclass
class Proc:
    """What one child did: exit code (negative: killed by that signal), output, time, peak memory."""

    argv: list[str]
    rc: int
    out: str
    err: str
    seconds: float
    peak_mb: float
    timed_out: bool = False
    killed: bool = False

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.err

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def last_line(self) -> str:
        lines = self.err_lines or [line for line in self.out.splitlines() if line.strip()]
        return lines[-1][:240] if lines else ""

    def describe(self) -> str:
        state = "timed out" if self.timed_out else f"rc={self.rc}"
        return f"{state}: {self.last_line()}"


class Runner:
    """Starts children with the same environment, limits and working folder."""

    def __init__(self, cwd: Path, mem_cap_gb: float, deadline: float, repo: Path = REPO) -> None:
        self.cwd = cwd
        self.repo = repo
        self.mem_cap = int(mem_cap_gb * 2**30)
        self.deadline = deadline
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)})
        self.env = env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _limit(self) -> None:
        # Runs in the child before exec: a runaway decode fails with MemoryError instead of
        # taking the shared machine's memory.
        resource.setrlimit(resource.RLIMIT_DATA, (self.mem_cap, self.mem_cap))

    def spawn(self, argv: Sequence[str]) -> tuple[subprocess.Popen[bytes], Any, Any, float]:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        proc = subprocess.Popen(list(map(str, argv)), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=self.cwd, env=self.env, start_new_session=True, preexec_fn=self._limit)
        return proc, out, err, time.monotonic()

    def finish(self, started: tuple[subprocess.Popen[bytes], Any, Any, float], *, timeout: float,
               kill_at: float | None = None) -> Proc:
        """Wait for a spawned child; SIGKILL its process group at ``kill_at`` or at the time-out."""
        proc, out, err, t0 = started
        killed = timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.monotonic() - t0
            if kill_at is not None and not killed and elapsed >= kill_at:
                _killpg(proc.pid)
                killed = True
            elif not (killed or timed_out) and elapsed >= timeout:
                _killpg(proc.pid)
                timed_out = True
            time.sleep(0.01)
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        texts = []
        for handle in (out, err):
            handle.seek(0)
            texts.append(handle.read().decode("utf-8", "backslashreplace"))
            handle.close()
        argv = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
        return Proc(argv, proc.returncode, texts[0], texts[1], seconds, usage.ru_maxrss / 1024, timed_out, killed)

    def run(self, argv: Sequence[str], *, timeout: float = 120, kill_at: float | None = None) -> Proc:
        return self.finish(self.spawn(argv), timeout=timeout, kill_at=kill_at)


def exited(pid: int) -> bool:
    """Whether a child has ended, without reaping it (Runner.finish must still collect its usage)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One trial. ``count`` > 1 when one record stands for many (a reader's searches)."""

    family: str
    name: str
    count: int = 1
    crash: bool = False
    traceback: bool = False
    wrong: int = 0
    peak_mb: float = 0.0
    seconds: float = 0.0
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.crash or self.traceback or self.wrong > 0


@dataclass
class Family:
    title: str
    wrong_means: str
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: int = 0

    def add(self, case: Case) -> Case:
        self.cases.append(case)
        return case

    def row(self) -> dict[str, Any]:
        return {"family": self.title, "cases": sum(c.count for c in self.cases),
                "crashes": sum(c.crash for c in self.cases), "tracebacks": sum(c.traceback for c in self.cases),
                "wrong": sum(c.wrong for c in self.cases), "peak_mb": max((c.peak_mb for c in self.cases), default=0),
                "skipped_for_time": self.skipped, "wrong_means": self.wrong_means, "notes": self.notes}


def judge_refusal(family: str, name: str, p: Proc, *, accept: Iterable[int] = (2,)) -> Case:
    """A bad input must be refused: exit 2 (or another accepted code), one line, no traceback."""
    accept = set(accept)
    case = Case(family, name, traceback=p.traceback, peak_mb=p.peak_mb, seconds=p.seconds)
    if p.timed_out or p.rc not in accept | {0}:
        case.crash = True
        case.detail = p.describe()
    elif p.rc == 0 and 0 not in accept:
        case.wrong = 1
        case.detail = "accepted (exit 0): " + p.last_line()
    elif p.rc != 0 and len(p.err_lines) != 1:
        case.wrong = 1
        case.detail = f"exit {p.rc} with {len(p.err_lines)} lines on stderr: " + p.last_line()
    elif case.traceback:
        case.detail = p.last_line()
    return case


# --------------------------------------------------------------------------------------------
# Data made here
# --------------------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_labeled(root: Path, *, per_class: int, seed: int, start: int = 0) -> list[Path]:
    """Class folders of generated pictures, JPEG and PNG alternating; returns the files written."""
    written = []
    for c, color in enumerate(COLORS):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            path = folder / (f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg")
            picture(seed * 10_000 + c * 1000 + i, color).save(path)
            written.append(path)
    return written


def flat_png(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    """A constant image of any shape: a few hundred bytes on disk whatever its pixel count."""
    Image.new(mode, (width, height), 90).save(path, optimize=True)
    return path


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space (truncate, never written)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def fs(name: bytes) -> str:
    """A file name from raw bytes (possibly not UTF-8), as Python's os functions take it."""
    return os.fsdecode(name)


def clone_collection(src: Path, dst: Path) -> Path:
    """Copy a collection; the model (never written in place) is hard-linked to save time and disk."""
    remove_tree(dst)
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.is_file():
            if entry.name == "model.onnx":
                os.link(entry, dst / entry.name)
            else:
                shutil.copy2(entry, dst / entry.name)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Write new content under a new inode, so a hard-linked original is never touched."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def remove_tree(path: Path) -> None:
    """rmtree that first gives back permissions a trial took away (unreadable folders)."""
    if not path.exists() and not path.is_symlink():
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; unreadable lines and a missing file give nothing."""
    if not path.is_file():
        return []
    records = [read_json(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return [r for r in records if isinstance(r, dict)]


def read_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Set-up: a real model from the project's own commands, a collection, a query image
# --------------------------------------------------------------------------------------------

@dataclass
class Fixture:
    work: Path
    images: Path
    run_dir: Path
    checkpoint: Path
    model: Path
    collection: Path
    query: Path
    text_file: Path
    train_seconds: float


def train_argv(data: Path | str, out: Path, work: Path, epochs: int = TRAIN_EPOCHS) -> list[str]:
    return [*MOCO, "train", str(data), "--out", str(out), "--epochs", str(epochs), "--image-size", str(IMAGE_SIZE),
            "--workers", "0", "--batch-size", "8", "--device", "cpu", "--cache-dir", str(work / "cache")]


def setup(runner: Runner, work: Path) -> Fixture:
    """Train a few epochs, export, build; reused from an earlier run in the same --work and --repo."""
    base = work / "setup"
    fx = Fixture(work, base / "images", base / "run", base / "run" / "checkpoint.pt", base / "tiny.onnx",
                 base / "collection", base / "query.png", base / "notes.txt", 0.0)
    done = base / "done.json"
    if done.is_file():
        made = json.loads(done.read_text())
        if made.get("epochs") == TRAIN_EPOCHS and made.get("repo") == str(runner.repo):
            fx.train_seconds = made["train_seconds"]
            return fx
    remove_tree(base)
    make_labeled(fx.images, per_class=8, seed=1)
    picture(424242, COLORS[1]).save(fx.query)
    fx.text_file.write_text("not an image\n")
    steps = [("train", train_argv(fx.images, fx.run_dir, work), 600),
             ("export", [*EXPORTS, fx.run_dir, "-o", fx.model, "--device", "cpu"], 300),
             ("build", [*INDEXER, "build", fx.images, "--model", fx.model, "--out", fx.collection, *WRITER_FLAGS], 300)]
    for name, argv, timeout in steps:
        p = runner.run(argv, timeout=timeout)
        if p.rc != 0:
            raise SetupFailed(f"set-up step '{name}' failed ({p.describe()})")
        if name == "train":
            fx.train_seconds = p.seconds
    done.write_text(json.dumps({"train_seconds": fx.train_seconds, "epochs": TRAIN_EPOCHS, "repo": str(runner.repo)}))
    return fx


class SetupFailed(Exception):
    """The product could not make the model or collection the trials need."""


# --------------------------------------------------------------------------------------------
# Family: kills during indexer build and update
# --------------------------------------------------------------------------------------------

def collection_state(runner: Runner, col: Path, query: Path, *, may_be_empty: bool = False
                     ) -> tuple[int | None, list[str], Proc | None]:
    """(items, problems, failed process) as `indexer info` and `indexer search` see the collection.

    items is None when there is no manifest, which only a first build killed before its commit
    may leave (``may_be_empty``). A search for more neighbours than there are items must return
    every item: the index, the vectors and the item table agree."""
    problems: list[str] = []
    if not (col / "manifest.json").exists() and not may_be_empty:
        return None, ["manifest.json lost"], None
    if not (col / "manifest.json").exists():
        p = runner.run([*INDEXER, "info", col], timeout=60)
        if p.rc != 2 or p.traceback:
            problems.append(f"info on an uncommitted collection: {p.describe()}")
            return None, problems, p
        return None, problems, None
    p = runner.run([*INDEXER, "info", col, "--json"], timeout=60)
    manifest = read_json(p.out) if p.rc == 0 else None
    if not isinstance(manifest, dict):
        problems.append(f"info failed: {p.describe()}")
        return None, problems, p
    try:
        count = int(manifest["counts"]["indexed"])
        files = [manifest["model_file"], manifest["index"]["file"]]
        files += [part[key] for part in manifest["vectors"] for key in ("file", "ids") if part.get(key)]
        if manifest.get("projection"):
            files.append(manifest["projection"]["file"])
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"manifest unreadable: {exc!r}")
        return None, problems, None
    lost = [f for f in files if not (col / f).exists()]
    if lost:
        problems.append(f"files lost: {', '.join(lost)}")
    k_all = count + 10
    s = runner.run([*INDEXER, "search", col, query, "-k", str(k_all), "--json", "--device", "cpu"], timeout=60)
    hits = read_json(s.out) if s.rc == 0 else None
    if not isinstance(hits, list):
        problems.append(f"search failed: {s.describe()}")
        return count, problems, s
    if len(hits) != count:
        problems.append(f"a search for {k_all} neighbours returned {len(hits)} hits; info says {count} items")
    return count, problems, None


def kill_index(runner: Runner, fx: Fixture, n_update: int, n_build: int, rng: random.Random) -> Family:
    fam = Family("kills: index build/update", "after the kill, info/search failed, gave neither the old nor the "
                 "new count, lost a file, or the next run did not finish")
    root = fx.work / "kill_index"
    remove_tree(root)
    photos = root / "photos"
    make_labeled(photos, per_class=16, seed=2)
    pristine = root / "pristine"
    p = runner.run([*INDEXER, "build", photos, "--model", fx.model, "--out", pristine, *WRITER_FLAGS], timeout=300)
    if p.rc != 0:
        fam.add(Case(fam.title, "build of the starting collection", crash=True, traceback=p.traceback,
                     detail=p.describe()))
        return fam
    count_old, _, _ = collection_state(runner, pristine, fx.query)
    # The change an update must commit: 8 files gone, 24 new.
    for path in sorted(photos.glob("class[01]/img00[0-3].*")):
        path.unlink()
    make_labeled(photos, per_class=8, seed=3, start=100)
    ref = clone_collection(pristine, root / "reference")
    p = runner.run([*INDEXER, "update", ref, *WRITER_FLAGS], timeout=300)
    count_new, problems, _ = collection_state(runner, ref, fx.query)
    t_update = p.seconds
    p = runner.run([*INDEXER, "build", photos, "--model", fx.model, "--out", root / "reference-build",
                    *WRITER_FLAGS], timeout=300)
    t_build = p.seconds
    fam.notes.append(f"{count_old} -> {count_new} items; an update takes {t_update:.1f} s, a build {t_build:.1f} s")
    if p.rc != 0 or problems:
        fam.add(Case(fam.title, "reference update/build", crash=True, detail=p.describe() + "; ".join(problems)))
        return fam
    not_killed = 0
    for i in range(n_update + n_build):
        if runner.left() <= 0:
            fam.skipped += n_update + n_build - i
            break
        is_update = i < n_update
        duration = t_update if is_update else t_build
        moment = rng.uniform(0.1, 0.97 * duration)
        if is_update:
            col = clone_collection(pristine, root / "trial")
            argv = [*INDEXER, "update", col, *WRITER_FLAGS]
            allowed = {count_old, count_new}
        else:
            col = root / "trial"
            remove_tree(col)
            argv = [*INDEXER, "build", photos, "--model", fx.model, "--out", col, *WRITER_FLAGS]
            allowed = {count_new}
        name = f"{'update' if is_update else 'build'} killed at {moment:.2f} s of {duration:.1f}"
        p = runner.run(argv, timeout=300, kill_at=moment)
        case = fam.add(Case(fam.title, name, traceback=p.traceback, peak_mb=p.peak_mb, seconds=p.seconds))
        if not p.killed:
            not_killed += 1
        if not p.killed and p.rc != 0:
            case.crash, case.detail = True, p.describe()
            continue
        count, problems, failed = collection_state(runner, col, fx.query, may_be_empty=not is_update)
        if failed is not None:
            case.traceback = case.traceback or failed.traceback
        if count is not None and count not in allowed:
            problems.append(f"{count} items, expected {sorted(allowed)}")
        again = runner.run(argv, timeout=300)  # the next run must finish the job (no stale lock)
        case.traceback = case.traceback or again.traceback
        final, more, _ = collection_state(runner, col, fx.query) if again.rc == 0 else (None, [], None)
        if again.rc != 0:
            problems.append(f"the next run failed: {again.describe()}")
        elif final != count_new:
            problems.append(f"the next run left {final} items, expected {count_new}; " + "; ".join(more))
        if problems:
            case.wrong, case.detail = 1, "; ".join(problems)
    if not_killed:
        fam.notes.append(f"{not_killed} run(s) had finished before their kill moment")
    remove_tree(root)
    return fam


# --------------------------------------------------------------------------------------------
# Family: kills during training
# --------------------------------------------------------------------------------------------

def kill_train(runner: Runner, fx: Fixture, n: int, rng: random.Random) -> Family:
    fam = Family("kills: moco train", "--resume failed (or resumed without a checkpoint), the checkpoint did "
                 "not load, or a new run in the killed run's folder mixed its metrics with the old ones")
    root = fx.work / "kill_train"
    remove_tree(root)
    root.mkdir(parents=True)
    leftovers = 0
    for i in range(n):
        if runner.left() <= 0:
            fam.skipped += n - i
            break
        run_dir = root / f"run{i}"
        moment = rng.uniform(1.0, 0.97 * fx.train_seconds)
        p = runner.run(train_argv(fx.images, run_dir, fx.work), timeout=600, kill_at=moment)
        case = fam.add(Case(fam.title, f"train killed at {moment:.1f} s of {fx.train_seconds:.1f}",
                            traceback=p.traceback, peak_mb=p.peak_mb, seconds=p.seconds))
        if not p.killed and p.rc != 0:
            case.crash, case.detail = True, p.describe()
            continue
        had_checkpoint = (run_dir / "checkpoint.pt").exists()
        resume = runner.run([*MOCO, "train", "--resume", run_dir, "--workers", "0", "--device", "cpu"], timeout=600)
        case.traceback = case.traceback or resume.traceback
        if had_checkpoint:
            if resume.rc != 0:
                case.wrong, case.detail = 1, f"--resume failed: {resume.describe()}"
                continue
            load = runner.run([PY, SCRIPT, "_child", "load-checkpoint", run_dir / "checkpoint.pt"], timeout=300)
            case.traceback = case.traceback or load.traceback
            if load.rc != 0:
                case.wrong, case.detail = 1, f"checkpoint does not load: {load.describe()}"
        elif resume.rc != 2 or len(resume.err_lines) != 1:
            case.wrong, case.detail = 1, f"--resume without a checkpoint: {resume.describe()}"
        else:
            # Starting afresh in the folder the killed run left: refused in one line, or a clean new run.
            again = runner.run(train_argv(fx.images, run_dir, fx.work), timeout=600)
            case.traceback = case.traceback or again.traceback
            epochs = [r.get("epoch") for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
            if again.rc == 0 and len(epochs) != len(set(epochs)):
                case.wrong, case.detail = 1, f"a new run in the killed run's folder repeats epochs {epochs} in metrics"
            elif again.rc not in (0, 2) or (again.rc == 2 and len(again.err_lines) != 1):
                case.wrong, case.detail = 1, f"a new run in the killed run's folder: {again.describe()}"
        leftovers += len(list(run_dir.glob(".*.tmp")))
    fam.notes.append(f"temporary checkpoint files left behind: {leftovers}")
    remove_tree(root)
    return fam


# --------------------------------------------------------------------------------------------
# Family: readers during updates
# --------------------------------------------------------------------------------------------

def readers(runner: Runner, fx: Fixture, n_updates: int) -> Family:
    fam = Family("readers during updates", "searches that raised, returned fewer than k hits, or a hit "
                 "without a thumbnail")
    root = fx.work / "readers"
    remove_tree(root)
    photos = root / "photos"
    make_labeled(photos, per_class=10, seed=4)
    col = root / "collection"
    p = runner.run([*INDEXER, "build", photos, "--model", fx.model, "--out", col, *WRITER_FLAGS], timeout=300)
    if p.rc != 0:
        fam.add(Case(fam.title, "build", crash=True, traceback=p.traceback, detail=p.describe()))
        return fam
    ready, stop = root / "ready", root / "stop"
    started = runner.spawn([PY, SCRIPT, "_child", "reader", col, ready, stop, SEARCH_K])
    t0 = time.monotonic()
    while not ready.exists() and time.monotonic() - t0 < 120 and not exited(started[0].pid):
        time.sleep(0.1)
    updates = fam.add(Case(fam.title, "updates committed under the reader", count=0))
    files = sorted(photos.rglob("img*.*"))
    for u in range(n_updates):
        if runner.left() <= 0:
            break
        for path in files[u * 3:u * 3 + 3]:  # 3 removed, 6 new per update
            path.unlink(missing_ok=True)
        make_labeled(photos, per_class=2, seed=5, start=200 + 2 * u)
        p = runner.run([*INDEXER, "update", col, *WRITER_FLAGS], timeout=300)
        updates.traceback = updates.traceback or p.traceback
        if p.rc != 0:
            updates.crash, updates.detail = True, p.describe()
        time.sleep(0.5)
    stop.touch()
    r = runner.finish(started, timeout=120)
    stats = read_json(r.out.strip().splitlines()[-1]) if r.out.strip() else None
    if r.rc != 0 or not isinstance(stats, dict):
        fam.add(Case(fam.title, "reader process", crash=True, traceback=r.traceback, peak_mb=r.peak_mb,
                     detail=r.describe()))
        return fam
    for mode in ("held", "fresh"):
        s = stats[mode]
        wrong = s["errors"] + s["short"] + s["no_thumbnail"]
        detail = (f"{s['errors']} errors, {s['short']} short, {s['no_thumbnail']} without thumbnail"
                  + (f"; first error: {s['first_error']}" if s["first_error"] else "")
                  + (f"; e.g. {s['example_short']}" if s["example_short"] else ""))
        fam.add(Case(fam.title, f"searches, {mode} collection", count=s["searches"], wrong=wrong,
                     traceback=r.traceback, peak_mb=r.peak_mb, detail=detail))
    fam.notes.append(f"{n_updates} updates (3 removed, 6 new each); generations seen by the held reader: "
                     f"{stats['held']['generations']}, lengths {stats['held']['lengths']}")
    remove_tree(root)
    return fam


def child_reader(col: str, ready: str, stop: str, k: str) -> int:
    """Search in a loop until told to stop: a held-open collection, and a fresh one every 10th round."""
    from indexer import Collection

    k_int = int(k)
    held = Collection.open(col, device="cpu")
    rng = np.random.default_rng(0)
    stats = {mode: {"searches": 0, "errors": 0, "short": 0, "no_thumbnail": 0, "first_error": "",
                    "example_short": "", "generations": [], "lengths": []} for mode in ("held", "fresh")}
    Path(ready).touch()
    t_end = time.monotonic() + 600
    rounds = 0
    while not os.path.exists(stop) and time.monotonic() < t_end and rounds < 50_000:
        rounds += 1
        for mode in ("held", "fresh") if rounds % 10 == 0 else ("held",):
            s = stats[mode]
            s["searches"] += 1
            try:
                col_obj = held if mode == "held" else Collection.open(col, device="cpu")
                n = len(col_obj)
                gen = getattr(col_obj, "generation", None)
                if gen not in s["generations"]:
                    s["generations"].append(gen)
                if n not in s["lengths"]:
                    s["lengths"].append(n)
                vector = rng.standard_normal(col_obj.dim).astype(np.float32)
                hits = col_obj.search_vector(vector, k_int)
                if len(hits) < min(k_int, n):
                    s["short"] += 1
                    s["example_short"] = s["example_short"] or f"{len(hits)} hits of {min(k_int, n)}"
                for hit in hits[:3]:
                    if not col_obj.thumbnail(hit.id):
                        s["no_thumbnail"] += 1
                        break
                if mode == "fresh":
                    col_obj.close()
            except Exception as exc:  # counted, not fatal: the point is how often it happens
                s["errors"] += 1
                s["first_error"] = s["first_error"] or f"{type(exc).__name__}: {exc}"[:200]
        time.sleep(0.002)
    print(json.dumps(stats))
    return 0


# --------------------------------------------------------------------------------------------
# Family: bad files in the image folder
# --------------------------------------------------------------------------------------------

@dataclass
class BadEntry:
    tag: str
    must_skip: bool  # True: must be recorded as skipped; False: indexed or recorded, either is fine


def make_bad_files(folder: Path, *, round_: int) -> tuple[list[BadEntry], list[str]]:
    """Every kind of bad entry of issue 15 under ``folder``; returns them and what was not made."""
    folder.mkdir(parents=True, exist_ok=True)
    p = f"r{round_}"
    entries: list[BadEntry] = []
    not_made: list[str] = []

    def add(tag: str, must_skip: bool) -> str:
        entries.append(BadEntry(f"{p}{tag}", must_skip))
        return f"{p}{tag}"

    good_jpeg = encode(picture(round_ * 77, size=(120, 100)), "JPEG")
    good_png = encode(picture(round_ * 77 + 1, size=(120, 100)), "PNG")
    (folder / f"{add('trunc_jpg', True)}.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (folder / f"{add('trunc_png', True)}.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / f"{add('zero', True)}.jpg").write_bytes(b"")
    (folder / f"{add('garbage', True)}.png").write_bytes(np.random.default_rng(round_).bytes(5000))
    flat_png(folder / f"{add('wide', False)}.png", 200_000, 1)
    if round_ == 0:
        sparse_file(folder / f"{add('sparse2g', True)}.tif", 2 * 2**30)
        flat_png(folder / f"{add('bomb', True)}.png", 12_000, 10_000, "L")
        sub = folder / fs(f"{add('nonutf8dir', False)}_".encode() + b"\xe9")
        sub.mkdir()
        picture(5, COLORS[2]).save(sub / "inner.png")
    name = os.fsdecode(f"{add('nonutf8', False)}_".encode() + b"\xff\xfe.jpg")
    (folder / name).write_bytes(good_jpeg)
    os.mkfifo(folder / f"{add('fifo', True)}.jpg")
    named_like_image = folder / f"{add('dirjpg', False)}.jpg"  # a folder: walked into, or recorded
    named_like_image.mkdir()
    picture(round_ * 77 + 2).save(named_like_image / "inside.png")
    os.symlink(folder / "does-not-exist.jpg", folder / f"{add('dangling', True)}.jpg")
    if os.geteuid() != 0:
        locked = folder / add("unreadable", True)
        locked.mkdir()
        picture(6).save(locked / "hidden.png")
        locked.chmod(0)
    else:
        not_made.append("unreadable folder (running as root: nothing is unreadable)")
    return entries, not_made


def check_recorded(runner: Runner, col: Path, entries: list[BadEntry]) -> tuple[list[str], Proc | None]:
    """The tags neither indexed nor recorded as skipped (or indexed where they must be skipped)."""
    p = runner.run([PY, SCRIPT, "_child", "recorded", col], timeout=120)
    found = read_json(p.out) if p.rc == 0 else None
    if not isinstance(found, dict):
        return [f"cannot list the collection: {p.describe()}"], p
    missing = []
    for e in entries:
        skipped = any(e.tag in path for path in found["skipped"])
        indexed = any(e.tag in path for path in found["items"])
        if e.must_skip and not skipped:
            missing.append(e.tag + (" (indexed)" if indexed else ""))
        elif not (skipped or indexed):
            missing.append(e.tag)
    return missing, None


def bad_files(runner: Runner, fx: Fixture, quick: bool) -> Family:
    fam = Family("bad files: build/update/train", "bad entries neither indexed nor recorded (per command)")
    root = fx.work / "bad_files"
    remove_tree(root)
    photos = root / "photos"
    make_labeled(photos, per_class=6, seed=6)
    entries, not_made = make_bad_files(photos / "bad", round_=0)
    fam.notes += [f"not tried: {x}" for x in not_made]
    col = root / "collection"
    steps: list[tuple[str, list[str], list[BadEntry]]] = [
        ("indexer build", [*INDEXER, "build", photos, "--model", fx.model, "--out", col, *WRITER_FLAGS], entries)]
    for name, argv, expected in steps:
        p = runner.run(argv, timeout=240)
        case = fam.add(Case(fam.title, name, count=len(expected), traceback=p.traceback, peak_mb=p.peak_mb,
                            seconds=p.seconds))
        if p.rc != 0:
            case.crash, case.detail = True, p.describe()
        else:
            missing, _ = check_recorded(runner, col, expected)
            case.wrong, case.detail = len(missing), ("not recorded: " + ", ".join(missing)) if missing else ""
    # A second round of bad files, then update.
    more, _ = make_bad_files(photos / "bad2", round_=1)
    if (col / "manifest.json").exists():
        p = runner.run([*INDEXER, "update", col, *WRITER_FLAGS], timeout=240)
        case = fam.add(Case(fam.title, "indexer update", count=len(entries) + len(more), traceback=p.traceback,
                            peak_mb=p.peak_mb, seconds=p.seconds))
        if p.rc != 0:
            case.crash, case.detail = True, p.describe()
        else:
            missing, _ = check_recorded(runner, col, entries + more)
            case.wrong, case.detail = len(missing), ("not recorded: " + ", ".join(missing)) if missing else ""
    else:
        fam.notes.append("update not tried: the build left no collection")
    # Training over the same folder: each bad file must be named in the trainer's output.
    p = runner.run(train_argv(photos, root / "run", fx.work), timeout=300)
    case = fam.add(Case(fam.title, "moco train", count=len(entries) + len(more), traceback=p.traceback,
                        peak_mb=p.peak_mb, seconds=p.seconds))
    if p.rc != 0:
        case.crash, case.detail = True, p.describe()
    else:
        said = p.out + p.err
        missing = [e.tag for e in entries + more if e.must_skip and e.tag not in said]
        case.wrong, case.detail = len(missing), ("not named: " + ", ".join(missing)) if missing else ""
    remove_tree(root)
    return fam


# --------------------------------------------------------------------------------------------
# Family: odd images and memory
# --------------------------------------------------------------------------------------------

def odd_images(runner: Runner, fx: Fixture, quick: bool) -> Family:
    fam = Family("odd images: memory", f"builds that peaked more than {MEMORY_SLACK_MB} MB above a build "
                 "without the odd file (or failed)")
    root = fx.work / "odd_images"
    remove_tree(root)
    makers: list[tuple[str, Callable[[Path], Path]]] = [
        ("none (baseline)", lambda d: d),
        ("200000x1 PNG", lambda d: flat_png(d / "wide.png", 200_000, 1)),
        ("1x200000 PNG", lambda d: flat_png(d / "tall.png", 1, 200_000)),
        ("sparse 2 GB .tif", lambda d: sparse_file(d / "sparse.tif", 2 * 2**30)),
        ("12000x10000 bomb PNG", lambda d: flat_png(d / "bomb.png", 12_000, 10_000, "L")),
    ]
    if quick:
        makers = [m for m in makers if m[0] in ("none (baseline)", "200000x1 PNG", "sparse 2 GB .tif")]
    else:
        makers.append(("2000000x1 PNG", lambda d: flat_png(d / "wider.png", 2_000_000, 1)))
    baseline = 0.0
    for i, (label, make) in enumerate(makers):
        if runner.left() <= 0:
            fam.skipped += len(makers) - i
            break
        photos = root / f"photos{i}"
        make_labeled(photos, per_class=1, seed=7)
        make(photos)
        p = runner.run([*INDEXER, "build", photos, "--model", fx.model, "--out", root / f"col{i}", *WRITER_FLAGS],
                       timeout=240)
        case = fam.add(Case(fam.title, f"build with {label}", traceback=p.traceback, peak_mb=p.peak_mb,
                            seconds=p.seconds, detail=f"peak {p.peak_mb:.0f} MB, {p.seconds:.1f} s"))
        if p.rc != 0:
            case.crash, case.detail = True, p.describe()
        if i == 0:
            baseline = p.peak_mb
        elif p.peak_mb > baseline + MEMORY_SLACK_MB:
            case.wrong = 1
        fam.notes.append(f"{label}: peak {p.peak_mb:.0f} MB, {p.seconds:.1f} s, exit {p.rc}")
        remove_tree(photos)
        remove_tree(root / f"col{i}")
    remove_tree(root)
    return fam


# --------------------------------------------------------------------------------------------
# Family: bad command-line input
# --------------------------------------------------------------------------------------------

def _edit_manifest(col: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((col / "manifest.json").read_text())
    edit(manifest)
    replace_file(col / "manifest.json", json.dumps(manifest).encode())


def _manifest_file(col: Path, *keys: Any) -> Path:
    """The data file a manifest entry names, e.g. ("vectors", 0, "file")."""
    entry: Any = json.loads((col / "manifest.json").read_text())
    for key in keys:
        entry = entry[key]
    return col / entry


def _truncate_half(path: Path) -> None:
    replace_file(path, path.read_bytes()[: path.stat().st_size // 2])


def _replace_database(col: Path, data: bytes) -> None:
    replace_file(col / "items.sqlite", data)
    for suffix in ("-wal", "-shm"):
        (col / f"items.sqlite{suffix}").unlink(missing_ok=True)


DAMAGES: list[tuple[str, bool, Callable[[Path], None]]] = [
    # (name, in --quick, how to damage a copy of the collection)
    ("manifest is []", True, lambda c: replace_file(c / "manifest.json", b"[]")),
    ("manifest is {}", False, lambda c: replace_file(c / "manifest.json", b"{}")),
    ("manifest cut short", False, lambda c: replace_file(c / "manifest.json", b'{"format_version": 1, "gen')),
    ("manifest empty", False, lambda c: replace_file(c / "manifest.json", b"")),
    ("generation not a number", True, lambda c: _edit_manifest(c, lambda m: m.update(generation="abc"))),
    ('"vectors": null', True, lambda c: _edit_manifest(c, lambda m: m.update(vectors=None))),
    ("vectors entry without file", False, lambda c: _edit_manifest(c, lambda m: m["vectors"][0].pop("file"))),
    ("dim not a number", False, lambda c: _edit_manifest(c, lambda m: m.update(dim="x"))),
    ("dim differs from the model", True, lambda c: _edit_manifest(c, lambda m: m.update(dim=128))),
    ("newer format version", False, lambda c: _edit_manifest(c, lambda m: m.update(format_version=999))),
    ("no model_file key", False, lambda c: _edit_manifest(c, lambda m: m.pop("model_file"))),
    ("vectors file truncated", True, lambda c: _truncate_half(_manifest_file(c, "vectors", 0, "file"))),
    ("vectors file missing", False, lambda c: _manifest_file(c, "vectors", 0, "file").unlink()),
    ("ids file truncated", False, lambda c: _truncate_half(_manifest_file(c, "vectors", 0, "ids"))),
    ("index file garbage", False, lambda c: replace_file(_manifest_file(c, "index", "file"), b"\x00garbage" * 100)),
    ("items.sqlite garbage", True, lambda c: _replace_database(c, b"not a database" * 500)),
    ("items.sqlite empty", False, lambda c: _replace_database(c, b"")),
    ("model.onnx garbage", False, lambda c: replace_file(c / "model.onnx", b"\x08\x01garbage" * 100)),
]


MAY_PASS = {("info", "model.onnx garbage")}
"""(command, damage) pairs that may also succeed: info describes the manifest, it need not load the model."""

MODEL_LIES: list[tuple[str, bool, dict[str, str | None], tuple[int, ...]]] = [
    # (name, in --quick, metadata changes ("*": drop all), exit codes accepted from indexer build)
    ("metadata says 128 dims (graph 512)", True, {"moco.embedding_dim": "128"}, (2,)),
    ("metadata says 64 px (graph 32)", True, {"moco.image_size": "64"}, (2,)),
    ("image_size not a number", False, {"moco.image_size": "abc"}, (2,)),
    ("no format_version", False, {"moco.format_version": None}, (2,)),
    ("newer format_version", False, {"moco.format_version": "99"}, (2,)),
    ("resize recipe garbage", False, {"moco.resize": "garbage"}, (2,)),
    # Normalisation happens inside the graph; the indexer may ignore these informational values.
    ("mean with two values", False, {"moco.mean": "0.5,0.5"}, (0, 2)),
    ("no metadata at all", True, {"*": None}, (2,)),
]


def lying_model(src: Path, dst: Path, changes: dict[str, str | None]) -> Path:
    """The exported model with its metadata edited (the graph unchanged)."""
    import onnx

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    if "*" in changes:
        props = {}
    for key, value in changes.items():
        if key == "*":
            continue
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))
    return dst


def cli_cases(fx: Fixture, d: Path, quick: bool) -> list[tuple[str, list[Any], bool, tuple[int, ...]]]:
    """(name, argv, in --quick, accepted exit codes) for the plain wrong invocations."""
    img, col, model, q, txt = fx.images, fx.collection, fx.model, fx.query, fx.text_file
    a_file = next(iter(sorted(img.rglob("*.jpg"))))
    empty = d / "empty-folder"
    empty.mkdir(exist_ok=True)
    textonly = d / "text-only"
    textonly.mkdir(exist_ok=True)
    (textonly / "readme.txt").write_text("no pictures here\n")
    no_ckpt = d / "run-without-checkpoint"
    no_ckpt.mkdir(exist_ok=True)
    bad_ckpt_dir = d / "run-garbage-checkpoint"
    bad_ckpt_dir.mkdir(exist_ok=True)
    (bad_ckpt_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip" * 50)
    zero_ckpt_dir = d / "run-empty-checkpoint"
    zero_ckpt_dir.mkdir(exist_ok=True)
    (zero_ckpt_dir / "checkpoint.pt").write_bytes(b"")
    garbage = d / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(9).bytes(4096))
    missing = d / "does-not-exist"
    out = d / "out"
    two = (2,)
    cases: list[tuple[str, list[Any], bool, tuple[int, ...]]] = [
        ("indexer: no command", [*INDEXER], True, two),
        ("indexer: unknown command", [*INDEXER, "frobnicate"], True, two),
        ("indexer build: missing folder", [*INDEXER, "build", missing, "--model", model, "--out", out / "1"],
         True, two),
        ("indexer build: a file, not a folder", [*INDEXER, "build", a_file, "--model", model, "--out", out / "2"],
         True, two),
        ("indexer build: missing model", [*INDEXER, "build", img, "--model", missing, "--out", out / "3"], True, two),
        ("indexer build: text file as model", [*INDEXER, "build", img, "--model", txt, "--out", out / "4"], True, two),
        ("indexer build: folder as model", [*INDEXER, "build", img, "--model", d, "--out", out / "5"], False, two),
        ("indexer build: no model anywhere", [*INDEXER, "build", img, "--out", out / "6"], False, two),
        ("indexer build: --batch-size 0", [*INDEXER, "build", img, "--model", model, "--batch-size", "0"], True, two),
        ("indexer build: --batch-size abc", [*INDEXER, "build", img, "--model", model, "--batch-size", "abc"],
         False, two),
        ("indexer build: unknown --index", [*INDEXER, "build", img, "--model", model, "--index", "bogus,recipe",
                                            "--out", out / "7"], True, two),
        ("indexer build: --shard 5/2", [*INDEXER, "build", img, "--model", model, "--shard", "5/2"], False, two),
        ("indexer build: --out is a file", [*INDEXER, "build", img, "--model", model, "--out", txt], True, two),
        ("indexer build: unknown flag", [*INDEXER, "build", img, "--frobnicate"], True, two),
        ("indexer update: missing collection", [*INDEXER, "update", missing], True, two),
        ("indexer update: an image folder", [*INDEXER, "update", img], True, two),
        ("indexer search: missing query", [*INDEXER, "search", col, missing], True, two),
        ("indexer search: query not an image", [*INDEXER, "search", col, txt], True, two),
        ("indexer search: -k 0", [*INDEXER, "search", col, q, "-k", "0"], False, two),
        ("indexer search: -k abc", [*INDEXER, "search", col, q, "-k", "abc"], False, two),
        ("indexer info: a file", [*INDEXER, "info", txt], True, two),
        ("indexer eval: an image folder", [*INDEXER, "eval", img], False, two),
        ("indexer dupes: --threshold 2", [*INDEXER, "dupes", col, "--threshold", "2"], False, two),
        ("indexer merge: missing parts", [*INDEXER, "merge", missing, d / "nope2", "--out", out / "8"], False, two),
        ("moco: no command", [*MOCO], True, two),
        ("moco train: missing folder", [*MOCO, "train", missing, "--out", out / "m1"], True, two),
        ("moco train: a file, not a folder", [*MOCO, "train", a_file, "--out", out / "m2"], False, two),
        ("moco train: empty folder", [*MOCO, "train", empty, "--out", out / "m3"], False, two),
        ("moco train: folder without images", [*MOCO, "train", textonly, "--out", out / "m4"], False, two),
        ("moco train: --epochs 0", [*MOCO, "train", img, "--out", out / "m5", "--epochs", "0"], False, two),
        ("moco train: --epochs abc", [*MOCO, "train", img, "--out", out / "m6", "--epochs", "abc"], False, two),
        ("moco train: --image-size 0", [*MOCO, "train", img, "--out", out / "m7", "--image-size", "0"], False, two),
        ("moco train: --preset v9", [*MOCO, "train", img, "--out", out / "m9", "--preset", "v9"], False, two),
        ("moco train: --arch foo", [*MOCO, "train", img, "--out", out / "m10", "--arch", "foo"], False, two),
        ("moco train: --epochs with --time-budget", [*MOCO, "train", img, "--out", out / "m12", "--epochs", "1",
                                                     "--time-budget", "1m"], False, two),
        ("moco train: --out is a file", [*MOCO, "train", img, "--out", txt], False, two),
        ("moco train: unknown flag", [*MOCO, "train", img, "--frobnicate"], False, two),
        ("moco train: --resume missing", [*MOCO, "train", "--resume", missing], False, two),
        ("moco train: --resume without checkpoint", [*MOCO, "train", "--resume", no_ckpt], False, two),
        ("moco train: --resume garbage checkpoint", [*MOCO, "train", "--resume", bad_ckpt_dir], True, two),
        ("moco eval: garbage checkpoint", [*MOCO, "eval", garbage, "--train", img, "--val", img], False, two),
        ("moco eval: missing --train", [*MOCO, "eval", fx.checkpoint, "--train", missing, "--val", img], False, two),
        ("moco demo-data: into a file", [*MOCO, "demo-data", txt], False, two),
        ("exports: no arguments", [*EXPORTS], False, two),
        ("exports: missing checkpoint", [*EXPORTS, missing, "-o", out / "e1.onnx"], False, two),
        ("exports: garbage checkpoint", [*EXPORTS, garbage, "-o", out / "e2.onnx"], True, two),
        ("exports: output folder under a file", [*EXPORTS, fx.checkpoint, "-o", a_file / "e5.onnx"], False, two),
        ("exports: output is a folder", [*EXPORTS, fx.checkpoint, "-o", d], False, two),
        ("exports: --int8 without calibration", [*EXPORTS, fx.checkpoint, "-o", out / "e6.onnx", "--int8"],
         False, two),
        ("exports: --opset abc", [*EXPORTS, fx.checkpoint, "-o", out / "e7.onnx", "--opset", "abc"], False, two),
        ("exports: --calibration missing", [*EXPORTS, fx.checkpoint, "-o", out / "e8.onnx", "--int8",
                                            "--calibration", missing], False, two),
        ("exports: --fp16 --int8", [*EXPORTS, fx.checkpoint, "-o", out / "e9.onnx", "--fp16", "--int8"], False, two),
        ("exports: unknown flag", [*EXPORTS, fx.checkpoint, "--frobnicate"], False, two),
        ("exports info: missing model", [*EXPORTS, "info", missing], False, two),
        ("exports info: garbage model", [*EXPORTS, "info", garbage], True, two),
        ("exports info: a text file", [*EXPORTS, "info", txt], False, two),
    ]
    out.mkdir(exist_ok=True)
    return [c for c in cases if c[2] or not quick]


def bad_cli(runner: Runner, fx: Fixture, quick: bool) -> Family:
    fam = Family("bad command lines", "accepted (exit 0) or a refusal of more than one line")
    d = fx.work / "bad_cli"
    remove_tree(d)
    d.mkdir(parents=True)
    # Each job: (name, a function that prepares the files and returns the command, accepted exit codes).
    jobs: list[tuple[str, Callable[[], list[Any]], tuple[int, ...]]] = [
        (name, (lambda a=argv: a), accept) for name, argv, _, accept in cli_cases(fx, d, quick)]

    def damaged(hurt: Callable[[Path], None], command: Callable[[Path], list[Any]]) -> Callable[[], list[Any]]:
        def prepare() -> list[Any]:
            col = clone_collection(fx.collection, d / "damaged")
            hurt(col)
            return command(col)
        return prepare

    def lying(changes: dict[str, str | None], tool: str) -> Callable[[], list[Any]]:
        def prepare() -> list[Any]:
            bad = lying_model(fx.model, d / "lying.onnx", changes)
            remove_tree(d / "lying-col")
            if tool == "info":
                return [*EXPORTS, "info", bad]
            return [*INDEXER, "build", fx.images, "--model", bad, "--out", d / "lying-col", *WRITER_FLAGS]
        return prepare

    # Damaged collections: readers must refuse; update may repair (exit 0) or refuse (exit 2).
    commands: list[tuple[str, Callable[[Path], list[Any]], tuple[int, ...]]] = [
        ("info", lambda c: [*INDEXER, "info", c], (2,))]
    if not quick:
        commands += [("search", lambda c: [*INDEXER, "search", c, fx.query, "--device", "cpu"], (2,)),
                     ("update", lambda c: [*INDEXER, "update", c, *WRITER_FLAGS], (0, 2))]
    for name, in_quick, hurt in DAMAGES:
        if in_quick or not quick:
            jobs += [(f"indexer {cmd}: {name}", damaged(hurt, argv),
                      (0, 2) if (cmd, name) in MAY_PASS else acc) for cmd, argv, acc in commands]
    # Models whose metadata disagrees with their graph: the indexer must refuse them.
    for name, in_quick, changes, accept in MODEL_LIES:
        if in_quick or not quick:
            jobs.append((f"indexer build: {name}", lying(changes, "build"), accept))
            if not quick:
                jobs.append((f"exports info: {name}", lying(changes, "info"), (0, 2)))
    for n, (name, prepare, accept) in enumerate(jobs):
        if runner.left() <= 0:
            fam.skipped += len(jobs) - n
            break
        p = runner.run(prepare(), timeout=180)
        fam.add(judge_refusal(fam.title, name, p, accept=accept))
    remove_tree(d)
    return fam


# --------------------------------------------------------------------------------------------
# Family: bad uploads (the app's upload path)
# --------------------------------------------------------------------------------------------

def uploads(runner: Runner, fx: Fixture, quick: bool) -> Family:
    fam = Family("bad uploads: app embed_upload", "a bad file accepted, a good one refused, or memory more than "
                 f"{MEMORY_SLACK_MB} MB above a good upload")
    d = fx.work / "uploads"
    remove_tree(d)
    d.mkdir(parents=True)
    good_png = encode(picture(11, size=(120, 90)), "PNG")
    good_jpeg = encode(picture(12, size=(120, 90)), "JPEG")

    def png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
        return flat_png(d / "tmp.png", w, h, mode).read_bytes()

    # (name shown to the app, payload, expected: ok / refused / either)
    payloads: list[tuple[str, bytes, str]] = [
        ("photo.png", good_png, "ok"),
        ("png-named.jpg", good_png, "ok"),
        ("back`tick`s.jpg", good_jpeg, "ok"),
        ("notes.png", b"this is not an image\n" * 20, "refused"),
        ("empty.jpg", b"", "refused"),
        ("noise.webp", np.random.default_rng(3).bytes(8000), "refused"),
        ("cut.jpg", good_jpeg[: len(good_jpeg) // 3], "refused"),
        ("bomb.png", png_bytes(12_000, 10_000, "L"), "refused"),
        ("wide.png", png_bytes(200_000, 1), "either"),
        ("tall.png", png_bytes(1, 200_000), "either"),
        ("`rm -rf ~`.png", b"#!/bin/sh\n" * 30, "refused"),
        ("big.jpg", good_jpeg + b"\x00" * (21 * 2**20), "refused"),
    ]
    if quick:
        payloads = [p for p in payloads if p[0] in ("photo.png", "notes.png", "empty.jpg", "bomb.png", "wide.png",
                                                    "`rm -rf ~`.png")]
    baseline = 0.0
    backticks_raw = 0
    for i, (name, data, expected) in enumerate(payloads):
        if runner.left() <= 0:
            fam.skipped += len(payloads) - i
            break
        path = d / f"payload{i}"
        path.write_bytes(data)
        p = runner.run([PY, SCRIPT, "_child", "upload", fx.collection, name, path], timeout=120)
        case = fam.add(Case(fam.title, f"{name} ({len(data):,} bytes)", traceback=p.traceback, peak_mb=p.peak_mb,
                            seconds=p.seconds))
        result = read_json(p.out.strip().splitlines()[-1]) if p.rc == 0 and p.out.strip() else None
        if not isinstance(result, dict):
            case.crash, case.detail = True, p.describe()
            continue
        outcome, message = result["outcome"], result["message"]
        case.detail = f"{outcome}: {message}"[:240]
        if expected != "either" and outcome != expected:
            case.wrong = 1
        if i == 0:
            baseline = p.peak_mb
        elif p.peak_mb > baseline + MEMORY_SLACK_MB:
            case.wrong = 1
            case.detail += f" (peak {p.peak_mb:.0f} MB, a good upload {baseline:.0f} MB)"
        if "`" in name and "`" in message:
            backticks_raw += 1
        path.unlink()
    fam.notes.append(f"refusals quoting a file name with backticks: {backticks_raw} (the page must escape them)")
    remove_tree(d)
    return fam


def child_upload(col: str, name: str, path: str) -> int:
    """Call the app's upload path once; an UploadError is the expected refusal, anything else escapes."""
    from app.query import UploadError, embed_upload
    from indexer import Collection

    collection = Collection.open(col, device="cpu")
    data = Path(path).read_bytes()
    try:
        result = embed_upload(collection, name, data)
    except UploadError as exc:
        print(json.dumps({"outcome": "refused", "message": str(exc)}))
        return 0
    print(json.dumps({"outcome": "ok", "message": f"embedded, {len(result.vector)} dims"}))
    return 0


# --------------------------------------------------------------------------------------------
# Family: a crafted checkpoint
# --------------------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do with worse code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def crafted_checkpoint(runner: Runner, fx: Fixture, quick: bool) -> Family:
    fam = Family("crafted checkpoint", "the marker file was created (the checkpoint ran code) or the tool "
                 "went on as if the file were fine")
    d = fx.work / "crafted"
    remove_tree(d)
    d.mkdir(parents=True)
    marker = d / "MARKER-code-ran"
    # Variant 1: a bare pickle (torch's legacy format) whose first object runs the code.
    pickled_run = d / "run-pickle"
    pickled_run.mkdir()
    (pickled_run / "checkpoint.pt").write_bytes(pickle.dumps({"config": {}, "model": _RunsCode(str(marker))}))
    variants = [("bare pickle", pickled_run)]
    # Variant 2: the real checkpoint with one extra object, saved by torch (zip format).
    if not quick:
        zipped_run = d / "run-zip"
        zipped_run.mkdir()
        p = runner.run([PY, SCRIPT, "_child", "crafted-checkpoint", fx.checkpoint, zipped_run / "checkpoint.pt",
                        marker], timeout=300)
        if p.rc == 0:
            variants.append(("torch zip", zipped_run))
        else:
            fam.add(Case(fam.title, "making the crafted zip checkpoint", crash=True, detail=p.describe()))
    targets: list[tuple[str, Callable[[Path], list[Any]]]] = [
        ("exports", lambda run: [*EXPORTS, run / "checkpoint.pt", "-o", d / "out.onnx", "--device", "cpu"]),
        ("moco train --resume", lambda run: [*MOCO, "train", "--resume", run, "--workers", "0", "--device", "cpu"]),
        ("moco eval", lambda run: [*MOCO, "eval", run / "checkpoint.pt", "--train", fx.images, "--val", fx.images,
                                   "--device", "cpu"]),
    ]
    if quick:
        targets = targets[:2]
    for vname, run in variants:
        for tname, make_argv in targets:
            if runner.left() <= 0:
                fam.skipped += 1
                continue
            marker.unlink(missing_ok=True)
            p = runner.run(make_argv(run), timeout=300)
            case = judge_refusal(fam.title, f"{tname} <- {vname}", p)
            if marker.exists():
                case.wrong = 1
                case.detail = "code ran (marker created); " + (case.detail or p.describe())
            fam.add(case)
    marker.unlink(missing_ok=True)
    remove_tree(d)
    return fam


def child_crafted_checkpoint(src: str, dst: str, marker: str) -> int:
    import torch

    state = torch.load(src, map_location="cpu", weights_only=False)  # our own file, made by the set-up
    state["provenance"] = _RunsCode(marker)
    torch.save(state, dst)
    return 0


def child_load_checkpoint(path: str) -> int:
    import moco

    module, config = moco.load_backbone(path)
    print(f"loaded {type(module).__name__}, {config.get('arch')}")
    return 0


def child_recorded(col: str) -> int:
    """Print the paths indexed and the paths recorded as skipped, as the public reader sees them."""
    from indexer import Collection

    with Collection.open(col, device="cpu") as c:
        print(json.dumps({"items": [it.path for it in c.items], "skipped": [s["path"] for s in c.skipped]}))
    return 0


CHILDREN: dict[str, Callable[..., int]] = {
    "reader": child_reader, "upload": child_upload, "crafted-checkpoint": child_crafted_checkpoint,
    "load-checkpoint": child_load_checkpoint, "recorded": child_recorded,
}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def print_report(families: list[Family], *, quick: bool, seconds: float) -> None:
    rows = [f.row() for f in families]
    header = f"{'family':32s} {'cases':>6s} {'crashes':>8s} {'tracebacks':>11s} {'wrong/lost':>11s} {'peak MB':>8s}"
    print()
    print(f"fault trials ({'quick' if quick else 'full'}), {seconds / 60:.1f} min, {platform.node()}, "
          f"{os.cpu_count()} cores, {datetime.date.today().isoformat()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        extra = f"  ({r['skipped_for_time']} skipped for time)" if r["skipped_for_time"] else ""
        print(f"{r['family']:32s} {r['cases']:6d} {r['crashes']:8d} {r['tracebacks']:11d} {r['wrong']:11d} "
              f"{r['peak_mb']:8.0f}{extra}")
    print("\nwrong/lost means, per family:")
    for r in rows:
        print(f"  {r['family']}: {r['wrong_means']}")
    notes = [(r["family"], n) for r in rows for n in r["notes"]]
    if notes:
        print("\nnotes:")
        for fam, n in notes:
            print(f"  {fam}: {n}")
    failures = [c for f in families for c in f.cases if c.failed]
    if failures:
        print(f"\nfailed cases ({len(failures)}):")
        for c in failures:
            kinds = [k for k, on in (("crash", c.crash), ("traceback", c.traceback), (f"wrong {c.wrong}", c.wrong))
                     if on]
            print(f"  [{c.family}] {c.name}: {', '.join(kinds)}: {c.detail}")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, exit 2 (the project's rule for every command line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":  # the helper processes started by the trials
        return CHILDREN[argv[1]](*argv[2:])
    families_all = ["cli", "bad_files", "odd_images", "uploads", "crafted", "kill_index", "readers", "kill_train"]
    parser = OneLineParser(prog="fault_trials.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (made; the set-up is reused)")
    parser.add_argument("--quick", action="store_true", help="fewer cases: about 5 minutes on 2 cores")
    parser.add_argument("--json", type=Path, help="write every case and the summary here")
    parser.add_argument("--only", nargs="+", choices=families_all, help="run only these families")
    parser.add_argument("--repo", type=Path, default=REPO, help="the project tree to try (default: the one "
                        "holding this script), e.g. an unpacked older commit to compare against")
    parser.add_argument("--seed", type=int, default=0, help="seed for the kill moments")
    parser.add_argument("--budget", type=_positive_float, default=None, help="seconds for the whole run "
                        "(default 300 with --quick, 900 without); cases past it are skipped and counted")
    parser.add_argument("--mem-cap-gb", type=_positive_float, default=4.0, help="data-segment limit of every child "
                        "(default 4), so a runaway decode cannot take the shared machine's memory")
    args = parser.parse_args(argv)
    if args.work.exists() and not args.work.is_dir():
        parser.error(f"--work {args.work} is a file")
    if args.work.resolve().is_relative_to(REPO):
        parser.error("--work must be outside the repository (the trials write gigabyte-sized sparse files there)")
    if not (args.repo / "indexer" / "__main__.py").is_file():
        parser.error(f"--repo {args.repo} holds no project (no indexer/__main__.py)")
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json: no folder {args.json.parent}")
    work = args.work.resolve()
    (work / "cwd").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    budget = args.budget or (300.0 if args.quick else 900.0)
    runner = Runner(work / "cwd", args.mem_cap_gb, t0 + budget, args.repo.resolve())
    rng = random.Random(args.seed)
    try:
        fx = setup(runner, work)
    except SetupFailed as exc:
        print(f"fault_trials: error: {exc}", file=sys.stderr)
        return 2
    q = args.quick
    # (family, share of the time left, trials): each family starts cases while its share of what
    # is left when it begins lasts, so one slow family cannot starve the others, and a quick one
    # passes its time on. A case once started runs to its end (or its own time-out).
    plan: list[tuple[str, float, Callable[[], Family]]] = [
        ("cli", 0.45, lambda: bad_cli(runner, fx, q)),
        ("bad_files", 0.06, lambda: bad_files(runner, fx, q)),
        ("odd_images", 0.05, lambda: odd_images(runner, fx, q)),
        ("uploads", 0.04, lambda: uploads(runner, fx, q)),
        ("crafted", 0.09, lambda: crafted_checkpoint(runner, fx, q)),
        ("kill_index", 0.20, lambda: kill_index(runner, fx, 2 if q else 10, 1 if q else 10, rng)),
        ("readers", 0.04, lambda: readers(runner, fx, 2 if q else 6)),
        ("kill_train", 0.16, lambda: kill_train(runner, fx, 1 if q else 4, rng)),
    ]
    plan = [step for step in plan if not args.only or step[0] in args.only]
    end = t0 + budget
    weight_left = sum(weight for _, weight, _ in plan)
    families: list[Family] = []
    for key, weight, fn in plan:
        t = time.monotonic()
        runner.deadline = t + max(MIN_FAMILY_SECONDS, (end - t) * weight / weight_left)
        weight_left -= weight
        print(f"[{t - t0:6.0f} s] {key} ...", file=sys.stderr, flush=True)
        try:
            families.append(fn())
        except Exception:  # a fault in this script, not in the product: report it and go on
            fam = Family(key, "-")
            fam.add(Case(key, "harness error", crash=True, detail=traceback.format_exc().splitlines()[-1]))
            traceback.print_exc()
            families.append(fam)
        print(f"[{time.monotonic() - t0:6.0f} s] {key} done in {time.monotonic() - t:.0f} s", file=sys.stderr,
              flush=True)
    seconds = time.monotonic() - t0
    print_report(families, quick=q, seconds=seconds)
    if args.json:
        report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
                  "cores": os.cpu_count(), "quick": q, "seconds": round(seconds, 1), "seed": args.seed,
                  "families": [f.row() for f in families],
                  "cases": [asdict(c) for f in families for c in f.cases]}
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, prefix=f".{args.json.name}.")
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, args.json)
    return 1 if any(c.failed for f in families for c in f.cases) else 0


if __name__ == "__main__":
    sys.exit(main())
