"""What the Curate page draws, prepared without drawing: the collection's curation scores (kept in
the collection by :mod:`indexer.curate`, computed when missing), the galleries as filtered and
paged rows, and the duplicates' keep/remove choice as CSV.

The app never deletes or moves a file: the duplicates' choice leaves the app as a CSV of paths for
the person to act on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st

from indexer import store
from indexer.collection import Collection
from indexer.curate import curate, report, stored

PAGE_SIZE = 12
GROUPS_PER_PAGE = 8


@dataclass(frozen=True)
class Curation:
    """The report of :func:`indexer.curate.report` for one generation and label source, and
    whether it could be kept in the collection (read-only storage: computed for this session)."""

    report: dict[str, Any]
    kept: bool


@st.cache_resource(max_entries=8, show_spinner="Scoring every image from its neighbours…")
def _curation(directory: str, generation: int, labels: str, _collection: Collection) -> Curation:
    # directory + generation + labels are the cache key; the collection itself is not hashed.
    scores = stored(_collection)
    if scores is not None and labels in ("auto", scores.label_source):
        return Curation(report(_collection, scores, top=len(scores.ids)), kept=True)
    try:
        scores = curate(_collection, labels=labels, show_progress=False)
        kept = True
    except store.CollectionError:  # read-only storage: score for this session only
        scores = curate(_collection, labels=labels, show_progress=False, save=False)
        kept = False
    return Curation(report(_collection, scores, top=len(scores.ids)), kept=kept)


def curation(collection: Collection, labels: str = "auto") -> Curation:
    """The scores of the collection's current generation: the kept ones, else computed now."""
    return _curation(str(collection.directory.resolve()), collection.generation, labels, collection)


def forget() -> None:
    """Drop this process's cached scores (after people's labels changed, so they count)."""
    _curation.clear()


def with_label(rows: Iterable[dict[str, Any]], labels: dict[str, str | None], wanted: Sequence[str]) -> list[dict]:
    """The rows whose item's label (``labels``: path -> label) is one of ``wanted`` (all when empty)."""
    rows = list(rows)
    if not wanted:
        return rows
    chosen = set(wanted)
    return [row for row in rows if labels.get(row["path"]) in chosen]


def groups_with_label(groups: Iterable[list[dict[str, Any]]], labels: dict[str, str | None],
                      wanted: Sequence[str]) -> list[list[dict]]:
    """The duplicate groups with at least one member labelled one of ``wanted`` (all when empty)."""
    groups = list(groups)
    if not wanted:
        return groups
    chosen = set(wanted)
    return [g for g in groups if any(labels.get(member["path"]) in chosen for member in g)]


def page(rows: Sequence[Any], number: int, size: int = PAGE_SIZE) -> Sequence[Any]:
    """Page ``number`` (from 1) of ``rows``; numbers past the end give the last page."""
    pages = page_count(len(rows), size)
    number = min(max(1, number), pages)
    return rows[(number - 1) * size:number * size]


def page_count(n: int, size: int = PAGE_SIZE) -> int:
    return max(1, -(-n // size))


def duplicates_csv(groups: Sequence[Sequence[dict[str, Any]]], keep: dict[int, bool]) -> str:
    """group, path, exact, keep (yes/no) for every member of every group: the person's choice,
    to act on outside the app. Unchosen members: the first of each group is kept."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["group", "path", "exact_copy", "keep"])
    for number, group in enumerate(groups, 1):
        for position, member in enumerate(group):
            chosen = keep.get(int(member["id"]), position == 0)
            writer.writerow([number, member["path"], "yes" if member["exact"] else "no", "yes" if chosen else "no"])
    return out.getvalue()
