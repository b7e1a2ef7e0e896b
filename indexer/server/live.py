"""A served collection that follows its directory: each request answers from the newest
committed generation, without a restart and without a failed request during the switch.

Finding out costs one ``stat`` of ``manifest.json`` per request: the writer commits by
replacing that file (a new inode), so a changed signature means a new generation. The request
that sees it opens the new generation (:meth:`indexer.collection.Collection.open`, which never
blocks on the writer) while holding a lock that makes every other request wait for it, so no
answer comes from an older generation than one already seen; requests already running finish on
the generation they started with, which is closed only when the last of them is done (a
:class:`Generation` counts its users). The model is loaded once per process and kept across
generations as long as the manifest names the same model (same SHA-256); the FAISS index of a
new generation is loaded once, when it is opened.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer import store
from indexer.collection import Collection
from indexer.server.batcher import Batcher

__all__ = ["Generation", "LiveCollection", "manifest_signature", "open_warm"]

log = logging.getLogger("indexer.server")


def manifest_signature(directory: Path) -> tuple[int, int, int, int]:
    """What changes when a writer commits (it replaces the manifest): inode, size, times."""
    st = os.stat(directory / store.MANIFEST)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def open_warm(directory: Path, device: str) -> Collection:
    """The current generation, opened and searched once, so that what its first search would
    load or measure (index pages, row lookups, score statistics) is paid here, by the opener."""
    collection = Collection.open(directory, device=device)
    try:
        if len(collection):
            collection.search_id(int(collection.ids[0]), 1)
    except BaseException:
        collection.close()
        raise
    return collection


class Generation:
    """One opened generation and the batcher of its model, with a count of the requests using it."""

    def __init__(self, collection: Collection, batcher: Batcher) -> None:
        self.collection = collection
        self.batcher = batcher
        self.users = 0
        self.retired = False


class LiveCollection:
    """One collection directory served under ``name``; :meth:`use` lends its newest generation."""

    def __init__(self, name: str, directory: str | os.PathLike[str], *, device: str = "auto",
                 embed_batch: int = 32) -> None:
        self.name = name
        self.directory = Path(directory)
        self.device = device
        self.embed_batch = embed_batch
        self._switch = threading.Lock()  # one opener at a time; requests wait for it
        self._count = threading.Lock()  # guards users/retired/_current (held for microseconds)
        try:
            self._signature: tuple[int, int, int, int] | None = manifest_signature(self.directory)
        except OSError:
            self._signature = None  # not a collection: opening says so in its own words
        collection = open_warm(self.directory, device)
        try:
            self._current = Generation(collection, Batcher(collection.model, embed_batch))
        except BaseException:
            collection.close()
            raise
        self.switches = 0  # generations switched to since start

    @property
    def generation(self) -> int:
        return self._current.collection.generation

    @contextmanager
    def use(self) -> Iterator[Generation]:
        """The newest committed generation, kept open until the ``with`` block ends."""
        self._follow()
        with self._count:
            lease = self._current
            lease.users += 1
        try:
            yield lease
        finally:
            with self._count:
                lease.users -= 1
                done = lease.retired and lease.users == 0
            if done:
                self._close(lease)

    def _follow(self) -> None:
        """Switch to a newly committed generation, if any (see the module doc)."""
        try:
            if manifest_signature(self.directory) == self._signature:
                return
        except OSError:
            return  # the folder is gone or unreadable: keep answering from the generation we hold
        with self._switch:
            try:
                signature = manifest_signature(self.directory)
            except OSError:
                return
            if signature == self._signature:
                return  # another request switched while this one waited
            current = self._current
            try:
                collection = open_warm(self.directory, self.device)
            except (store.CollectionError, OSError) as exc:
                self._signature = signature  # not again for every request: on the next commit
                log.warning("%s: keeps serving generation %d; the new one cannot be opened: %s", self.name,
                            current.collection.generation, store.one_line(exc))
                return
            if collection.generation == current.collection.generation:
                collection.close()
                self._signature = signature
                return
            batcher = current.batcher
            if collection.manifest["model"]["sha256"] != current.collection.manifest["model"]["sha256"]:
                try:
                    batcher = Batcher(collection.model, self.embed_batch)
                except (store.CollectionError, ValueError) as exc:
                    collection.close()
                    self._signature = signature
                    log.warning("%s: keeps serving generation %d; the new model cannot be loaded: %s", self.name,
                                current.collection.generation, store.one_line(exc))
                    return
            with self._count:
                self._current = Generation(collection, batcher)
                self._signature = signature
                current.retired = True
                done = current.users == 0
            self.switches += 1
            log.info("%s: now serving generation %d (%d items)", self.name, collection.generation, len(collection))
            if done:
                self._close(current)

    def _close(self, lease: Generation) -> None:
        if lease.batcher is not self._current.batcher:
            lease.batcher.close()
        lease.collection.close()

    def close(self) -> None:
        with self._count:
            lease = self._current
            lease.retired = True
        lease.batcher.close()
        lease.collection.close()
