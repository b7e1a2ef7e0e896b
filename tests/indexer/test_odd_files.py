"""Odd folder entries and odd image shapes never stop `indexer build`/`update` (issue 15, items 2-3).

Item 2: names that are not valid UTF-8 are indexed under a lossless text key and found again by
``update``; a FIFO named like an image, a folder named like an image and an unreadable
sub-folder are each either indexed or recorded with a reason, never silently dropped.
Item 3: memory follows the model's input, not the file: a 667-byte 200,000 x 1 PNG and a sparse
2 GB ``.tif`` are measured in a child process (peak RSS, bytes read).

Every test makes its own files. Tests run as root in CI, where ``chmod 000`` does not stop
reads: there the unreadable folder is simulated at the one call that fails for other users
(``os.scandir`` raising ``PermissionError``); as another user the real ``chmod`` is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from indexer.build import build, update
from indexer.collection import Collection
from indexer.embed import decode_file
from indexer.files import sha256_file
from indexer.images import ImageDecodeError, load_rgb, resolve_relpath, scan_images

from .conftest import encode, make_images, picture

ROOT = Path(__file__).parents[2]
PEAK_LIMIT_MB = 200  # the fixed cost of Python + numpy + Pillow is about 40 MB


def write_named(folder: Path, name: bytes, data: bytes) -> None:
    """Write a file whose name is raw bytes (maybe not UTF-8) below ``folder``."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
        fh.write(data)


