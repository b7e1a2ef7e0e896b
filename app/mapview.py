"""The map figure, as plain functions over arrays (no Streamlit), so a benchmark can time it alone.

Why a cap on drawn points: the browser receives the whole figure as JSON on every rerun, and
WebGL stays fluid for tens of thousands of markers, not for a million. A fixed-seed sample
keeps the picture (and therefore Streamlit's chart identity, which hashes the figure) the same
from one rerun to the next, so a selection made in the chart survives the rerun it triggers.

Why one trace per colour group: the legend then names the groups and clicking a legend entry
hides one; past :data:`MAX_LEGEND_GROUPS` groups a legend is useless, so one trace carries a
colour scale instead.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import plotly.graph_objects as go
from PIL import Image, ImageCms
from plotly.colors import convert_colors_to_same_type, qualitative

from indexer.fewlabel import has_label

__all__ = ["MAX_POINTS", "MapFigure", "Selection", "build_map", "group_names", "read_selection", "subsample"]

MAX_POINTS = 20_000
"""Markers drawn at most (plus the query and selected points, always kept)."""

MAX_LEGEND_GROUPS = 48
NO_LABEL = "(no label)"
NO_LABEL_COLOUR = "#b0b0b0"
QUERY_COLOUR = "#e4572e"
BACKGROUND = "#ffffff"
PALE = 85.0
"""Lightness (CIE L*, 0-100) above which a colour is too pale to see as a small marker on white."""


def to_hex(colours: Sequence[str]) -> list[str]:
    """Plotly colours ("#rrggbb", "rgb(r, g, b)") as lower-case "#rrggbb"."""
    tuples = convert_colors_to_same_type(list(colours), colortype="tuple")[0]
    return ["#" + "".join(f"{round(255 * c):02x}" for c in t) for t in tuples]


def lab(colours: Sequence[str]) -> npt.NDArray[np.float64]:
    """CIELAB (L* 0-100, a*, b*) of plotly colours ("#rrggbb" or "rgb(r, g, b)"), by Pillow's
    colour management (littleCMS): distances there follow what the eye tells apart."""
    rgb = [tuple(round(255 * c) for c in t)
           for t in convert_colors_to_same_type(list(colours), colortype="tuple")[0]]
    strip = Image.new("RGB", (len(rgb), 1))
    strip.putdata(rgb)
    out = np.asarray(ImageCms.applyTransform(strip, _SRGB_TO_LAB))[0]  # L scaled to 0-255; a, b as int8
    return np.column_stack([out[:, 0] * (100 / 255), out[:, 1:].view(np.int8)]).astype(np.float64)


def distinct_palette(candidates: Sequence[str], n: int, avoid: Sequence[str] = (BACKGROUND, NO_LABEL_COLOUR)
                     ) -> list[str]:
    """``n`` colours from ``candidates``, each the one farthest (CIE76 in CIELAB) from all chosen
    before and from ``avoid`` (the background, the grey of unlabelled points): greedy
    farthest-point order, so the first k colours are well apart for every k, and a map of 12
    classes does not get two pinks as the first 24 of Dark24 gave it. Pale candidates are skipped."""
    unique = list(dict.fromkeys(to_hex(candidates)))
    points = lab(unique)
    keep = points[:, 0] <= PALE
    unique, points = [c for c, k in zip(unique, keep) if k], points[keep]
    nearest = np.min(np.linalg.norm(points[:, None] - lab(avoid)[None], axis=2), axis=1)
    chosen: list[str] = []
    for _ in range(min(n, len(unique))):
        best = int(np.argmax(nearest))
        chosen.append(unique[best])
        nearest = np.minimum(nearest, np.linalg.norm(points - points[best], axis=1))
        nearest[best] = -1.0
    return chosen


_SRGB_TO_LAB = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
PALETTE = distinct_palette([*qualitative.Alphabet, *qualitative.Dark24, *qualitative.Light24, *qualitative.D3,
                            *qualitative.Set1, *qualitative.Bold, *qualitative.Vivid, *qualitative.Safe],
                           MAX_LEGEND_GROUPS)
"""Class colours in order; plotly's qualitative palettes re-ordered for distinctness."""


@dataclass(frozen=True)
class MapFigure:
    """The figure and what is needed to read a selection made on it."""

    figure: go.Figure
    shown: int
    total: int
    trace_ids: list[npt.NDArray[np.int64]]  # item id of each point, per trace (empty for the query star)

    @property
    def caption(self) -> str:
        if self.shown >= self.total:
            return f"showing all {self.total:,} points"
        return f"showing {self.shown:,} of {self.total:,} points (a fixed random sample, to keep the map fluid)"


