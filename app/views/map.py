"""Map page: the collection's stored 2-D projection, coloured by label or cluster, with the query.

The coordinates were computed at index time (``indexer`` fits the projection once and places
later items into it), so opening this page never runs t-SNE. Clicking a point, or drawing a box
or lasso, shows those images beside the map; any of them can become the session's query.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import streamlit as st

from app import mapview, markup, state
from app.components import Tile, quality_banner, tile_grid
from indexer.analysis import kmeans_labels
from indexer.collection import Collection
from indexer.fewlabel import has_label

CHART_KEY = "map_chart"
NEIGHBOURS = 6
AREA_TILES = 6  # one row
TILE_COLUMNS = 6  # below a full-width map: thumbnails stay thumbnail-sized
DEFAULT_CLUSTERS = 10


@st.cache_resource(max_entries=4, show_spinner="Clustering the vectors…")
def _clusters(directory: str, generation: int, k: int, _collection: Collection) -> npt.NDArray[np.int64]:
    # directory + generation + k are the cache key; the collection itself is not hashed.
    return kmeans_labels(_collection.vectors, k)


def colour_groups(collection: Collection, labels: list[object]) -> tuple[npt.NDArray[np.object_], bool]:
    """The colour group of each item and whether the hover should name it (clusters only)."""
    has_labels = any(has_label(label) for label in labels)
    options = ["label", "cluster"] if has_labels else ["cluster"]
    left, right = st.columns([2, 3])
    with left:
        if has_labels:
            colour_by = st.radio("Colour by", options, horizontal=True, key="map_colour_by",
                                 format_func=lambda o: {"label": "folder label", "cluster": "k-means cluster"}[o])
        else:
            colour_by = "cluster"
            st.caption("No folder labels in this collection: coloured by k-means cluster of the embeddings.")
    if colour_by == "label":
        return mapview.group_names(labels), False
    with right:
        k = st.slider("Clusters", 2, 50, DEFAULT_CLUSTERS, key="map_clusters")
    directory = str(Path(collection.directory).resolve())
    clusters = _clusters(directory, collection.generation, min(k, len(labels)), collection)
    return np.array([f"cluster {c + 1}" for c in clusters], dtype=object), True


def make_query(collection: Collection, item_id: int) -> None:
    """Make an item the session's query and open the Neighbours page on it."""
    state.set_item_query(collection, item_id)
    st.switch_page("views/neighbours.py")


def show_item(collection: Collection, table: state.ItemTable, item_id: int) -> None:
    """One clicked point: its thumbnail, a button to search with it, and its nearest images."""
    row = table.row(item_id)
    item_col, hits_col = st.columns([1, 4], gap="medium")
    with item_col:
        thumb = collection.thumbnail(item_id)
        if thumb is not None:
            st.image(thumb, width=200)
        label = markup.md(row["label"]) if has_label(row["label"]) else "none"
        st.markdown(f"{markup.code(row['path'])}  \nlabel **{label}**")
        if st.button("Search with this image", key="map_search_selected", type="primary"):
            make_query(collection, item_id)
    with hits_col:
        hits = collection.search_id(item_id, NEIGHBOURS)
        st.markdown(f"**Top {len(hits)} neighbours**")
        tiles = [Tile(h.id, [f"**{h.score:.3f}** · {markup.md(h.label or 'unlabeled')}"]) for h in hits]
        clicked = tile_grid(collection, tiles, key="map_neighbours", columns=TILE_COLUMNS)
    if clicked is not None:
        make_query(collection, clicked)


def show_area(collection: Collection, table: state.ItemTable, ids: list[int]) -> None:
    """A box or lasso: how many, which labels, and a few of the images."""
    rows = table.frame.iloc[[table.position[i] for i in ids if i in table.position]]
    st.markdown(f"**{len(rows):,} images selected**")
    counts = rows["label"].fillna(mapview.NO_LABEL).value_counts()
    st.caption(" · ".join(f"{markup.md(name)}: {count:,}" for name, count in counts.head(8).items()))
    tiles = [Tile(int(r.id), [markup.code(r.name)]) for r in rows.head(AREA_TILES).itertuples()]
    clicked = tile_grid(collection, tiles, key="map_area", columns=TILE_COLUMNS)
    if clicked is not None:
        make_query(collection, clicked)


def render() -> None:
    """Draw the page. Streamlit runs this file as ``__main__`` (below); importing it draws nothing."""
    collection = state.require_collection()
    table = state.item_table(collection)
    frame = table.frame
    st.title("Map")
    quality_banner(collection)
    if not len(frame):
        st.info("This collection has no indexed images yet.")
        return
    if not np.isfinite(frame["x"].to_numpy(np.float64)).any():
        st.info("This collection has no map: rebuild it with `python -m indexer build` to compute one.")
        return

    groups, by_cluster = colour_groups(collection, frame["label"].tolist())
    query = state.current_query(collection)
    previous = mapview.read_selection((st.session_state.get(CHART_KEY) or {}).get("selection"), [])
    keep = [*previous.ids, *([query.item_id] if query is not None and query.item_id is not None else [])]
    drawn = mapview.build_map(frame, groups, keep_ids=keep, by_cluster=by_cluster,
                              query_xy=query.xy if query is not None else None,
                              query_title=query.title if query is not None else "")

    # The map takes the page's whole width; what is picked on it is shown below.
    event = st.plotly_chart(drawn.figure, key=CHART_KEY, on_select="rerun", width="stretch",
                            selection_mode=("points", "box", "lasso"),
                            config={"scrollZoom": True, "displaylogo": False})
    note = f"{drawn.caption}." + (f" ★ marks the query: {markup.code(query.title)}."
                                  if query is not None and query.xy else "")
    st.caption(note)
    selection = mapview.read_selection(event.selection if event is not None else None, drawn.trace_ids)
    if not selection.ids:
        st.info("Click a point, or draw a box or lasso (tools above the map), to see its images below the map.")
    elif not selection.area:
        show_item(collection, table, selection.ids[0])
    else:
        show_area(collection, table, selection.ids)


if __name__ == "__main__":
    render()
