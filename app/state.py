"""What every page shares: the app's settings, the open collection and the current query.

Heavy objects live once per server process, not once per browser session: the opened
:class:`indexer.Collection` (FAISS index, memory-mapped vectors, ONNX session, projection) and
the table of items are behind ``st.cache_resource``, keyed by the collection's directory *and
generation*, so a build or update committed by another process is picked up on the next rerun
while sessions that are still drawing the old generation keep a consistent view of it.
Per-session choices (which collection, which query) live in ``st.session_state``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import streamlit as st

from app import markup
from indexer import store
from indexer.collection import Collection
from indexer.images import resolve_relpath

DEFAULT_INDEXES = Path("indexes")


@dataclass(frozen=True)
class AppConfig:
    """Settings from the command line (``streamlit run app/main.py -- --collection DIR``)."""

    collection: Path | None
    indexes: Path
    workdir: Path
    demo_train_seconds: int | None
    data_roots: tuple[Path, ...] = ()
    """Folders a browser session may build collections from (``--data-root``, repeatable), as given."""


def parse_args(argv: list[str] | None = None) -> AppConfig:
    """Read the app's options; unknown arguments are ignored (Streamlit and test runners pass
    their own). ``MOCO_APP_ARGS`` adds options for launchers that cannot pass ``--``."""
    parser = argparse.ArgumentParser(prog="streamlit run app/main.py --", add_help=False, allow_abbrev=False)
    parser.add_argument("--collection", type=Path, default=None)
    parser.add_argument("--indexes", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--demo-train-seconds", type=int, default=None)
    parser.add_argument("--data-root", type=Path, action="append", default=[])
    args = list(sys.argv[1:] if argv is None else argv) + shlex.split(os.environ.get("MOCO_APP_ARGS", ""))
    known, _ = parser.parse_known_args(args)
    workdir = known.workdir.expanduser()
    indexes = known.indexes.expanduser() if known.indexes else workdir / DEFAULT_INDEXES
    collection = known.collection.expanduser() if known.collection else None
    data_roots = tuple(root.expanduser() for root in known.data_root)
    return AppConfig(collection, indexes, workdir, known.demo_train_seconds, data_roots)


def config() -> AppConfig:
    """The settings of this run of the script (re-read each time: tests change ``sys.argv``)."""
    return parse_args()


# ---------------------------------------------------------------------------------------------
# Collections
# ---------------------------------------------------------------------------------------------


def is_collection(path: Path) -> bool:
    return (path / store.MANIFEST).is_file()


def list_collections(root: Path) -> list[Path]:
    """Collection directories directly under ``root`` (``indexes/`` by default), by name."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_collection(p)), key=lambda p: p.name)


def generation_of(directory: Path) -> int:
    """The committed generation, read from the manifest alone (cheap enough for every rerun)."""
    return int(store.read_manifest(directory)["generation"])


@st.cache_resource(max_entries=8, show_spinner="Opening the collection…")
def _open(directory: str, generation: int) -> Collection:
    # ``generation`` is part of the cache key only: a new commit opens a new object.
    return Collection.open(directory)


def open_collection(directory: Path) -> Collection:
    """The collection's current generation, opened once per process."""
    resolved = str(directory.resolve())
    return _open(resolved, generation_of(Path(resolved)))


@dataclass(frozen=True)
class ItemTable:
    """The columns pages need for every indexed item, in the order of ``collection.ids``."""

    frame: pd.DataFrame  # columns: id, path, name, label, x, y
    position: dict[int, int]  # item id -> row

    def row(self, item_id: int) -> pd.Series:
        return self.frame.iloc[self.position[item_id]]


