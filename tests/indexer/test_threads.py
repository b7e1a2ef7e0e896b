"""The cores a process really has and passive OpenMP waiting (indexer.threads), set before
torch or ONNX Runtime loads in every command-line entry point and the app's child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from indexer import threads

ROOT = Path(__file__).resolve().parents[2]


def test_cgroup_quotas_are_read_as_cpus():
    assert threads.quota_from_cgroup_v2("150000 100000\n") == 1.5
    assert threads.quota_from_cgroup_v2("max 100000\n") is None
    assert threads.quota_from_cgroup_v2("garbage") is None
    assert threads.quota_from_cgroup_v1("200000\n", "100000\n") == 2.0
    assert threads.quota_from_cgroup_v1("-1\n", "100000\n") is None


def test_available_cores_follow_the_affinity_mask_and_the_quota(tmp_path):
    affinity = threads.affinity_cores()
    assert affinity == len(os.sched_getaffinity(0))
    assert threads.available_cores(tmp_path) == affinity  # no cgroup files: the mask alone
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert threads.available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.available_cores(tmp_path) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.available_cores(v1) == 1


def test_passive_waiting_after_a_short_spin_unless_the_user_chose(monkeypatch):
    assert threads.child_environment({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE",
                                                           "GOMP_SPINCOUNT": "10000"}
    chosen = threads.child_environment({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "0"})
    assert (chosen["OMP_WAIT_POLICY"], chosen["GOMP_SPINCOUNT"]) == ("ACTIVE", "0")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert threads.configure_process() == threads.available_cores()
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]) == ("PASSIVE", "10000")


# Records the policy and spin count at the moment torch or onnxruntime is first imported, then imports MODULE.
PROBE = """
import importlib.abc, os, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("torch", "onnxruntime") and name not in seen:
            seen[name] = os.environ.get("OMP_WAIT_POLICY", "-") + "/" + os.environ.get("GOMP_SPINCOUNT", "-")
        return None
sys.meta_path.insert(0, Probe())
import MODULE
import torch, onnxruntime
print(seen.get("torch"), seen.get("onnxruntime"))
"""


@pytest.mark.parametrize("module", ["moco.__main__", "exports.__main__", "indexer.__main__"])
def test_each_entry_point_sets_the_policy_before_torch_or_onnxruntime_load(module):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE.replace("MODULE", module)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120, check=True).stdout.split()
    assert out == ["PASSIVE/10000", "PASSIVE/10000"]


@pytest.mark.parametrize(("others", "threads_left"), [(0.0, 4), (0.5, 4), (0.6, 3), (1.0, 3), (2.7, 1),
                                                      (9.0, 1)])
def test_a_core_is_left_to_other_processes_once_they_keep_most_of_it_busy(others, threads_left):
    assert threads.threads_beside(4, others) == threads_left


def write_process(root: Path, pid: str, ticks: tuple[int, int], children: tuple[str, ...] = (),
                  ended_children: tuple[int, int] = (0, 0)) -> None:
    """/proc/PID/stat with (utime, stime) and (cutime, cstime), and the live children of its thread."""
    (root / pid / "task" / "1").mkdir(parents=True, exist_ok=True)
    fields = ["S", *["0"] * 10, *map(str, ticks), *map(str, ended_children), *["0"] * 28]
    (root / pid / "stat").write_text(f"4242 (python (odd) name) {' '.join(fields)}\n")
    (root / pid / "task" / "1" / "children").write_text("".join(f"{child} " for child in children))


def fake_proc(root: Path, cpu_lines: list[str], own_ticks: tuple[int, int], children: tuple[str, ...] = (),
              ended_children: tuple[int, int] = (0, 0)) -> Path:
    (root / "stat").parent.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text("cpu  1 2 3 4 5 6 7 8 9 10\n" + "".join(f"{line}\n" for line in cpu_lines)
                               + "intr 12345\nctxt 678\n")
    write_process(root, "self", own_ticks, children, ended_children)
    return root


def test_the_kernels_counters_are_read_for_the_processs_own_cpus_only(tmp_path):
    text = "cpu0 10 0 5 80 5 0 0 0 0 0\ncpu1 1 1 1 1 1 1 1 1 0 0\ncpu2 100 0 0 0 0 0 0 0 0 0\n"
    assert threads.cpu_ticks(text, {0, 1}) == (15 + 6, 100 + 8)
    proc = fake_proc(tmp_path, ["cpu0 0 0 0 0 0 0 0 0 0 0"], (70, 30))
    assert threads.process_ticks((proc / "self" / "stat").read_text()) == 100


def test_core_share_counts_only_what_other_processes_did(tmp_path):
    """Two CPUs for 100 ticks each: 150 busy ticks on them, 60 of them this process's own: the
    others kept 0.9 of a core busy."""
    proc = fake_proc(tmp_path, ["cpu0 0 0 0 0 0 0 0 0 0 0", "cpu1 0 0 0 0 0 0 0 0 0 0"], (0, 0))
    share = threads.CoreShare({0, 1}, proc)
    fake_proc(tmp_path, ["cpu0 90 0 0 10 0 0 0 0 0 0", "cpu1 60 0 0 40 0 0 0 0 0 0"], (50, 10))
    assert share.others_busy() == pytest.approx(0.9)
    assert share.others_busy() is None  # no time passed since the last look: nothing to say
    (proc / "stat").unlink()
    assert share.others_busy() is None  # unreadable counters: no advice, no crash


def test_the_processs_own_workers_are_not_competition(tmp_path):
    """Two CPUs for 100 ticks each, all 200 busy: the process did 80, its live data loader
    worker 70 (and that worker's own child 20), and a worker that ended and was waited for 30.
    Nothing is left for other processes: the run keeps its threads."""
    cpus = ["cpu0 0 0 0 0 0 0 0 0 0 0", "cpu1 0 0 0 0 0 0 0 0 0 0"]
    proc = fake_proc(tmp_path, cpus, (0, 0))
    share = threads.CoreShare({0, 1}, proc)
    fake_proc(tmp_path, ["cpu0 100 0 0 0 0 0 0 0 0 0", "cpu1 100 0 0 0 0 0 0 0 0 0"], (60, 20),
              children=("71", "72"), ended_children=(25, 5))
    write_process(tmp_path, "71", (50, 20), children=("90",))
    write_process(tmp_path, "90", (20, 0))
    # 72 is listed but ended before its stat was read
    assert share.others_busy() == pytest.approx(0.0)
    assert threads.threads_beside(2, 0.0) == 2


def test_a_real_child_process_counts_as_the_processs_own_work():
    """On this machine's /proc: a child that used 0.3 s of CPU adds it to this process's tree
    ticks while it lives, and still after it ended and was waited for."""

    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        pytest.skip("no /proc")
    spin = "import time\nwhile time.process_time() < 0.3: pass\nprint('spun', flush=True)\ntime.sleep(60)"
    before = threads.process_tree_ticks(proc)
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spun"
        during = threads.process_tree_ticks(proc)
    finally:
        child.kill()
        child.wait()
    assert during - before >= 0.25 * os.sysconf("SC_CLK_TCK")  # most of the child's 0.3 s of CPU
    assert threads.process_tree_ticks(proc) >= during
    assert threads.process_ticks((proc / "self" / "stat").read_text()) < threads.process_tree_ticks(proc)
