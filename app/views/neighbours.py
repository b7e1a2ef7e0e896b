"""Neighbours (the landing page): a query, chosen from the collection or uploaded, and its top-k."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import markup, state
from app.components import Tile, quality_banner, tile_grid
from app.minimap import MiniMap, draw_background, with_star
from app.query import MAX_UPLOAD_MB, UPLOAD_TYPES, UploadError, embed_upload
from indexer.collection import Collection

PAGE_SIZE = 24
UPLOAD_ROUND = "upload_round"


def use_item(collection: Collection, item_id: int) -> None:
    """Make an item the query and redraw."""
    state.set_item_query(collection, item_id)
    # The uploader still holds the earlier upload, and a browser does not report choosing the
    # same file again: a new widget key empties it, so any later upload becomes the query.
    st.session_state[UPLOAD_ROUND] = st.session_state.get(UPLOAD_ROUND, 0) + 1
    st.rerun()


@st.cache_resource(max_entries=4, show_spinner=False)
def minimap_background(directory: str, generation: int, _frame: pd.DataFrame) -> MiniMap:
    # directory + generation are the cache key; the table itself is not hashed.
    return draw_background(_frame["x"].to_numpy(), _frame["y"].to_numpy())


def pick_from_collection(collection: Collection, frame: pd.DataFrame) -> None:
    """Filter by name, page through thumbnails, or draw a random image; a choice becomes the query."""
    filter_col, random_col = st.columns([3, 1], vertical_alignment="bottom")
    pattern = filter_col.text_input("Filter by file name", key="name_filter", placeholder="e.g. cat_ or 2024")
    if random_col.button("Random image", width="stretch"):
        use_item(collection, int(frame["id"].sample(1).iloc[0]))
    matches = frame[frame["path"].str.contains(pattern, case=False, regex=False)] if pattern else frame
    pages = max(1, -(-len(matches) // PAGE_SIZE))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="browse_page") if pages > 1 else 1
    shown = matches.iloc[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    st.caption(f"{len(matches):,} images match" if pattern else f"{len(matches):,} images")
    picked = tile_grid(collection, [Tile(int(r.id), [markup.md(r.name)]) for r in shown.itertuples()],
                       key="browse", columns=6, button="Use")
    if picked is not None:
        use_item(collection, picked)


def upload(collection: Collection, query: state.Query) -> state.Query:
    """The uploader; a newly chosen file becomes the query (returned), a bad one gets one line."""
    chosen = st.file_uploader(f"Find images like this one ({', '.join(UPLOAD_TYPES)}; up to {MAX_UPLOAD_MB} MB)",
                              type=list(UPLOAD_TYPES), key=f"upload:{st.session_state.get(UPLOAD_ROUND, 0)}")
    # The uploader keeps its file across reruns: only a new file becomes the query, so a
    # rerun for another reason does not redo it (use_item empties the uploader instead).
    if chosen is not None and st.session_state.get("upload_seen") != chosen.file_id:
        st.session_state["upload_seen"] = chosen.file_id
        try:
            embedded = embed_upload(collection, chosen.name, chosen.getvalue())
        except UploadError as exc:
            st.session_state["upload_error"] = str(exc)
        else:
            st.session_state.pop("upload_error", None)
            query = state.set_upload_query(collection, embedded.name, embedded.vector, embedded.thumbnail)
    if st.session_state.get("upload_error") and chosen is not None:
        st.error(markup.md(st.session_state["upload_error"]))
    return query


def show_query(collection: Collection, frame: pd.DataFrame, query: state.Query) -> None:
    """The query's picture, name and label, its original on request, and where it lies on the map."""
    st.subheader("Query")
    if query.thumbnail is not None:
        st.image(query.thumbnail, width=220)
    source = "uploaded" if query.kind == "upload" else (
        f"label **{markup.md(query.label)}**" if query.label else "unlabeled")
    st.markdown(f"{markup.code(query.title)}  \n{source}")
    if query.kind == "item" and st.toggle("Show the original", key="show_original"):
        # Only a file inside the collection's image folder is ever read (state.safe_image_path).
        original = state.safe_image_path(collection, query.title)
        if original is None:
            st.caption("The original file is not in the image folder (moved, deleted, or a link to elsewhere).")
        else:
            st.image(str(original), width="stretch")
    if query.xy is not None:
        background = minimap_background(str(collection.directory.resolve()), collection.generation, frame)
        st.image(with_star(background, query.xy), caption="where the query lies on the map")


def show_neighbours(collection: Collection, query: state.Query) -> None:
    """The top k; clicking one makes it the query."""
    k = st.select_slider("Neighbours to show", options=[5, 10, 20, 50, 100], value=10, key="k")
    if query.kind == "item" and query.item_id is not None:
        hits = collection.search_id(query.item_id, k)
    else:
        hits = collection.search_vector(query.vector, k)
    st.subheader(f"Top {len(hits)} neighbours")
    stats = collection.neighbour_stats()
    if stats is not None:
        # A raw cosine means little on its own (a weak model puts everything above 0.95): say where
        # each match stands among this collection's own nearest neighbours (indexer.scores).
        st.caption("How close each match is, measured against how close the images of this collection are to "
                   "their own nearest neighbour; the cosine similarity is the raw score.")
    tiles = [Tile(h.id, ([f"**{markup.md(stats.describe(h.score))}**"] if stats is not None else [])
                  + [f"cosine {h.score:.3f} · {markup.md(h.label or 'unlabeled')}",
                     markup.code(h.path.rsplit("/", 1)[-1])]) for h in hits]
    clicked = tile_grid(collection, tiles, key="hits", columns=5)
    if clicked is not None:
        use_item(collection, clicked)


def render() -> None:
    """Draw the page. Streamlit runs this file as ``__main__`` (below); importing it draws nothing."""
    collection = state.require_collection()
    frame = state.item_table(collection).frame
    st.title("Neighbours")
    props = collection.manifest["model"]["props"]
    st.caption(f"{markup.md(collection.directory.name)}: {len(collection):,} images · "
               f"model {markup.md(props.get('moco.arch', '?'))} at {markup.md(props.get('moco.image_size', '?'))} px")
    quality_banner(collection)
    _ = collection.model  # load the ONNX session now (once per process), not on the first upload
    query = state.current_query(collection) or state.default_query(collection)
    if query is None:
        st.info("This collection has no indexed images yet.")
        return
    query_col, pick_col = st.columns([1, 2], gap="large")
    with pick_col:
        # Only the chosen picker is drawn: the browse grid's thumbnails would otherwise be sent again
        # on every rerun, an upload included, which is what a person waits for.
        mode = st.segmented_control("Query from", ["Upload an image", "Pick from the collection"],
                                    default="Upload an image", key="query_mode", label_visibility="collapsed")
        if mode == "Pick from the collection":
            pick_from_collection(collection, frame)
        else:
            query = upload(collection, query)
    with query_col:
        show_query(collection, frame, query)
    show_neighbours(collection, query)


if __name__ == "__main__":
    render()