@dataclass(frozen=True)
class Selection:
    """Item ids picked on the map; ``area`` when they came from a box or lasso, not a click."""

    ids: list[int]
    area: bool


def subsample(total: int, limit: int, keep: npt.ArrayLike = (), seed: int = 0) -> npt.NDArray[np.int64]:
    """Sorted row numbers: a fixed random ``limit`` of ``total`` rows, plus the rows in ``keep``.

    The same arguments always give the same rows (the seed is fixed), so redrawing the map
    for a new query or colouring does not reshuffle which points are visible."""
    keep_rows = np.asarray(keep, dtype=np.int64).reshape(-1)
    keep_rows = keep_rows[(keep_rows >= 0) & (keep_rows < total)]
    if total <= limit:
        return np.arange(total, dtype=np.int64)
    sample = np.random.default_rng(seed).permutation(total)[:limit]
    return np.union1d(sample, keep_rows).astype(np.int64)


def group_names(labels: Sequence[object]) -> npt.NDArray[np.object_]:
    """The colour group of each item from its folder label; unlabelled items (see
    :func:`indexer.fewlabel.has_label`) share one grey group. Colouring by k-means cluster uses
    :func:`indexer.analysis.kmeans_labels`: the numbers live in ``indexer``, this module only draws."""
    return np.array([label if has_label(label) else NO_LABEL for label in labels], dtype=object)


def _hover(names: Sequence[str], labels: Sequence[str] | None) -> npt.NDArray[np.object_]:
    """Per-point hover text: the file name, and the label when the trace is not the label's own.

    An object array, not a list: plotly validates a list element by element, which made this
    the slowest step of a rerun (about 0.1 s for 20,000 points)."""
    # Plotly reads hover text as a little HTML (<b>, <a href>): names are escaped, shown as written.
    if labels is None:
        return np.array([html.escape(n) for n in names], dtype=object)
    return np.array([f"{html.escape(n)}<br>label: {html.escape(str(lab))}" for n, lab in zip(names, labels)],
                    dtype=object)


def _webgl(**props: Any) -> dict[str, Any]:
    """A ``scattergl`` trace as a dict: ``go.Figure`` validates a dict once, whereas a ready
    ``go.Scattergl`` is deep-copied into the figure (object arrays element by element)."""
    return {"type": "scattergl", "mode": "markers", **props}


def _literal(text: str) -> str:
    """Text placed inside a hovertemplate, where ``%{`` would start a variable."""
    return text.replace("%{", "%​{")


def _group_traces(frame: pd.DataFrame, groups: npt.NDArray[np.object_], order: list[str], by_cluster: bool
                  ) -> tuple[list[dict[str, Any]], list[npt.NDArray[np.int64]]]:
    """One WebGL trace per group, colours fixed by the group's place in ``order`` (all groups of
    the collection, not only the sampled ones, so a colour means the same thing on every draw)."""
    traces, trace_ids = [], []
    for position, name in enumerate(order):
        mask = groups == name
        if not mask.any():
            continue
        part = frame[mask]
        colour = NO_LABEL_COLOUR if name == NO_LABEL else PALETTE[position % len(PALETTE)]
        ids = part["id"].to_numpy(np.int64)
        labels = part["label"].fillna(NO_LABEL).tolist() if by_cluster else None
        suffix = name if by_cluster else f"label: {name}"
        traces.append(_webgl(
            x=part["x"].to_numpy(np.float32), y=part["y"].to_numpy(np.float32), name=name,
            customdata=ids, hovertext=_hover(part["name"].tolist(), labels),
            hovertemplate=f"%{{hovertext}}<br>{_literal(suffix)}<extra></extra>",
            marker={"size": 5, "color": colour, "opacity": 0.8}))
        trace_ids.append(ids)
    return traces, trace_ids


def _scale_trace(frame: pd.DataFrame, groups: npt.NDArray[np.object_], order: list[str], by_cluster: bool
                 ) -> tuple[list[dict[str, Any]], list[npt.NDArray[np.int64]]]:
    """One WebGL trace coloured by group number (too many groups for a legend)."""
    code = {name: i for i, name in enumerate(order)}
    ids = frame["id"].to_numpy(np.int64)
    text = _hover(frame["name"].tolist(), frame["label"].fillna(NO_LABEL).tolist())
    if by_cluster:
        text = np.array([f"{t}<br>{g}" for t, g in zip(text, groups)], dtype=object)
    trace = _webgl(
        x=frame["x"].to_numpy(np.float32), y=frame["y"].to_numpy(np.float32), name="items",
        customdata=ids, hovertext=text, hovertemplate="%{hovertext}<extra></extra>", showlegend=False,
        marker={"size": 5, "opacity": 0.8, "color": np.array([code[g] for g in groups], dtype=np.int32),
                "colorscale": "Turbo"})
    return [trace], [ids]


