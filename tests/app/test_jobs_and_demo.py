"""Background jobs (progress from the children's tqdm bars, failures, sharing) and the demo build."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from app import demo, jobs
from tests.app.conftest import make_app

TQDM_CHILD = """
import sys, time
from tqdm import tqdm
for _ in tqdm(range(4), desc="work", file=sys.stderr, mininterval=0):
    time.sleep(0.05)
print("finished fine")
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_job_runs_its_stages_and_reads_their_progress(tmp_path: Path) -> None:
    job = jobs.Job("t1", "test", [jobs.Stage("first", python(TQDM_CHILD)),
                                  jobs.Stage("second", python("print('second ran')"))], tmp_path).start()
    assert job.wait(60)
    assert job.status == "done" and job.error is None
    assert [s.status for s in job.states] == ["done", "done"]
    assert job.states[0].fraction == 1.0
    assert "finished fine" in job.log and "second ran" in job.log
    assert not any("%|" in line for line in job.log), "progress bars are not kept in the log"


def test_a_failing_stage_stops_the_job_with_its_last_line(tmp_path: Path) -> None:
    failing = python("import sys; print('reading'); print('no such folder: /x', file=sys.stderr); sys.exit(2)")
    job = jobs.Job("t2", "test", [jobs.Stage("bad", failing), jobs.Stage("never", python("print(1)"))],
                   tmp_path).start()
    assert job.wait(60)
    assert job.status == "failed"
    assert job.error == "bad failed: no such folder: /x"
    assert [s.status for s in job.states] == ["failed", "pending"]


def test_done_stages_are_skipped_and_cancel_stops_a_child(tmp_path: Path) -> None:
    marker = tmp_path / "made"
    marker.touch()
    job = jobs.Job("t3", "test", [jobs.Stage("made already", python("raise SystemExit(1)"), skip=marker.exists),
                                  jobs.Stage("slow", python("import time; time.sleep(30)"))], tmp_path).start()
    deadline = time.monotonic() + 30
    while job.states[1].status != "running":
        assert job.ended is None, job.error
        assert time.monotonic() < deadline, "the second stage did not start within 30 s"
        time.sleep(0.01)
    job.cancel()
    assert job.wait(10)
    assert job.status == "cancelled"
    assert job.states[0].status == "skipped"


def test_two_sessions_asking_for_one_job_share_it(tmp_path: Path) -> None:
    stages = [jobs.Stage("sleep", python("import time; time.sleep(1)"))]
    first = jobs.start("shared", "test", stages, tmp_path)
    second = jobs.start("shared", "test", stages, tmp_path)
    assert first is second
    assert first.wait(30)
    assert jobs.start("shared", "test", stages, tmp_path) is not first  # a finished job can run again


def test_demo_stages_skip_what_exists_and_resume_training(tmp_path: Path) -> None:
    paths = demo.DemoPaths(tmp_path)
    stages = demo.demo_stages(paths, train_seconds=60)
    assert [s.skip() for s in stages if s.skip] == [False, False, False]
    assert "--resume" not in stages[1].argv and "60s" in stages[1].argv
    paths.run.mkdir(parents=True)
    (paths.run / "checkpoint.pt").write_bytes(b"x")
    (paths.run / "metrics.jsonl").write_text('{"kind": "plan", "total_steps": 30}\n{"kind": "step", "step": 20}\n')
    stages = demo.demo_stages(paths, train_seconds=60)
    assert "--resume" in stages[1].argv and not stages[1].skip()
    with (paths.run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"kind": "done", "step": 30, "epoch": 2}\n{"kind": "ste')  # a torn last line
    assert demo.demo_stages(paths, train_seconds=60)[1].skip()


def test_demo_command_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--train-seconds", "0"])
    assert exit_info.value.code == 2
    assert "--train-seconds must be at least 10" in capsys.readouterr().err


def test_fresh_start_builds_the_demo_and_opens_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's first start with no collection: it builds the demo (a 20 s training here) and then
    opens the Neighbours page on it. Runs the real commands: digits, training, export, index."""
    at = make_app(None, monkeypatch, f"--workdir={tmp_path}", "--demo-train-seconds=20", timeout=60)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Welcome"
    job = jobs.get(demo.DEMO_KEY)
    assert job is not None
    assert job.wait(600), "demo build did not finish"
    assert job.status == "done", job.error
    assert demo.DemoPaths(tmp_path).collection.joinpath("manifest.json").is_file()
    at.run()
    assert not at.exception
    assert at.title[0].value == "Neighbours"
    assert "Top 10 neighbours" in [s.value for s in at.subheader]