@st.cache_resource(max_entries=8, show_spinner=False)
def _item_table(directory: str, generation: int) -> ItemTable:
    collection = _open(directory, generation)
    items = collection.items
    coords = collection.coords()
    frame = pd.DataFrame({
        "id": np.array([it.id for it in items], dtype=np.int64),
        "path": [it.path for it in items],
        "name": [Path(it.path).name for it in items],
        "label": pd.Series([it.label for it in items], dtype=object),  # None stays None, not NaN
        "x": coords[:, 0] if len(items) else np.zeros(0, np.float32),
        "y": coords[:, 1] if len(items) else np.zeros(0, np.float32),
    })
    return ItemTable(frame, {int(i): n for n, i in enumerate(frame["id"])})


def item_table(collection: Collection) -> ItemTable:
    return _item_table(str(collection.directory.resolve()), collection.generation)


def safe_image_path(collection: Collection, relative: str) -> Path | None:
    """The original file of an item, only if it lies inside the collection's image root.

    Paths come from the collection's own database, but the app must never become a way to
    read an arbitrary file: ``..`` segments, absolute paths and symlinks leading out of the
    root are all refused (``None``)."""
    try:
        root = collection.image_root.resolve()
        candidate = resolve_relpath(root, relative).resolve()  # a stored key, \xNN for odd name bytes
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


# ---------------------------------------------------------------------------------------------
# The current query (per session)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """What the neighbours are of: an item of the collection or an uploaded image."""

    kind: str  # "item" or "upload"
    vector: npt.NDArray[np.float32]
    title: str
    thumbnail: bytes | None
    item_id: int | None = None
    label: str | None = None
    xy: tuple[float, float] | None = None  # place on the map


def query_key(collection: Collection) -> str:
    return f"query:{collection.directory.resolve()}"


def set_item_query(collection: Collection, item_id: int) -> Query:
    table = item_table(collection)
    row = table.row(int(item_id))
    xy = (float(row["x"]), float(row["y"])) if np.isfinite(row["x"]) else None
    query = Query("item", collection.vector(int(item_id)), str(row["path"]), collection.thumbnail(int(item_id)),
                  int(item_id), row["label"], xy)
    st.session_state[query_key(collection)] = query
    return query


def set_upload_query(collection: Collection, name: str, vector: npt.NDArray[np.float32],
                     thumbnail: bytes) -> Query:
    projection = collection.projection
    xy = None
    if projection is not None:
        placed = projection.place(vector[None])[0]
        xy = (float(placed[0]), float(placed[1]))
    query = Query("upload", vector, name, thumbnail, None, None, xy)
    st.session_state[query_key(collection)] = query
    return query


def current_query(collection: Collection) -> Query | None:
    """This session's query, reset when the chosen item is no longer in the collection."""
    query: Query | None = st.session_state.get(query_key(collection))
    if query is not None and query.kind == "item" and query.item_id not in item_table(collection).position:
        return None
    if query is not None and query.vector.shape[-1] != collection.dim:
        return None
    return query


def default_query(collection: Collection) -> Query | None:
    """The query a fresh session opens with: a random item (seeded per session)."""
    table = item_table(collection)
    if not len(table.frame):
        return None
    seed = st.session_state.setdefault("session_seed", int(np.random.default_rng().integers(1 << 31)))
    pick = int(np.random.default_rng(seed).integers(len(table.frame)))
    return set_item_query(collection, int(table.frame["id"].iloc[pick]))


def selected_collection() -> Path | None:
    """The collection this session looks at (set by the picker in ``main``)."""
    value: Any = st.session_state.get("collection_dir")
    return Path(value) if value else None


def require_collection() -> Collection:
    """The session's collection, opened; a page that needs one stops with a one-line message
    when it cannot be opened (deleted meanwhile, newer format, …)."""
    directory = selected_collection()
    if directory is None:
        st.info("No collection yet: build one on the Collection page or run the demo.")
        st.stop()
    try:
        return open_collection(directory)
    except (store.CollectionError, OSError, ValueError) as exc:
        st.error(f"Cannot open {markup.code(directory)}: {markup.md(exc)}")  # a path and a message from disk
        st.stop()
