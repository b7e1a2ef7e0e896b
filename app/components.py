"""Drawing blocks shared by pages: thumbnail grids whose images can be clicked into the query, job
progress, and the banner that says how good the collection's model measured itself to be."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import streamlit as st

from app import markup
from app.jobs import Job
from indexer.collection import Collection
from indexer.quality import ModelQuality

STAGE_ICONS = {"pending": ":material/schedule:", "running": ":material/sync:",
               "done": ":green[:material/check_circle:]", "skipped": ":green[:material/check_circle:]",
               "failed": ":red[:material/error:]"}
"""Material icons ship with Streamlit's own font, so they show in any browser (emoji need a system font)."""


@dataclass(frozen=True)
class Tile:
    """One image in a grid: item id and the caption under it (markdown, one line each; text from
    files or people goes through :mod:`app.markup` first)."""

    item_id: int
    caption: Sequence[str]


def tile_grid(collection: Collection, tiles: Sequence[Tile], *, key: str, columns: int = 5,
              button: str | None = "Search this") -> int | None:
    """Draw thumbnails in rows of ``columns``; returns the id whose button was pressed, if any.

    Thumbnails come from the collection's database (small JPEGs made at index time), so a grid
    never opens an original image."""
    clicked: int | None = None
    for start in range(0, len(tiles), columns):
        cells = st.columns(columns)
        for cell, tile in zip(cells, tiles[start:start + columns]):
            with cell:
                thumb = collection.thumbnail(tile.item_id)
                if thumb is not None:
                    st.image(thumb, width="stretch")
                else:
                    st.caption("(no thumbnail)")
                st.caption("  \n".join(tile.caption))
                if button and st.button(button, key=f"{key}:{tile.item_id}", width="stretch"):
                    clicked = tile.item_id
    return clicked


def job_stages(job: Job) -> None:
    """A background job's stages: done ones ticked with their time, the running one with its bar."""
    for stage in job.states:
        timing = f" · {stage.seconds:.0f} s" if stage.started is not None else ""
        st.markdown(f"{STAGE_ICONS[stage.status]} {markup.md(stage.label)}{timing}")
        if stage.status == "running":  # the child's own output line, which may name any file
            st.progress(stage.fraction or 0.0, text=markup.md(stage.line[-160:]) if stage.line else "starting…")


QUALITY_NOTE = "quality_note"
"""Session key of a page's extra word about a collection's quality (the demo page leaves one)."""


def add_quality_note(directory: str, text: str) -> None:
    """Have the quality banner of ``directory`` (resolved) say ``text`` (markdown) too, this session."""
    st.session_state[QUALITY_NOTE] = (directory, text)


def quality_text(measured: ModelQuality) -> tuple[str, str]:
    """The banner's kind ("warning", "caption" or "info") and its markdown, from the model's record."""
    summary = markup.md(measured.summary())
    if measured.doubtful:
        return "warning", (
            f"**Careful: {markup.md(measured.doubt())}.** " + summary + ". Its neighbours, map "
            "and few-label results are what an untrained network gives, so they say little about what training "
            "on these images could do: train longer (or check the recipe) before relying on them.")
    if measured.measured:
        monitor = f" (monitor: {markup.md(measured.monitor)})" if measured.monitor else ""
        return "caption", f"Model quality at training time: {summary}{monitor}."
    return "info", (f"Model quality not measured: {markup.md(measured.reason)}. Nothing records whether this model "
                    "embeds better than a random network; train with `--val DIR` to have it measured.")


def quality_banner(collection: Collection) -> ModelQuality:
    """Every page that shows a collection opens with this: a warning when its model is no better
    than its random start, a short caption of the trainer's numbers otherwise, a note when
    nothing was measured. Returns the record, for pages that show more of it."""
    measured = collection.quality
    kind, text = quality_text(measured)
    note = st.session_state.get(QUALITY_NOTE)
    if note is not None and note[0] == str(collection.directory.resolve()):
        text += "  \n" + note[1]
    {"warning": st.warning, "caption": st.caption, "info": st.info}[kind](text)
    return measured