def make_unreadable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make ``folder`` impossible to list, as ``chmod 000`` does for a user other than root.

    As root, chmod does not stop reads, so the failing call itself is simulated: ``os.scandir``
    of that one folder raises ``PermissionError``. Returns a function that makes it readable
    again.
    """
    if os.geteuid() != 0:
        folder.chmod(0)
        return lambda: folder.chmod(0o755)
    real = os.scandir
    target = os.fsencode(folder)

    def scandir(path: object = ".") -> object:
        if os.fsencode(os.fspath(path)) == target:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fspath(path))  # type: ignore[arg-type]
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    return lambda: monkeypatch.setattr(os, "scandir", real)


@contextlib.contextmanager
def fails_instead_of_hanging(fifo: Path, seconds: int = 60) -> Iterator[None]:
    """Turn a read that blocks on ``fifo`` (the bug) into a failure instead of a hung test run."""

    def unblock(signum: int, frame: object) -> None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # wakes a reader blocked in open()
        raise AssertionError(f"something opened the FIFO {fifo} and blocked")

    previous = signal.signal(signal.SIGALRM, unblock)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def odd_folder(root: Path) -> dict[str, str]:
    """Seven ordinary pictures plus every odd entry of item 2; returns the expected indexed keys
    of the odd ones (text key -> label)."""
    make_images(root, per_class=2)
    write_named(root, b"caf\xe9.png", encode(picture(50), "PNG"))  # Latin-1, as on an old disk
    write_named(root, b"a\xe9.png", encode(picture(51), "PNG"))
    (root / "a\\xe9.png").write_bytes(encode(picture(52), "PNG"))  # a literal backslash: must not collide
    os.mkdir(os.path.join(os.fsencode(root), b"\xff\xfeclass"))
    write_named(root, b"\xff\xfeclass/x\x80.jpg", encode(picture(53), "JPEG"))
    (root / "album.jpg").mkdir()  # a folder named like an image is walked into
    picture(54).save(root / "album.jpg" / "inside.png")
    os.mkfifo(root / "pipe.png")
    return {"caf\\xe9.png": None, "a\\xe9.png": None, "a\\\\xe9.png": None,
            "\\xff\\xfeclass/x\\x80.jpg": "\\xff\\xfeclass", "album.jpg/inside.png": "album.jpg"}


def test_scan_lists_every_odd_entry_with_a_text_key(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    odd = odd_folder(root)
    (root / "locked" / "deeper").mkdir(parents=True)
    picture(56).save(root / "locked" / "deeper" / "hidden.png")
    make_unreadable(root / "locked", monkeypatch)
    refs = {ref.relpath: ref for ref in scan_images(root)}
    assert set(odd) | {"pipe.png", "locked/"} <= set(refs) and len(refs) == 7 + len(odd) + 2
    for key, label in odd.items():
        assert refs[key].label == label and refs[key].path == resolve_relpath(root, key)
        assert load_rgb(refs[key].path).size == (48, 40)
    assert refs["caf\\xe9.png"].path.name == os.fsdecode(b"caf\xe9.png")  # the real bytes, to open
    assert refs["locked/"].label == "locked" and refs["locked/"].path == root / "locked"
    reasons = {}
    for key in ("pipe.png", "locked/"):
        with pytest.raises(ImageDecodeError) as info:
            load_rgb(refs[key].path)
        reasons[key] = info.value.reason
    assert reasons == {"pipe.png": "not a file", "locked/": "unreadable folder"}


def test_scan_of_an_unreadable_root_says_so(tmp_path, monkeypatch):
    make_unreadable(tmp_path, monkeypatch)
    with pytest.raises(PermissionError, match="cannot read the image folder"):
        scan_images(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m indexer ...` in a UTF-8 terminal's locale, where printing a raw name would fail."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONIOENCODING", None)
    return subprocess.run([sys.executable, "-m", "indexer", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def test_build_and_update_index_odd_names_and_record_odd_entries(tmp_path, tiny_model):
    root = tmp_path / "photos"
    odd = odd_folder(root)
    expected_skipped = {"pipe.png": "not a file"}
    if os.geteuid() != 0:  # a real unreadable folder; as root see the test below
        (root / "locked").mkdir()
        picture(55).save(root / "locked" / "hidden.png")
        (root / "locked").chmod(0)
        expected_skipped["locked/"] = "unreadable folder"
    col_dir = tmp_path / "col"
    try:
        with fails_instead_of_hanging(root / "pipe.png", seconds=280):
            build = _cli("build", str(root), "--model", str(tiny_model), "--out", str(col_dir), "--device", "cpu",
                         "--no-progress")
        assert build.returncode == 0, build.stderr
        assert "Traceback" not in build.stderr
        col = Collection.open(col_dir)
        by_path = {item.path: item for item in col.items}
        assert len(by_path) == len(col.items) == 7 + len(odd)
        for key, label in odd.items():
            assert by_path[key].label == label
        for key in by_path:  # every stored key leads back to its file, byte for byte
            assert resolve_relpath(root, key).is_file()
            key.encode("utf-8")  # valid text: SQLite, JSON and terminals take it
        assert {s["path"]: s["reason"] for s in col.skipped} == expected_skipped
        ids = {item.path: item.id for item in col.items}
        col.close()

        again = _cli("update", str(col_dir), "--no-progress")
        assert again.returncode == 0, again.stderr
        assert "0 embedded now" in again.stdout  # the same files, recognised by their stored keys
        col = Collection.open(col_dir)
        assert {item.path: item.id for item in col.items} == ids
        assert {s["path"]: s["reason"] for s in col.skipped} == expected_skipped
        col.close()

        write_named(root, b"caf\xe9.png", encode(picture(60, size=(30, 30)), "PNG"))  # changed content
        col = update(col_dir, device="cpu")
        assert col.summary.embedded == 1  # type: ignore[attr-defined]
        assert sorted(item.path for item in col.items) == sorted(ids)  # replaced, not duplicated
        assert col.item(next(i.id for i in col.items if i.path == "caf\\xe9.png")).width == 30
        col.close()
    finally:
        if (root / "locked").exists():
            (root / "locked").chmod(0o755)


def test_an_unreadable_sub_folder_is_recorded_by_build_and_update(tmp_path, tiny_model, monkeypatch):
    root = make_images(tmp_path / "photos", per_class=2)  # class0..2 with 2 pictures each + loose.jpg
    readable_again = make_unreadable(root / "class1", monkeypatch)
    try:
        col = build(root, tmp_path / "col", model=tiny_model, device="cpu", workers=2)
        assert [(s["path"], s["reason"]) for s in col.skipped] == [("class1/", "unreadable folder")]
        assert len(col) == 5 and not any(item.path.startswith("class1/") for item in col.items)
        col.close()
        col = update(tmp_path / "col", device="cpu")
        assert col.summary.embedded == 0 and len(col) == 5  # type: ignore[attr-defined]
        assert [(s["path"], s["reason"]) for s in col.skipped] == [("class1/", "unreadable folder")]
        col.close()
    finally:
        readable_again()
    col = update(tmp_path / "col", device="cpu")  # readable again: its pictures come in, the record goes
    assert col.summary.embedded == 2 and len(col) == 7 and col.skipped == []  # type: ignore[attr-defined]
    assert sum(item.label == "class1" for item in col.items) == 2
    col.close()


def test_an_unreadable_root_is_one_line_exit_2(tmp_path, tiny_model, monkeypatch, capsys):
    from indexer.__main__ import main

    root = make_images(tmp_path / "photos", per_class=1)
    make_unreadable(root, monkeypatch)
    assert main(["build", str(root), "--model", str(tiny_model), "--out", str(tmp_path / "col"), "--device",
                 "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read the image folder" in err, err


def test_a_fifo_is_never_opened(tmp_path, tiny_model):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with fails_instead_of_hanging(fifo, seconds=30):
        decoded = decode_file(fifo, "short_side=37;center_crop=32", 37)
        assert decoded.reason == "not a file" and "FIFO" in (decoded.error or "")
        with pytest.raises(OSError, match="not a file"):
            sha256_file(fifo)  # update's content check of a picture that became a FIFO


# ----------------------------------------------------------------------------------------------
# Item 3: memory and reads bounded by the output
# ----------------------------------------------------------------------------------------------

_MEASURE = """
import json, resource, sys
from pathlib import Path
from PIL import Image
from indexer.embed import decode_file
from indexer.images import ImageDecodeError, apply_resize, load_rgb_bytes

