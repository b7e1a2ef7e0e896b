"""The real server: ``python -m indexer serve`` on a free loopback port, spoken to over HTTP with
httpx. The README's Python example, the API key, the listening address, a generation switch
under load, several workers, and the command line's one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.__main__ import build_parser, main
from indexer.collection import Collection
from indexer.server.local import running_server
from indexer.server.options import LOOPBACK
from tests.indexer.conftest import encode, picture
from tests.oneline import assert_one_line_error

from .conftest import KEY
from .test_live import add_pictures

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- serve-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its serving example"
    return block.group(1)


def test_the_readme_example_runs_against_a_real_server(photos: Path, tmp_path: Path) -> None:
    code = readme_example()
    assert 'base_url="http://127.0.0.1:8000"' in code
    with Collection.open(photos, device="cpu") as col:
        query = Path(col.manifest["image_root"]) / col.items[0].path
        best = col.search_image(query, 5)
    (tmp_path / "query.jpg").write_bytes(query.read_bytes())
    with running_server(str(photos), "--device", "cpu") as server:
        code = code.replace("http://127.0.0.1:8000", server.url)
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "{'collections': ['photos']}"
    assert [line.split("  ")[1] for line in lines[1:6]] == [h.path for h in best]
    assert lines[6].startswith("more like the best hit: [")


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def test_listens_on_loopback_only_by_default(photos: Path) -> None:
    assert build_parser().parse_args(["serve", str(photos)]).host == LOOPBACK
    with running_server(str(photos), "--device", "cpu") as server:
        port = int(server.url.rsplit(":", 1)[1])
        assert server.url == f"http://127.0.0.1:{port}"
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_api_key_is_required_and_never_logged(photos: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    with running_server(str(photos), "--device", "cpu", "--api-key-file", str(key_file)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/health").status_code == 200  # the one open endpoint
            for headers in ({}, {"Authorization": f"Bearer {KEY[:-1]}x"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}{KEY}"}):
                for path in ("/collections", "/collections/photos", "/docs", "/openapi.json"):
                    answer = c.get(path, headers=headers)
                    assert answer.status_code == 401, (path, headers)
                    assert answer.headers["www-authenticate"] == "Bearer" and "API key" in answer.json()["detail"]
            answer = c.post("/collections/photos/search", json={"id": 1, "k": 2})
            assert answer.status_code == 401
            good = {"Authorization": f"Bearer {KEY}"}
            assert c.get("/collections", headers=good).json() == {"collections": ["photos"]}
            assert c.post("/collections/photos/search", json={"id": 1, "k": 2}, headers=good).status_code == 200
            assert c.get("/docs", headers=good).status_code == 200
        time.sleep(0.5)  # let the access log lines reach the reader
        log = server.text()
    assert "API key required" in log and "GET /collections" in log  # the access log was on
    assert KEY not in log and KEY[:12] not in log


def test_generation_switch_under_load_fails_no_request(fresh: Path) -> None:
    """Clients search without pause while `python -m indexer update` commits twice."""
    with Collection.open(fresh, device="cpu") as col:
        first_id, vector = int(col.ids[0]), [float(x) for x in col.vector(int(col.ids[0]))]
        start_generation = col.generation
    query = encode(picture(7), "JPEG")
    failures: list[str] = []
    generations: set[int] = set()
    stop = threading.Event()
    counts = [0]

    def client(kind: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                if kind == 0:
                    answer = c.post("/collections/fresh/search", params={"k": 3}, files={"image": ("q.jpg", query)})
                elif kind == 1:
                    answer = c.post("/collections/fresh/search", json={"vector": vector, "k": 3})
                else:
                    answer = c.post("/collections/fresh/search", json={"id": first_id, "k": 3})
                    generations.add(c.get("/collections/fresh").json()["generation"])
                counts[0] += 1
                if answer.status_code != 200 or len(answer.json()["hits"]) != 3:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    with running_server(str(fresh), "--device", "cpu", "--no-access-log") as server:
        threads = [threading.Thread(target=client, args=(i % 3, server.url)) for i in range(6)]
        for t in threads:
            t.start()
        try:
            for round_ in range(2):
                time.sleep(0.5)
                added = add_pictures(fresh, 2, seed=700 + 10 * round_)
                done = subprocess.run([sys.executable, "-m", "indexer", "update", str(fresh), "--device", "cpu",
                                       "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stderr
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        hits = httpx.post(f"{server.url}/collections/fresh/search", params={"k": 1},
                          files={"image": ("q.jpg", added[0].read_bytes())}).json()["hits"]
    assert failures == [] and counts[0] > 20
    assert {start_generation, start_generation + 2} <= generations
    assert hits[0]["path"].endswith(added[0].name)  # the newest generation answers


def test_several_workers_answer(photos: Path) -> None:
    with running_server(str(photos), "--device", "cpu", "--workers", "2", "--no-access-log", timeout=120) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            deadline = time.monotonic() + 60
            while c.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            answers = [c.post("/collections/photos/search", json={"id": 1, "k": 2}) for _ in range(10)]
        assert all(a.status_code == 200 for a in answers)
        assert "2 worker(s)" in server.text()


def test_command_line_errors_are_one_line(photos: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    other = tmp_path / "elsewhere" / "photos"
    other.mkdir(parents=True)
    cases = [
        (["serve", str(tmp_path / "missing")], "collection not found"),
        (["serve", str(tmp_path)], "not a collection"),
        (["serve", str(photos), "--api-key-file", str(short)], "at least 16 characters"),
        (["serve", str(photos), "--api-key-file", str(tmp_path / "nokey")], "API key file not found"),
        (["serve", str(photos), str(other)], "two collections would be served as 'photos'"),
        (["serve", str(photos), "--port", "70000"], "0..65535"),
        (["serve", str(photos), "--max-upload-mb", "0"], "megabytes"),
    ]
    for argv, needle in cases:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2, argv
        assert_one_line_error(capsys, needle)
    import socket

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        assert main(["serve", str(photos), "--device", "cpu", "--port", str(taken.getsockname()[1])]) == 2
        assert_one_line_error(capsys, "cannot listen on 127.0.0.1")


@pytest.mark.parametrize("command", ["serve"])
def test_help_describes_the_command(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "HTTP" in out and "127.0.0.1" in out and "python -m indexer serve" in out and "/docs" in out
