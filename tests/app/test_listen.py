"""A plain ``streamlit run app/main.py`` listens on this computer only (127.0.0.1), from any
working folder, and ``--server.address`` still chooses another address.

Starts the real server (no browser) and reads the listening socket from the kernel's table, so
the test sees what a neighbour on the network would see, not what a config file says.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

pytestmark = pytest.mark.skipif(not TABLES[0].is_file(), reason="reads Linux's /proc/net/tcp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> set[str]:
    """The addresses with a socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in TABLES:
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(packed)))
    return found


def serve(cwd: Path, *flags: str) -> set[str]:
    """Start the app's server with ``flags`` from ``cwd``; the addresses it listens on."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.port", str(port),
               "--server.headless", "true", *flags, "--", "--collection", str(cwd / "no-collection")]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (addresses := listening(port)):
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.2)
        return addresses
    finally:
        process.terminate()
        process.wait(10)


def test_a_plain_start_from_the_repository_listens_on_loopback_only() -> None:
    assert serve(ROOT) == {"127.0.0.1"}


def test_a_start_from_another_folder_listens_on_loopback_only(tmp_path: Path) -> None:
    assert serve(tmp_path) == {"127.0.0.1"}  # app/.streamlit/config.toml, read wherever one starts


def test_the_command_line_flag_wins() -> None:
    # Another loopback address, so the test never opens the machine to the network.
    assert serve(ROOT, "--server.address", "127.0.0.2") == {"127.0.0.2"}

