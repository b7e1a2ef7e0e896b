"""Collections on storage nobody may write to open for reading and searching.

Tests run as root here, and root ignores permission bits, so a chmod'ed copy alone proves
little: the main test mounts the copy read-only (a bind mount in a private mount namespace,
``unshare -m``), where even root gets EROFS, and skips where the machine does not allow that.
The ``immutable`` seam of :func:`indexer.store.connect` is tested directly as well: it must
read without creating the ``-wal``/``-shm`` files that a ``mode=ro`` open creates.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from indexer import store
from indexer.build import build
from indexer.collection import Collection

ROOT = Path(__file__).parents[2]
OPTS = {"device": "cpu", "workers": 2, "batch_size": 8}

READ_IN_A_READ_ONLY_PLACE = r"""
import json, sys
from indexer.__main__ import main
from indexer.collection import Collection
from indexer.store import CollectionError

col, query = sys.argv[1], sys.argv[2]
out = {"info": main(["info", col]), "search": main(["search", col, query, "--json", "--device", "cpu"]),
       "dupes": main(["dupes", col, "--json"]),
       "update": main(["update", col, "--no-progress", "--device", "cpu"])}
try:
    with Collection.open(col, device="cpu") as c:
        first = int(c.ids[0])
        out.update(len=len(c), items=len(c.items), thumbnail=bool(c.thumbnail(first)),
                   hits=len(c.search_id(first, 3)), labels=c.user_labels())
        try:
            c.set_user_labels({c.item(first).path: "cat"})
            out["set_label"] = "written"
        except CollectionError as exc:
            out["set_label"] = str(exc)
except CollectionError as exc:
    out["open"] = str(exc)
print("RESULT " + json.dumps(out))
"""


def _copy(col: Path, dest: Path, *, with_wal: bool = False) -> Path:
    """A copy of a collection as one makes it with cp: by default without the SQLite side files."""
    ignore = None if with_wal else shutil.ignore_patterns("*-wal", "*-shm")
    shutil.copytree(col, dest, ignore=ignore)
    return dest


def _read_only_mount_works(directory: Path) -> bool:
    probe = f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory} && ! touch {directory}/.w"
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run_read_only(directory: Path, query: Path) -> tuple[dict, str]:
    """Run the reader script with ``directory`` mounted read-only (for this process tree only)."""
    script = (f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory} && "
              f'exec "{sys.executable}" -c "$SCRIPT" {directory} {query}')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SCRIPT": READ_IN_A_READ_ONLY_PLACE}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


@pytest.fixture()
def built(tmp_path: Path, image_dir: Path, tiny_model: Path) -> Path:
    build(image_dir, tmp_path / "col", model=tiny_model, **OPTS).close()
    return tmp_path / "col"


@pytest.mark.parametrize("with_wal", [False, True], ids=["copy without -wal/-shm", "copy with them"])
def test_collection_on_a_read_only_mount_opens_and_searches(built, tmp_path, image_dir, with_wal):
    if not _read_only_mount_works(tmp_path):
        pytest.skip("this machine does not allow a private read-only bind mount (unshare -m)")
    if with_wal:  # a reader holding an old snapshot keeps the WAL from folding back: copy it as it is
        pinned = Collection.open(built)
        Collection.open(built).set_user_labels({"loose.jpg": "dog"})
    copy = _copy(built, tmp_path / "ro" / "col", with_wal=with_wal)
    if with_wal:
        assert (copy / "items.sqlite-wal").stat().st_size > 0
        pinned.close()
    out, stderr = _run_read_only(copy, image_dir / "class1" / "img02.jpg")
    assert out.get("open") is None, out
    assert out["info"] == out["search"] == out["dupes"] == 0, stderr
    assert out["len"] == out["items"] == len(Collection.open(built)) and out["thumbnail"] and out["hits"] == 3
    assert out["labels"] == ({"loose.jpg": "dog"} if with_wal else {})
    # writing is refused with one line, never a traceback
    assert out["update"] == 2 and "Traceback" not in stderr
    update_lines = [line for line in stderr.splitlines() if line.startswith("python -m indexer update")]
    assert len(update_lines) == 1 and "read-only" in update_lines[0].lower(), stderr
    assert "read-only" in out["set_label"]
    assert not (copy / "items.sqlite-shm").exists() or with_wal  # nothing was created there


def test_wal_without_its_shm_on_read_only_storage_is_refused(built, tmp_path):
    """Such a WAL may hold committed rows that an immutable open would not see: refuse, don't guess."""
    writer = sqlite3.connect(built / "items.sqlite")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    with writer:
        writer.execute("INSERT INTO user_labels VALUES ('loose.jpg', 'dog', 1)")
    copy = _copy(built, tmp_path / "copy", with_wal=True)
    writer.close()
    (copy / "items.sqlite-shm").unlink()
    with pytest.raises(store.CollectionError, match="-shm"):
        store.connect(copy, readonly=True, immutable=True)


def test_immutable_open_reads_without_creating_files(built, tmp_path):
    copy = _copy(built, tmp_path / "copy")
    conn = store.connect(copy, readonly=True, immutable=True)
    store.begin_snapshot(conn)
    assert conn.execute("SELECT count(*) FROM items WHERE status = 'ok'").fetchone()[0] == len(Collection.open(built))
    conn.close()
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("items.sqlite")) == ["items.sqlite"]
    # the ordinary read-only open does create them, which read-only storage cannot
    store.connect(copy, readonly=True).execute("SELECT count(*) FROM items").fetchone()
    assert (copy / "items.sqlite-shm").exists()


def test_chmod_read_only_copy_opens_and_searches(built, tmp_path, image_dir):
    """A copy whose files and folder are read-only to their owner (real for users other than root)."""
    copy = _copy(built, tmp_path / "copy")
    for path in [*copy.iterdir(), copy]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        with Collection.open(copy, device="cpu") as col:
            hits = col.search_image(image_dir / "class1" / "img02.jpg", k=3)
            assert hits[0].path == "class1/img02.jpg" and len(col.items) == len(col)
    finally:
        copy.chmod(0o755)


def test_written_files_have_the_mode_of_any_new_file(built):
    """Another account (an app, a service) reads a collection: files get 0666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("manifest.json", "manifest.prev.json") + tuple(
            p.name for p in built.iterdir() if p.name.startswith(("ids-", "vectors-", "index-", "projection-"))):
        path = built / name
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, name