def _query_trace(xy: tuple[float, float], title: str) -> go.Scatter:
    """The query as a star; an SVG trace, which plotly draws above the WebGL points."""
    return go.Scatter(x=[xy[0]], y=[xy[1]], mode="markers", name="query", hovertext=[f"query: {html.escape(title)}"],
                      hovertemplate="%{hovertext}<extra></extra>",
                      marker={"size": 20, "symbol": "star", "color": QUERY_COLOUR, "line": {"width": 1.5,
                                                                                             "color": "black"}})


def build_map(frame: pd.DataFrame, groups: npt.ArrayLike, *, max_points: int = MAX_POINTS,
              keep_ids: Sequence[int] = (), query_xy: tuple[float, float] | None = None, query_title: str = "",
              by_cluster: bool = False, height: int = 640) -> MapFigure:
    """The map of ``frame`` (columns id, name, label, x, y), coloured by ``groups`` (one per row).

    Rows without coordinates are left out; at most ``max_points`` rows are drawn, always
    including ``keep_ids`` (the query item, the selection). ``by_cluster`` says the groups
    are clusters, so the hover shows the label and the cluster, not the label twice."""
    groups = np.asarray(groups, dtype=object)
    placed = np.isfinite(frame["x"].to_numpy(np.float64)) & np.isfinite(frame["y"].to_numpy(np.float64))
    frame, groups = frame[placed], groups[placed]
    keep_rows = np.flatnonzero(np.isin(frame["id"].to_numpy(np.int64), np.asarray(keep_ids, dtype=np.int64)))
    rows = subsample(len(frame), max_points, keep_rows)
    order = sorted(set(groups.tolist()), key=lambda g: (g == NO_LABEL, _natural(g)))
    shown_frame, shown_groups = frame.iloc[rows], groups[rows]
    make = _group_traces if len(order) <= MAX_LEGEND_GROUPS else _scale_trace
    traces, trace_ids = make(shown_frame, shown_groups, order, by_cluster)
    figure = go.Figure(traces)
    if query_xy is not None and all(np.isfinite(query_xy)):
        figure.add_trace(_query_trace(query_xy, query_title))
        trace_ids.append(np.zeros(0, dtype=np.int64))
    # No fixed width and no locked aspect ratio: the chart takes the page's width and the points
    # fill it (a 1:1 lock left two thirds of a wide page blank; a projection's aspect means little).
    figure.update_layout(height=height, autosize=True, margin={"l": 0, "r": 0, "t": 10, "b": 0},
                         legend={"itemsizing": "constant"}, uirevision="map")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return MapFigure(figure, len(rows), len(frame), trace_ids)


def _natural(text: str) -> tuple[Any, ...]:
    """Sort key that puts "cluster 2" before "cluster 10"."""
    head, _, tail = text.rpartition(" ")
    return (head, int(tail), "") if tail.isdigit() else (text, -1, text)


def read_selection(selection: Mapping[str, Any] | None, trace_ids: Sequence[npt.NDArray[np.int64]]) -> Selection:
    """Item ids from a plotly selection event (``{"points": [...], "box": [...], "lasso": [...]}``).

    Each point carries its item id as ``customdata``; when a front end leaves that out, the
    point's trace (``curve_number``) and place in it (``point_index``) find it instead. Points
    of the query star have no item and are ignored."""
    if not selection:
        return Selection([], False)
    ids: list[int] = []
    for point in selection.get("points") or []:
        item = _point_id(point, trace_ids)
        if item is not None and item not in ids:
            ids.append(item)
    area = bool(selection.get("box") or selection.get("lasso")) or len(ids) > 1
    return Selection(ids, area)


def _point_id(point: Mapping[str, Any], trace_ids: Sequence[npt.NDArray[np.int64]]) -> int | None:
    curve = point.get("curve_number")
    if isinstance(curve, int) and 0 <= curve < len(trace_ids) and len(trace_ids[curve]) == 0:
        return None  # the query star
    data = point.get("customdata")
    if isinstance(data, (list, tuple)):
        data = data[0] if data else None
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return int(data)
    index = point.get("point_index", point.get("point_number"))
    if isinstance(curve, int) and isinstance(index, int) and 0 <= curve < len(trace_ids) \
            and 0 <= index < len(trace_ids[curve]):
        return int(trace_ids[curve][index])
    return None
