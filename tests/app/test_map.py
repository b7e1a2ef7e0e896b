"""Map page: the stored projection drawn with WebGL, the query star, selections and the point cap."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from streamlit.proto.WidgetStates_pb2 import WidgetState
from streamlit.testing.v1 import AppTest

from app import mapview, state
from indexer.analysis import kmeans_labels
from indexer.build import build
from indexer.collection import Collection
from tests.app.conftest import make_app
from tests.indexer.conftest import COLORS, make_model, picture

MAP = "views/map.py"


def _array(value: Any) -> np.ndarray:
    """A plotly JSON array: a plain list, or a typed array (``{"dtype": "f4", "bdata": base64}``)."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
    return np.asarray(value)


def _chart(at: AppTest) -> tuple[Any, dict[str, Any]]:
    charts = at.get("plotly_chart")
    assert len(charts) == 1, "the map page draws exactly one chart"
    return charts[0], json.loads(charts[0].proto.spec)


def _map_app(collection_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    at = make_app(collection_dir, monkeypatch)
    at.switch_page(MAP).run()
    assert not at.exception, at.exception
    return at


def _select(at: AppTest, selection: dict[str, Any]) -> AppTest:
    """Rerun as if the person had selected on the chart.

    AppTest has no plotly widget, so the chart's widget state (the JSON the front end sends)
    is added to the other widgets' states by hand: the same message a browser would send.

    The one use of AppTest internals (``_tree``, ``_run``) in the app tests, because the public
    API cannot express it in Streamlit 1.67: ``AppTest`` offers no plotly element with a
    ``set_value`` (``at.get("plotly_chart")`` gives an element without one), and writing the
    chart's key in ``at.session_state`` is refused (``st.plotly_chart`` registers its selection
    with ``writes_allowed=False``). Everything else goes through ``run()`` and the widgets."""
    chart, _ = _chart(at)
    states = at._tree.get_widget_states()
    state = WidgetState(id=chart.proto.id, string_value=json.dumps({"selection": selection}))
    states.widgets.append(state)
    at._run(states)
    assert not at.exception, at.exception
    return at


def _point(spec: dict[str, Any], curve: int, index: int) -> dict[str, Any]:
    trace = spec["data"][curve]
    return {"curve_number": curve, "point_number": index, "point_index": index,
            "x": float(_array(trace["x"])[index]), "y": float(_array(trace["y"])[index]),
            "customdata": int(_array(trace["customdata"])[index])}


def test_map_draws_every_item_with_webgl_coloured_by_label(collection_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    at = _map_app(collection_dir, monkeypatch)
    _, spec = _chart(at)
    with Collection.open(collection_dir, device="cpu") as col:
        expected = {it.id: it.label or mapview.NO_LABEL for it in col.items}
    traces = [t for t in spec["data"] if t["type"] == "scattergl"]
    assert {t["name"] for t in traces} == set(expected.values())
    drawn = {int(i): t["name"] for t in traces for i in _array(t["customdata"])}
    assert drawn == expected  # every item once, in the trace of its own label
    assert any("showing all 37 points" in c.value for c in at.caption)


def test_colour_by_cluster_groups_the_points_by_k_means(collection_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    at = _map_app(collection_dir, monkeypatch)
    at.radio(key="map_colour_by").set_value("cluster").run()
    at.slider(key="map_clusters").set_value(3).run()
    assert not at.exception, at.exception
    _, spec = _chart(at)
    traces = [t for t in spec["data"] if t["type"] == "scattergl"]
    assert sorted(t["name"] for t in traces) == ["cluster 1", "cluster 2", "cluster 3"]
    # Each point is drawn in the trace of its own k-means cluster, as indexer computes it.
    with Collection.open(collection_dir, device="cpu") as col:
        expected = {int(i): f"cluster {c + 1}" for i, c in zip(col.ids, kmeans_labels(col.vectors, 3))}
    drawn = {int(i): t["name"] for t in traces for i in _array(t["customdata"])}
    assert drawn == expected and len(drawn) == 37
    # The hover names each point's folder label, since the colour no longer says it.
    assert all("label: class" in text or "label: (no label)" in text for t in traces for text in t["hovertext"])


def test_a_collection_without_labels_is_coloured_by_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "loose").mkdir()
    for i in range(16):  # files directly in the root have no label
        picture(i, COLORS[i % 2]).save(tmp_path / "loose" / f"{i}.png")
    out = tmp_path / "indexes" / "loose"
    build(tmp_path / "loose", out, model=make_model(tmp_path / "tiny.onnx"), device="cpu",
          progress=False).close()
    at = _map_app(out, monkeypatch)
    assert not at.radio  # nothing to choose: clusters are the only colouring
    _, spec = _chart(at)
    traces = [t for t in spec["data"] if t["type"] == "scattergl"]
    assert 1 < len(traces) <= 10 and all(t["name"].startswith("cluster ") for t in traces)  # k=10 by default
    assert sum(len(_array(t["customdata"])) for t in traces) == 16


def _query_key(collection_dir: Path) -> str:
    return f"query:{collection_dir.resolve()}"


def test_an_uploaded_query_is_a_star_where_the_projection_places_it(collection_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with Collection.open(collection_dir, device="cpu") as col:
        vector = col.vectors[5] * 0.5 + col.vectors[6] * 0.5
        xy = tuple(float(v) for v in col.projection.place(vector[None])[0])
    at = make_app(collection_dir, monkeypatch)
    at.session_state[_query_key(collection_dir)] = state.Query("upload", vector, "upload.jpg", None, xy=xy)
    at.switch_page(MAP).run()
    assert not at.exception, at.exception
    _, spec = _chart(at)
    stars = [t for t in spec["data"] if t.get("marker", {}).get("symbol") == "star"]
    assert len(stars) == 1
    assert (_array(stars[0]["x"])[0], _array(stars[0]["y"])[0]) == pytest.approx(xy)
    assert any("upload.jpg" in c.value for c in at.caption)


def test_no_query_no_star(collection_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, spec = _chart(_map_app(collection_dir, monkeypatch))
    assert not [t for t in spec["data"] if t.get("marker", {}).get("symbol") == "star"]


def test_clicking_a_point_shows_it_and_its_neighbours(collection_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _map_app(collection_dir, monkeypatch)
    _, spec = _chart(at)
    point = _point(spec, 0, 2)
    at = _select(at, {"points": [point], "point_indices": [2], "box": [], "lasso": []})
    with Collection.open(collection_dir, device="cpu") as col:
        hits = col.search_id(point["customdata"], 6)
        path = col.item(point["customdata"]).path
    assert any(path in m.value for m in at.markdown)
    assert len(at.image) == 1 + len(hits)  # the item and its neighbours
    neighbour_buttons = [b for b in at.button if b.key and b.key.startswith("map_neighbours:")]
    assert [int(b.key.split(":")[1]) for b in neighbour_buttons] == [h.id for h in hits]
    neighbour_buttons[0].click().run()  # makes it the query and opens the Neighbours page
    assert not at.exception, at.exception
    assert at.session_state[_query_key(collection_dir)].item_id == hits[0].id
    assert [t.value for t in at.title] == ["Neighbours"]
    with Collection.open(collection_dir, device="cpu") as col:
        assert any(m.value.startswith(f"`{col.item(hits[0].id).path}`") for m in at.markdown)


def test_a_box_selection_shows_a_few_of_the_selected_images(collection_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    at = _map_app(collection_dir, monkeypatch)
    _, spec = _chart(at)
    points = [_point(spec, c, i) for c in range(3) for i in range(4)]
    box = [{"x": [-1e9, 1e9], "y": [-1e9, 1e9]}]
    at = _select(at, {"points": points, "point_indices": [p["point_index"] for p in points], "box": box,
                      "lasso": []})
    assert any("12 images selected" in m.value for m in at.markdown)
    assert len(at.image) == 6  # a row of them, not all twelve


def _frame(n: int, labels: list[str | None]) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"id": np.arange(1, n + 1, dtype=np.int64), "path": [f"a/{i}.jpg" for i in range(n)],
                         "name": [f"{i}.jpg" for i in range(n)], "label": (labels * n)[:n],
                         "x": rng.standard_normal(n).astype(np.float32),
                         "y": rng.standard_normal(n).astype(np.float32)})


def _drawn_ids(drawn: mapview.MapFigure) -> np.ndarray:
    return np.concatenate(drawn.trace_ids)


def test_large_maps_are_capped_stably_and_keep_the_query() -> None:
    frame = _frame(100_000, ["cat", "dog", None])
    groups = mapview.group_names(frame["label"].tolist())
    query_id = 99_999  # chosen so the fixed sample would not hold it on its own
    assert query_id not in set(_drawn_ids(mapview.build_map(frame, groups, max_points=5_000)))
    drawn = mapview.build_map(frame, groups, max_points=5_000, keep_ids=[query_id], query_xy=(0.5, -0.5))
    ids = _drawn_ids(drawn)
    assert drawn.shown == len(ids) == 5_001 and drawn.total == 100_000
    assert query_id in set(ids)
    assert drawn.caption.startswith("showing 5,001 of 100,000 points")
    again = mapview.build_map(frame, groups, max_points=5_000, keep_ids=[query_id], query_xy=(0.5, -0.5))
    assert again.figure.to_json() == drawn.figure.to_json()  # same picture, so the chart keeps its selection
    assert [t.type for t in drawn.figure.data] == ["scattergl"] * 3 + ["scatter"]


def test_points_without_coordinates_are_not_drawn() -> None:
    frame = _frame(10, ["a"])
    frame.loc[3, "x"] = np.nan
    drawn = mapview.build_map(frame, mapview.group_names(frame["label"].tolist()))
    assert drawn.total == drawn.shown == 9
    assert 4 not in set(_drawn_ids(drawn))


def test_many_groups_use_one_trace_with_a_colour_scale() -> None:
    frame = _frame(500, [f"class{i}" for i in range(100)])
    drawn = mapview.build_map(frame, mapview.group_names(frame["label"].tolist()))
    assert len(drawn.figure.data) == 1 and drawn.figure.data[0].marker.colorscale is not None


def test_read_selection_finds_items_by_customdata_or_position() -> None:
    trace_ids = [np.array([10, 11, 12]), np.array([20, 21]), np.zeros(0, np.int64)]
    click = {"points": [{"curve_number": 1, "point_index": 1, "customdata": 21}], "box": [], "lasso": []}
    assert mapview.read_selection(click, trace_ids) == mapview.Selection([21], False)
    no_custom = {"points": [{"curve_number": 0, "point_index": 2}], "box": [], "lasso": []}
    assert mapview.read_selection(no_custom, trace_ids).ids == [12]
    star = {"points": [{"curve_number": 2, "point_index": 0}], "box": [], "lasso": []}
    assert mapview.read_selection(star, trace_ids).ids == []
    box = {"points": [{"curve_number": 0, "point_index": 0, "customdata": [10]}], "box": [{"x": [0, 1]}]}
    assert mapview.read_selection(box, trace_ids) == mapview.Selection([10], True)
    assert mapview.read_selection(None, trace_ids) == mapview.Selection([], False)


def _cielab(colours: list[str]) -> np.ndarray:
    """CIELAB of "#rrggbb" colours through Pillow's colour management (L* 0-100)."""
    from PIL import Image, ImageCms

    strip = Image.new("RGB", (len(colours), 1))
    strip.putdata([tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colours])
    transform = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    out = np.asarray(ImageCms.applyTransform(strip, transform))[0]
    return np.column_stack([out[:, 0] * (100 / 255), out[:, 1:].view(np.int8)]).astype(float)


@pytest.mark.parametrize(("n", "apart"), [(10, 40.0), (20, 30.0), (26, 25.0), (mapview.MAX_LEGEND_GROUPS, 15.0)])
def test_the_first_class_colours_are_far_apart(n: int, apart: float) -> None:
    """Any k classes get k colours a person tells apart (CIE76 distance; about 2 is the least
    visible difference, 10+ clearly different), and none close to the background or to the grey
    of unlabelled points. Plotly's Dark24 + Light24 in order gave 33 at 10 classes and 6 at 26."""
    colours = mapview.PALETTE[:n]
    assert len(colours) == n and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    points = _cielab(colours)
    gaps = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(gaps, np.inf)
    assert gaps.min() >= apart, (gaps.min(), colours)
    background = _cielab(["#ffffff", mapview.NO_LABEL_COLOUR])
    assert np.linalg.norm(points[:, None] - background[None], axis=2).min() >= 15


def test_fourteen_classes_get_fourteen_palette_colours_and_the_map_fills_the_width() -> None:
    labels = [f"class {i}" for i in range(14)]
    drawn = mapview.build_map(_frame(140, labels), mapview.group_names((labels * 10)[:140]))
    colours = [trace.marker.color for trace in drawn.figure.data]
    assert len(colours) == 14 and colours == mapview.PALETTE[:14]
    layout = drawn.figure.layout
    assert layout.width is None and layout.autosize is True  # the chart's width is the page's
    assert layout.yaxis.scaleanchor is None  # the points spread over that width

