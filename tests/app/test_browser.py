"""End to end in a real headless Chromium: start the server, upload a query, see its neighbours.

Uses Debian's chromium (``apt-get install chromium``, done by ``.ci/run``) driven by playwright;
never a browser download. Without a browser the test is skipped, except where
``MOCO_REQUIRE_BROWSER=1`` (CI) makes a missing browser a failure. The screenshot is kept in
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.indexer.conftest import COLORS, picture

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).is_file()


pytestmark = pytest.mark.skipif(
    not browser_available() and os.environ.get("MOCO_REQUIRE_BROWSER") != "1",
    reason="needs playwright and Debian's chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(collection_dir: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "streamlit.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--", "--collection", str(collection_dir)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "streamlit.log").read_text()
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_upload_in_a_real_browser_shows_neighbours(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    query = tmp_path / "my-query.png"
    picture(777, COLORS[2]).save(query)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(server)
            expect(page.get_by_text("Top 10 neighbours")).to_be_visible(timeout=60_000)
            page.locator("input[type=file]").set_input_files(str(query))
            expect(page.get_by_text("my-query.png", exact=True)).to_be_visible(timeout=60_000)
            results = page.get_by_role("button", name="Search this")
            expect(results).to_have_count(10, timeout=30_000)
            page.wait_for_timeout(500)  # let the thumbnails paint before the picture is taken
            page.screenshot(path=str(ARTIFACTS / "neighbours-upload.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "neighbours-upload.png").stat().st_size > 10_000
