"""How many threads a process may use, and how its idle OpenMP threads wait.

PyTorch and ONNX Runtime size their thread pools from the machine's core count, not from the
cores this process may actually run on (a CPU affinity mask, a container's CPU quota), and their
OpenMP threads busy-wait for work between operations. On a shared machine both hurt: two
training processes on two cores, each spinning two threads, measured 5-13 img/s each against
about 110 alone (issue 17). `available_cores` counts what the process really has;
`configure_process` sets passive waiting after a short spin in the environment, which OpenMP
reads once when the runtime loads, so it must run before torch or onnxruntime is imported: the
command-line entry points call it first, and the app puts `child_environment()` into its child
processes. A process that started alone can still find others beside it later: `CoreShare`
tells a long-running one (the trainer) when to give cores up and when to take them back.

Torch-free (only the standard library), so the serving side and the trainer share it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
SHORT_SPIN = "10000"
"""How long GNU OpenMP's threads (PyTorch's on Linux) spin before they sleep; it overrides the
passive policy's zero. Fully passive threads sleep between every two operations and each wake-up
costs: a lone bf16 training step ran 0.61x as fast as with this short spin (130 against 208 img/s,
ResNet-18 at 64 px on a 2-core AMX Xeon), fp32 0.69x. A short spin keeps that speed, and
processes sharing the cores stay apart because the trainer gives a core up to each newcomer
(CoreShare below)."""
CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cores() -> int:
    """CPUs this process may be scheduled on (its affinity mask), or os.cpu_count() where the
    platform has no affinity call."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def quota_from_cgroup_v2(text: str) -> float | None:
    """`cpu.max` ("QUOTA PERIOD", or "max PERIOD" when unlimited) -> CPUs the quota allows."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_from_cgroup_v1(quota_text: str, period_text: str) -> float | None:
    """cfs_quota_us (-1 when unlimited) and cfs_period_us -> CPUs the quota allows."""
    try:
        quota, period = float(quota_text.strip()), float(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the container's quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), or
    None when no quota is set or none can be read."""
    try:
        return quota_from_cgroup_v2((root / "cpu.max").read_text())
    except OSError:
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            return quota_from_cgroup_v1((folder / "cpu.cfs_quota_us").read_text(),
                                        (folder / "cpu.cfs_period_us").read_text())
        except OSError:
            continue
    return None


def available_cores(root: Path = CGROUP_ROOT) -> int:
    """Cores this process can really use: the affinity mask, lowered to the cgroup quota
    (rounded up: a quota of 1.5 CPUs still runs two threads usefully part of the time)."""
    cores = affinity_cores()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit - 1e-9)))
    return cores


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that will load PyTorch or ONNX Runtime: passive
    OpenMP waiting unless the user chose a policy themselves."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault(WAIT_POLICY_ENV, PASSIVE)
    env.setdefault(SPIN_COUNT_ENV, SHORT_SPIN)
    return env


def configure_process() -> int:
    """Set passive OpenMP waiting for this process (unless the user set a policy) and return the
    cores available. Call it before importing torch or onnxruntime: OpenMP reads the policy once,
    when its runtime loads."""
    os.environ.setdefault(WAIT_POLICY_ENV, PASSIVE)
    os.environ.setdefault(SPIN_COUNT_ENV, SHORT_SPIN)
    return available_cores()


TAKEN_SHARE = 0.6
"""Share of a core other processes must keep busy before a process leaves that core to them."""


def threads_beside(cores: int, others_busy: float) -> int:
    """Threads for a process that has `cores` cores of which other processes keep `others_busy`
    busy: one per core left to it, at least one. On two cores, two training processes of two
    threads each ran 8 img/s each in bf16 (AMX) and 67 in fp32; with one thread each 118 and 68
    (BENCHMARKS.md, "Sharing the cores")."""
    taken = math.floor(max(0.0, others_busy) + (1.0 - TAKEN_SHARE))
    return max(1, cores - taken)


def cpu_ticks(stat_text: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of `cpus` from /proc/stat's per-CPU lines: busy is user, nice,
    system, irq, softirq and steal; total adds idle and iowait."""
    busy = total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in rest.split()[:8]] + [0] * 8
        user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def process_ticks(stat_text: str, *, ended_children: bool = False) -> int:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in clock ticks; with
    `ended_children`, plus cutime + cstime: the children that ended and were waited for."""
    fields = stat_text.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line
    return ticks + (int(fields[13]) + int(fields[14]) if ended_children else 0)


def process_tree_ticks(proc: Path, pid: str = "self") -> int:
    """Clock ticks of a process and of every process it started, live or ended: the data loader
    workers decoding images for a training run are the run's own work, not competition for its
    cores. A child that ends between two looks moves from the live sum to its parent's
    cutime/cstime once it is waited for, so the total keeps counting it."""
    base = proc / pid
    total = process_ticks((base / "stat").read_text(), ended_children=True)
    for children in base.glob("task/*/children"):
        for child in children.read_text().split():
            try:
                total += process_tree_ticks(proc, child)
            except (OSError, ValueError, IndexError):
                pass  # it ended while we looked
    return total


class CoreShare:
    """How many of this process's cores other processes kept busy since the last look, from the
    kernel's per-CPU counters (Linux /proc). A process that sized its threads to the machine at
    start can then leave cores to processes started after it, and take them back when they end.

    Only meaningful where the CPUs of the affinity mask are the whole limit: under a cgroup quota
    other containers' work on the same CPUs would count as competition (`for_this_process` then
    gives None)."""

    def __init__(self, cpus: set[int], proc: Path = Path("/proc")) -> None:
        self.cpus, self.proc = cpus, proc
        self.last = self._read()

    @classmethod
    def for_this_process(cls, proc: Path = Path("/proc")) -> CoreShare | None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
        if cgroup_cpu_limit() is not None or len(cpus) < 2:
            return None
        try:
            return cls(cpus, proc)
        except (OSError, ValueError, IndexError):
            return None

    def _read(self) -> tuple[int, int, int]:
        busy, total = cpu_ticks((self.proc / "stat").read_text(), self.cpus)
        return busy, total, process_tree_ticks(self.proc)

    def others_busy(self) -> float | None:
        """Cores' worth of work other processes did on our CPUs since the last call (None if
        the counters cannot be read or too little time passed)."""
        try:
            now = self._read()
        except (OSError, ValueError, IndexError):
            return None
        busy, total, own = (a - b for a, b in zip(now, self.last))
        if total <= 0:
            return None
        self.last = now
        return max(0.0, (busy - own) / (total / len(self.cpus)))