def rchar():
    try:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))
    except OSError:
        return 0

def peak_mb():
    # VmHWM: this process image's peak RSS. ru_maxrss would also count the parent's RSS at fork
    # time (Linux keeps it across exec), i.e. pytest's own, torch included.
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

case, path = sys.argv[1], Path(sys.argv[2])
Image.init()  # Pillow imports its format plugins on first use: not reads of the file measured
before = rchar()
result = {}
if case == "decode":
    d = decode_file(path, "short_side=73;center_crop=64", 73)
    result = {"reason": d.reason, "shape": None if d.array is None else list(d.array.shape)}
elif case == "decode-uncapped":
    d = decode_file(path, "short_side=73;center_crop=64", 73, max_aspect=1e9)
    result = {"reason": d.reason, "shape": None if d.array is None else list(d.array.shape)}
elif case == "upload":
    try:
        load_rgb_bytes(path.read_bytes(), min_side=73)
    except ImageDecodeError as exc:
        result = {"reason": exc.reason}
elif case == "resize":
    out = apply_resize(Image.new("RGB", (200_000, 1), (10, 200, 30)), "short_side=73;center_crop=64")
    result = {"shape": [out.height, out.width], "pixel": list(out.getpixel((32, 32)))}
result["read"] = rchar() - before
result["peak_mb"] = peak_mb()
print(json.dumps(result))
"""


def _measure(case: str, path: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", _MEASURE, case, str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def strip_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("strip") / "strip.png"
    Image.new("RGB", (200_000, 1), (10, 200, 30)).save(path, optimize=True)
    assert path.stat().st_size < 2000  # a few hundred bytes that once cost 1.5-4.8 GB
    return path


def test_a_200000_by_1_png_is_refused_from_its_header(strip_png):
    for case in ("decode", "upload"):  # the indexer (and trainer: same load path) and an upload
        result = _measure(case, strip_png)
        assert result["reason"] == "extreme aspect ratio", result
        assert result["peak_mb"] < PEAK_LIMIT_MB, result


def test_a_strip_allowed_through_is_never_enlarged_whole(strip_png):
    result = _measure("decode-uncapped", strip_png)  # the cap lifted: the centre square only
    assert result["reason"] is None and result["shape"] == [64, 64, 3], result
    assert result["peak_mb"] < PEAK_LIMIT_MB, result
    result = _measure("resize", strip_png)  # any image handed to apply_resize
    assert result["shape"] == [64, 64] and result["pixel"] == [10, 200, 30], result
    assert result["peak_mb"] < PEAK_LIMIT_MB, result


def test_a_sparse_2gb_tif_is_refused_after_a_few_kb(tmp_path):
    path = tmp_path / "huge.tif"
    with open(path, "wb") as fh:
        fh.truncate(2 << 30)  # sparse: costs no disk
    result = _measure("decode", path)
    assert result["reason"] == "not an image", result
    assert result["peak_mb"] < PEAK_LIMIT_MB, result
    if Path("/proc/self/io").exists():
        assert result["read"] < 64 * 1024, result  # one buffered read of the header, not 2 GB
