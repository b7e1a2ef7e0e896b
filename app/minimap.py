"""The small map beside a query: where the query lives among all the collection's points.

A picture, not a chart: the density of all points is drawn once per collection generation into
a few kB of pixels and only the query's star is added per query. A WebGL chart here cost about
0.35 s of every upload in a browser without a GPU (measured with bench/app_latency.py); this
costs milliseconds and shows every point, not a sample.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

WIDTH, HEIGHT, PAD = 440, 240, 10
STAR_RADIUS = 9
STAR_COLOR = (228, 87, 46)


@dataclass(frozen=True)
class MiniMap:
    """The drawn background and the affine map from 2-D coordinates to its pixels."""

    background: npt.NDArray[np.uint8]  # H x W x 3
    origin: tuple[float, float]  # data coordinates of the left and bottom edges (inside the padding)
    scale: float  # pixels per data unit (one scale for both axes keeps the map's shape)

    def pixel(self, xy: tuple[float, float]) -> tuple[float, float]:
        px = PAD + (xy[0] - self.origin[0]) * self.scale
        py = HEIGHT - PAD - (xy[1] - self.origin[1]) * self.scale
        return float(np.clip(px, 0, WIDTH - 1)), float(np.clip(py, 0, HEIGHT - 1))


def draw_background(x: npt.ArrayLike, y: npt.ArrayLike) -> MiniMap:
    """Point density as grey levels (darker where more points land), all points included."""
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    canvas = np.full((HEIGHT, WIDTH), 255.0)
    if not len(xs):
        return MiniMap(np.repeat(canvas.astype(np.uint8)[..., None], 3, axis=2), (0.0, 0.0), 1.0)
    span_x, span_y = max(np.ptp(xs), 1e-9), max(np.ptp(ys), 1e-9)
    scale = min((WIDTH - 2 * PAD) / span_x, (HEIGHT - 2 * PAD) / span_y)
    origin_x = xs.min() - ((WIDTH - 2 * PAD) / scale - span_x) / 2  # centre the map
    origin_y = ys.min() - ((HEIGHT - 2 * PAD) / scale - span_y) / 2
    cols = np.clip((PAD + (xs - origin_x) * scale).astype(int), 0, WIDTH - 2)
    rows = np.clip((HEIGHT - PAD - (ys - origin_y) * scale).astype(int), 0, HEIGHT - 2)
    counts = np.zeros((HEIGHT, WIDTH))
    for dr in (0, 1):  # 2 x 2 pixel dots
        for dc in (0, 1):
            np.add.at(counts, (rows + dr, cols + dc), 1.0)
    darkness = np.log1p(counts) / np.log1p(max(counts.max(), 1.0))
    canvas -= 40 + 140 * darkness
    canvas[counts == 0] = 255
    rgb = np.repeat(canvas.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return MiniMap(rgb, (float(origin_x), float(origin_y)), float(scale))


def with_star(minimap: MiniMap, xy: tuple[float, float]) -> bytes:
    """The background with a five-pointed star at ``xy``, as PNG bytes."""
    image = Image.fromarray(minimap.background)
    cx, cy = minimap.pixel(xy)
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, STAR_RADIUS, STAR_RADIUS * 0.45)
    points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    ImageDraw.Draw(image).polygon(points, fill=STAR_COLOR, outline=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()
