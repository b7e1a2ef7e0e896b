"""The query's small map: every point drawn, the star where the query's coordinates are."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.minimap import HEIGHT, STAR_COLOR, WIDTH, draw_background, with_star


def test_density_is_drawn_and_the_star_lands_on_its_coordinates() -> None:
    rng = np.random.default_rng(0)
    left = rng.normal((-10, 0), 1.0, (5000, 2))
    right = rng.normal((10, 0), 1.0, (50, 2))
    points = np.concatenate([left, right, [[np.nan, np.nan]]])
    minimap = draw_background(points[:, 0], points[:, 1])
    assert minimap.background.shape == (HEIGHT, WIDTH, 3)
    grey = minimap.background[..., 0].astype(int)
    # The dense cluster is darker than the sparse one, and both are drawn.
    lx, ly = map(int, minimap.pixel((-10, 0)))
    rx, ry = map(int, minimap.pixel((10, 0)))
    assert grey[ly - 3:ly + 4, lx - 3:lx + 4].min() < grey[ry - 3:ry + 4, rx - 3:rx + 4].min() < 255
    assert lx < WIDTH // 2 < rx
    png = Image.open(io.BytesIO(with_star(minimap, (10.0, 0.0)))).convert("RGB")
    assert png.getpixel((rx, ry)) == STAR_COLOR
    assert png.getpixel((lx, ly)) != STAR_COLOR


def test_an_empty_map_still_draws() -> None:
    minimap = draw_background([], [])
    assert with_star(minimap, (0.0, 0.0))[:4] == b"\x89PNG"
