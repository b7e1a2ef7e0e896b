"""Curation scores kept in the collection's items.sqlite, tied to the generation they describe.

The scores are written in a transaction of their own, outside the generation machinery (like
people's labels), so computing them needs no writer lock and never blocks a build. Each set is
stamped with the generation it was computed from: a reader of a newer generation finds none
(:func:`load` returns None) and the scores are computed again, so they can never describe
items that changed since. Only the newest set is kept.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from indexer import store
from indexer.curation import CurationScores, LabelIssue

__all__ = ["kept_label_source", "load", "save"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS curation_runs (
    generation INTEGER PRIMARY KEY,
    label_source TEXT NOT NULL,
    note TEXT NOT NULL,
    computed_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS curation_items (
    generation INTEGER NOT NULL,
    id INTEGER NOT NULL,
    outlier REAL NOT NULL,
    cluster INTEGER NOT NULL,
    representative REAL NOT NULL,
    PRIMARY KEY (generation, id)
);
CREATE TABLE IF NOT EXISTS curation_issues (
    generation INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    id INTEGER NOT NULL,
    given TEXT NOT NULL,
    suggested TEXT NOT NULL,
    confidence REAL NOT NULL,
    quality REAL NOT NULL,
    PRIMARY KEY (generation, rank)
);
CREATE TABLE IF NOT EXISTS curation_duplicates (
    generation INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (generation, grp, id)
);
"""

TABLES = ("curation_runs", "curation_items", "curation_issues", "curation_duplicates")


def save(directory: Path, scores: CurationScores) -> None:
    """Replace the stored scores by ``scores`` in one transaction."""
    conn = store.connect(directory)
    try:
        with conn:
            conn.executescript(SCHEMA)
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
            gen = int(scores.generation)
            conn.execute("INSERT INTO curation_runs VALUES (?, ?, ?, ?)",
                         (gen, scores.label_source, scores.note, time.time_ns()))
            conn.executemany("INSERT INTO curation_items VALUES (?, ?, ?, ?, ?)",
                             zip([gen] * len(scores.ids), scores.ids.tolist(), scores.outlier.tolist(),
                                 scores.cluster.tolist(), scores.representative.tolist()))
            conn.executemany("INSERT INTO curation_issues VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(gen, rank, int(scores.ids[issue.position]), issue.given, issue.suggested,
                               issue.confidence, issue.quality) for rank, issue in enumerate(scores.label_issues)])
            conn.executemany("INSERT INTO curation_duplicates VALUES (?, ?, ?)",
                             [(gen, g, int(item)) for g, group in enumerate(scores.duplicate_groups) for item in group])
    except sqlite3.OperationalError as exc:
        raise store.CollectionError(f"cannot save curation scores in {directory / store.ITEMS_DB}: "
                                    f"{store.one_line(exc)} (read-only storage or no write permission?)") from None
    finally:
        conn.close()


def load(directory: Path, generation: int, ids: np.ndarray) -> CurationScores | None:
    """The scores stored for ``generation`` (rows in the order of ``ids``, the collection's live
    ids), or None when none were computed for it (never, or for an older generation)."""
    conn = store.connect(directory, readonly=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not set(TABLES) <= tables:
            return None
        run = conn.execute("SELECT label_source, note FROM curation_runs WHERE generation = ?",
                           (int(generation),)).fetchone()
        if run is None:
            return None
        rows = conn.execute("SELECT id, outlier, cluster, representative FROM curation_items WHERE generation = ? "
                            "ORDER BY id", (int(generation),)).fetchall()
        stored = np.array([r[0] for r in rows], dtype=np.int64)
        if not np.array_equal(stored, np.asarray(ids, dtype=np.int64)):
            return None  # not the items of this generation: treat as never computed
        position = {int(i): p for p, i in enumerate(stored)}
        issues = [LabelIssue(position=position[r[0]], given=r[1], suggested=r[2], confidence=r[3], quality=r[4])
                  for r in conn.execute("SELECT id, given, suggested, confidence, quality FROM curation_issues "
                                        "WHERE generation = ? ORDER BY rank", (int(generation),))
                  if r[0] in position]
        groups: dict[int, list[int]] = {}
        for grp, item in conn.execute("SELECT grp, id FROM curation_duplicates WHERE generation = ? ORDER BY grp, id",
                                      (int(generation),)):
            groups.setdefault(grp, []).append(int(item))
        return CurationScores(
            generation=int(generation), ids=stored,
            outlier=np.array([r[1] for r in rows], dtype=np.float32),
            cluster=np.array([r[2] for r in rows], dtype=np.int64),
            representative=np.array([r[3] for r in rows], dtype=np.float32),
            label_source=run[0], note=run[1], label_issues=issues,
            duplicate_groups=[groups[g] for g in sorted(groups)])
    except sqlite3.DatabaseError as exc:
        raise store.damaged(directory / store.ITEMS_DB, exc) from None
    finally:
        conn.close()


def kept_label_source(directory: Path) -> str | None:
    """The label source of the scores kept in the collection, whatever their generation (None when
    it has none): ``indexer update`` recomputes them for the new generation with the same one."""
    conn = store.connect(directory, readonly=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "curation_runs" not in tables:
            return None
        row = conn.execute("SELECT label_source FROM curation_runs ORDER BY generation DESC LIMIT 1").fetchone()
        return row[0] if row else None
    except sqlite3.DatabaseError as exc:
        raise store.damaged(directory / store.ITEMS_DB, exc) from None
    finally:
        conn.close()
