"""Start a real ``python -m indexer serve`` on a free loopback port, wait for it, stop it after.

The serving tests and ``bench/serve_load.py`` talk HTTP to a real server process; how it is
started (``--port 0``, the URL read from the line it prints once it listens), the deadline for
that line, and the shutdown live here once. Standard library only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RunningServer", "ServerError", "running_server"]

ROOT = Path(__file__).resolve().parents[2]
_URL = re.compile(r" at (http://\S+?) \(")


class ServerError(RuntimeError):
    """The server exited or did not start listening in time; the message ends with its output."""


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)  # every line it printed so far (stdout and stderr)

    def text(self) -> str:
        return "".join(self.output)


@contextmanager
def running_server(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """``python -m indexer serve ARGS --port 0`` (add your own --port to override), yielding its URL."""
    command = [sys.executable, "-m", "indexer", "serve", "--port", "0", *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = _URL.search(line)
            if match and not url:
                url.append(match.group(1))
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                reader.join(timeout=2)
                what = f"exited with code {process.returncode}" if process.returncode is not None else \
                    f"printed no URL within {timeout:.0f} s"
                raise ServerError(f"the server {what}: {''.join(output)[-2000:]}")
        yield RunningServer(url[0], process, output)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=5)
