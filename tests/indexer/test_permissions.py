"""Every file of a collection gets mode 0666 less the umask (Contract 3).

Why it matters: an app or a search service often runs as another user than the one who built
the collection; a file that comes out 0600 (what ``mkstemp`` makes) or 0644 under a group umask
(what SQLite makes) locks them out. Each writer (build, update, merge, a label set in the app)
is run under the umask, and every file in the folder is checked, SQLite's ``-wal``/``-shm`` and
the lock file included.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from indexer.build import build, update
from indexer.collection import Collection
from indexer.merge import merge

from .conftest import COLORS, picture

OPTS = {"device": "cpu", "workers": 2, "batch_size": 8}


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_collection_file_is_0666_less_the_umask(tmp_path, image_dir, tiny_model, umask):
    previous = os.umask(umask)
    try:
        build(image_dir, tmp_path / "col", model=tiny_model, **OPTS).close()
        picture(4242, COLORS[1]).save(image_dir / "class1" / "new.png")
        col = update(tmp_path / "col", **OPTS)  # a second generation: appended vectors, manifest.prev.json
        col.set_user_label(col.items[0].path, "cat")
        for i in range(2):
            build(image_dir, tmp_path / f"part{i}", model=tiny_model, shard=(i, 2), **OPTS).close()
        merged = merge([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged", device="cpu")
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    try:  # the readers stay open, so SQLite's -wal and -shm files exist while they are checked
        for directory in (tmp_path / "col", tmp_path / "merged"):
            modes = _modes(directory)
            names = set(modes)
            for expected in ("manifest.json", "model.onnx", "items.sqlite", "items.sqlite-wal", "items.sqlite-shm",
                             ".lock"):
                assert expected in names, f"{directory.name}: no {expected} among {sorted(names)}"
            for prefix in ("vectors-", "ids-", "index-", "projection-"):
                assert any(n.startswith(prefix) for n in names), f"{directory.name}: no {prefix}* file"
            wrong = {name: oct(mode) for name, mode in modes.items() if mode != want}
            assert not wrong, f"{directory.name}: expected {oct(want)} under umask {oct(umask)}, got {wrong}"
        assert "manifest.prev.json" in _modes(tmp_path / "col")
    finally:
        col.close()
        merged.close()
    with Collection.open(tmp_path / "col", device="cpu") as again:  # and what was written reads back
        assert again.user_labels() == {again.items[0].path: "cat"}
