"""Start the app's own server for a program on this computer, wait until it answers, stop it after.

The browser tests, the listening test and ``bench/app_latency.py`` each need a real
``streamlit run app/main.py`` on a free port; the command line, the wait for the server (always
with a deadline, reporting the server's own output when it dies or never answers) and the
shutdown live here once, so a flag added to how the app starts reaches all of them. The headless
Chromium they drive is launched here too (Debian's ``chromium`` through playwright, never a
browser download). Standard library only: importing this module costs nothing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "app" / "main.py"
LOOPBACK = "127.0.0.1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class ServerError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its last output."""


@dataclass(frozen=True)
class LocalServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now (the OS picks it; a tiny race with other programs remains)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def command(port: int, app_args: tuple[str, ...] = (), address: str | None = LOOPBACK) -> list[str]:
    """``streamlit run app/main.py`` headless on ``port``; ``address=None`` leaves the listening
    address to the app's own configuration (what a person who starts it plainly gets)."""
    flags = ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if address is not None:
        flags += ["--server.address", address]
    return [sys.executable, "-m", "streamlit", "run", str(MAIN), *flags, "--", *app_args]


@contextmanager
def serve(*app_args: str, address: str | None = LOOPBACK, cwd: Path = ROOT, log: Path | None = None,
          timeout: float = 60) -> Iterator[LocalServer]:
    """Run the app with ``app_args`` (after ``--``) until the block ends.

    Waits until ``/_stcore/health`` answers, at most ``timeout`` seconds; the server's output goes
    to ``log`` (kept for a person to read) or is discarded."""
    port = free_port()
    host = address or LOOPBACK
    url = f"http://{host}:{port}"
    sink = log.open("wb") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command(port, app_args, address), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(url, process, timeout, log)
        yield LocalServer(url, port, process)
    finally:
        stop(process)
        if log is not None:
            sink.close()  # type: ignore[union-attr]


def stop(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    """Ask the server to stop; kill it if it has not within ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise ServerError(f"the server exited with status {process.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServerError(f"the server did not answer within {timeout:g} s{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None:
        return ""
    try:
        return ":\n" + log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def launch_chromium(playwright: Any) -> Any:
    """Debian's headless chromium through a started ``sync_playwright()`` (``--no-sandbox``: the
    tests may run as root in a container, where Chromium's sandbox cannot start)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
