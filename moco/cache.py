"""Decoded-image cache: every image decoded once, kept as uint8 pixels in a memory-mapped file.

Decoding a JPEG costs more CPU than augmenting it, and on a small machine the decoding workers
take cores from training. The cache decodes each image once, at a working resolution a
little above the training size (JPEG draft mode does most of the shrinking), and every later
epoch, and every later run on the same folder, reads pixels straight from the page cache.

Layout, one folder per (image root, working size):
    pixels.bin   append-only uint8 HWC pixels of every entry, back to back
    index.npz    relpath, size, mtime_ns, offset, height, width, failure reason per entry
The index is the commit point, replaced atomically after the pixels it names are fsynced, so
a run killed while filling the cache leaves the previous cache usable. Files whose size or
mtime changed are decoded again; when dead bytes outweigh live ones the cache is rebuilt.
`training_cache` opens it the way a training run is configured to.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from indexer.files import atomic_write_bytes
from indexer.images import ImageDecodeError, ImageRef, fs_to_text, working_size
from moco.data import ImageFolder, decode_working

if TYPE_CHECKING:
    from moco.config import TrainConfig


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOCO_CACHE_DIR") or Path.home() / ".cache" / "moco" / "decoded")


class CacheUnavailable(Exception):
    """The cache cannot be used (too large for the limit or the disk); training streams instead."""


class _Decode(Dataset):
    def __init__(self, refs: list[ImageRef], side: int) -> None:
        self.refs, self.side = refs, side

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, decode_working(self.refs[i].path, self.side), ""
        except ImageDecodeError as err:
            return i, None, err.reason


@dataclass
class _Entry:
    offset: int
    height: int
    width: int
    reason: str


class DecodedCache:
    """Read side: pixels of entry i as a [h, w, 3] uint8 view of the memory map."""

    def __init__(self, folder: Path, refs: list[ImageRef], entries: list[_Entry]) -> None:
        self.folder = folder
        self.entries = entries
        self.refs = refs
        size = (folder / "pixels.bin").stat().st_size
        self.pixels = np.memmap(folder / "pixels.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.entries)

    def failed(self) -> dict[int, str]:
        return {i: e.reason for i, e in enumerate(self.entries) if e.reason}

    def image(self, i: int) -> np.ndarray:
        e = self.entries[i]
        return self.pixels[e.offset:e.offset + e.height * e.width * 3].reshape(e.height, e.width, 3)

    def nbytes(self) -> int:
        return sum(e.height * e.width * 3 for e in self.entries)


def cache_folder(root: Path, side: int, cache_dir: Path) -> Path:
    # fsencode: a folder whose name is not valid UTF-8 keeps its exact bytes in the key; the
    # folder's own name is shown as text (undecodable bytes as \xNN).
    key = hashlib.sha256(os.fsencode(root.resolve()) + f":{side}".encode()).hexdigest()[:16]
    return cache_dir / f"{fs_to_text(root.resolve().name)}-{side}px-{key}"


def _read_index(folder: Path) -> dict[str, tuple[int, int, _Entry]]:
    try:
        with np.load(folder / "index.npz", allow_pickle=False) as data:
            pixels_size = (folder / "pixels.bin").stat().st_size
            index = {}
            for rel, size, mtime, off, h, w, reason in zip(data["relpath"], data["size"], data["mtime_ns"],
                                                          data["offset"], data["height"], data["width"],
                                                          data["reason"]):
                if off + int(h) * int(w) * 3 <= pixels_size:
                    index[str(rel)] = (int(size), int(mtime), _Entry(int(off), int(h), int(w), str(reason)))
            return index
    except (OSError, KeyError, ValueError):
        return {}


def _write_index(folder: Path, refs: list[ImageRef], entries: list[_Entry]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, relpath=np.array([r.relpath for r in refs], dtype=str),
             size=np.array([r.size for r in refs], np.int64), mtime_ns=np.array([r.mtime_ns for r in refs], np.int64),
             offset=np.array([e.offset for e in entries], np.int64),
             height=np.array([e.height for e in entries], np.int32),
             width=np.array([e.width for e in entries], np.int32),
             reason=np.array([e.reason for e in entries], dtype=str))
    atomic_write_bytes(folder / "index.npz", buffer.getvalue())


def open_cache(root: Path, refs: list[ImageRef], side: int, *, cache_dir: Path | None = None,
               max_bytes: int = 20 << 30, workers: int = 2) -> DecodedCache:
    """Open the cache for these files, decoding whatever is new or changed.

    Raises CacheUnavailable (with the reason) when the pixels would exceed `max_bytes` or the
    free disk space; the caller then streams from the image files.
    """
    folder = cache_folder(root, side, cache_dir or default_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs on one folder: the second waits, then reuses
        known = _read_index(folder)
        pixels = folder / "pixels.bin"
        pixels.touch()
        entries: list[_Entry | None] = []
        todo = []
        for i, ref in enumerate(refs):
            hit = known.get(ref.relpath)
            if hit is not None and hit[0] == ref.size and hit[1] == ref.mtime_ns:
                entries.append(hit[2])
            else:
                entries.append(None)
                todo.append(i)
        live = sum(e.height * e.width * 3 for e in entries if e is not None)
        if pixels.stat().st_size > 2 * live + (64 << 20):  # mostly dead bytes: start afresh
            pixels.write_bytes(b"")
            entries = [None] * len(refs)
            todo, live = list(range(len(refs))), 0
        estimate = live + len(todo) * side * side * 3 * 1.4
        free = shutil.disk_usage(folder).free
        if estimate > max_bytes or estimate - live > 0.9 * free:
            raise CacheUnavailable(f"the decoded-image cache would need about {estimate / 2**30:.1f} GiB "
                                   f"(limit {max_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on disk)")
        if todo:
            _fill(pixels, refs, todo, entries, side, workers)
            _write_index(folder, refs, entries)
        elif not (folder / "index.npz").exists():
            _write_index(folder, refs, entries)
    return DecodedCache(folder, refs, entries)


def training_cache(config: TrainConfig, folder: ImageFolder) -> DecodedCache | None:
    """The cache for a training run's folder (`--cache-dir`, `--cache-max-gb`), or None when it
    cannot be had: the run then streams from the image files, and says so."""
    try:
        return open_cache(folder.root, folder.refs, working_size(config.image_size),
                          cache_dir=Path(config.cache_dir) if config.cache_dir else None,
                          max_bytes=int(config.cache_max_gb * 2**30), workers=os.cpu_count() or 1)
    except CacheUnavailable as err:
        tqdm.write(f"note: {err}; streaming from the image files instead (see --cache-max-gb, --cache-dir)")
        return None


def _as_is(sample):
    return sample


def _fill(pixels: Path, refs: list[ImageRef], todo: list[int], entries: list[_Entry | None], side: int,
          workers: int) -> None:
    loader = DataLoader(_Decode([refs[i] for i in todo], side), batch_size=None, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=8 if workers else None,
                        generator=torch.Generator())  # leaves the global RNG (model shuffles) untouched
    with open(pixels, "ab") as out:
        offset = out.tell()
        for j, array, reason in tqdm(loader, total=len(todo), desc="decoding once into the cache", unit="img",
                                     dynamic_ncols=True):
            i = todo[j]
            if array is None:
                entries[i] = _Entry(offset, 0, 0, reason)
                continue
            array = np.ascontiguousarray(array)
            out.write(array.tobytes())
            entries[i] = _Entry(offset, array.shape[0], array.shape[1], "")
            offset += array.nbytes
        out.flush()
        os.fsync(out.fileno())
