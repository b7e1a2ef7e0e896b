"""A plain ``streamlit run app/main.py`` listens on this computer only (127.0.0.1), from any
working folder, and ``--server.address`` still chooses another address.

Starts the real server (no browser) and reads the listening socket from the kernel's table, so
the test sees what a neighbour on the network would see, not what a config file says.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from app import local_server

ROOT = Path(__file__).resolve().parents[2]
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

pytestmark = pytest.mark.skipif(not TABLES[0].is_file(), reason="reads Linux's /proc/net/tcp")


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


def serve(cwd: Path, address: str | None = None) -> set[str]:
    """Start the app's server from ``cwd`` (with ``--server.address`` when ``address`` is given)
    and return the addresses it listens on once it answers."""
    with local_server.serve("--collection", str(cwd / "no-collection"), address=address, cwd=cwd) as running:
        return listening(running.port)


def test_a_plain_start_from_the_repository_listens_on_loopback_only() -> None:
    assert serve(ROOT) == {"127.0.0.1"}


def test_a_start_from_another_folder_listens_on_loopback_only(tmp_path: Path) -> None:
    assert serve(tmp_path) == {"127.0.0.1"}  # app/.streamlit/config.toml, read wherever one starts


def test_the_command_line_flag_wins() -> None:
    # Another loopback address, so the test never opens the machine to the network.
    assert serve(ROOT, "127.0.0.2") == {"127.0.0.2"}

