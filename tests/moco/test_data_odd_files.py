"""The trainer's data listing with odd entries (issue 15, items 2-3).

Names that are not valid UTF-8 once crashed `moco train` in its listing digest; a FIFO named
like an image, an unreadable sub-folder and a strip of 200,000 x 1 pixels must each end up in the
run's skip summary with a reason, and a folder named like an image is a folder. Every test makes
its own files; the unreadable folder uses the same seam as the indexer's tests (see there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from moco.__main__ import main
from moco.cache import open_cache
from moco.data import Failure, RawImages, listing_digest, open_folder
from tests.indexer.test_odd_files import fails_instead_of_hanging, make_unreadable, write_named
from tests.moco.conftest import make_image_folder

FAST = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--no-channels-last"]
ROOT = Path(__file__).parents[2]


def odd_training_folder(root: Path) -> dict[str, str]:
    """Two class folders of 8 pictures plus odd entries; returns the keys expected to fail -> reason."""
    make_image_folder(root, classes=2, per_class=8)
    picture = (root / "class0" / "img000.jpg").read_bytes()
    write_named(root / "class0", b"caf\xe9.jpg", picture)  # not UTF-8: trained on, not a crash
    os.mkdir(os.path.join(os.fsencode(root), b"\xffclass"))
    for i in range(2):
        write_named(root, b"\xffclass/" + bytes([0x80 + i]) + b".jpg", picture)
    (root / "class1" / "album.jpg").mkdir()  # a folder named like an image: walked into
    (root / "class1" / "album.jpg" / "inside.jpg").write_bytes(picture)
    os.mkfifo(root / "class0" / "pipe.png")
    (root / "class1" / "locked").mkdir()
    (root / "class1" / "locked" / "x.jpg").write_bytes(picture)
    Image.new("RGB", (200_000, 1)).save(root / "class1" / "strip.png")
    return {"class0/pipe.png": "not a file", "class1/locked/": "unreadable folder",
            "class1/strip.png": "extreme aspect ratio"}


def test_listing_digest_and_failures_of_odd_entries(tmp_path, monkeypatch):
    root = tmp_path / "train"
    bad = odd_training_folder(root)
    make_unreadable(root / "class1" / "locked", monkeypatch)
    folder = open_folder(root)
    rels = [ref.relpath for ref in folder.refs]
    assert {"class0/caf\\xe9.jpg", "\\xffclass/\\x80.jpg", "class1/album.jpg/inside.jpg", *bad} <= set(rels)
    assert folder.classes == ["\\xffclass", "class0", "class1"]  # labels are text too
    digest = listing_digest(folder)  # once a UnicodeEncodeError
    assert digest == listing_digest(open_folder(root)) and len(digest) == 64
    dataset = RawImages(folder.refs, 32)
    with fails_instead_of_hanging(root / "class0" / "pipe.png"):
        results = {rel: dataset[(i, 0)] for i, rel in enumerate(rels)}
        cache = open_cache(root, folder.refs, 37, cache_dir=tmp_path / "cache", workers=0)
    failures = {rel: r.reason for rel, r in results.items() if isinstance(r, Failure)}
    assert failures == bad
    assert {rels[i]: reason for i, reason in cache.failed().items()} == bad
    good = rels.index("class0/caf\\xe9.jpg")
    assert np.array_equal(results["class0/caf\\xe9.jpg"][0], cache.image(good))


def test_training_puts_odd_entries_in_its_skip_summary(tmp_path):
    root = tmp_path / "train"
    bad = odd_training_folder(root)
    expected = dict(bad)
    if os.geteuid() != 0:
        (root / "class1" / "locked").chmod(0)
    else:  # the seam must reach the child process: leave the folder readable, expect its picture
        del expected["class1/locked/"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONIOENCODING", None)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "moco", "train", str(root), "--out", str(tmp_path / "run"), *FAST, "--epochs",
             "1", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    finally:
        (root / "class1" / "locked").chmod(0o755)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    output = run.stdout + run.stderr
    for rel, reason in expected.items():
        assert f"skipped {rel}: {reason}" in output, output[-3000:]
    assert f"{len(expected)} files skipped" in output, output[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m.get("loss", 0.0)) for m in metrics)


def test_the_trainer_cli_in_process_skips_odd_entries(tmp_path, monkeypatch, capsys):
    root = tmp_path / "train"
    bad = odd_training_folder(root)
    make_unreadable(root / "class1" / "locked", monkeypatch)
    with fails_instead_of_hanging(root / "class0" / "pipe.png", seconds=300):
        assert main(["train", str(root), "--out", str(tmp_path / "run"), *FAST, "--epochs", "1", "--batch-size",
                     "8", "--cache-dir", str(tmp_path / "cache")]) == 0
    captured = capsys.readouterr()
    output = captured.out + captured.err
    for rel, reason in bad.items():
        assert f"skipped {rel}: {reason}" in output, output[-3000:]
