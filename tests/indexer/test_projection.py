"""The 2-D map: t-SNE on a sample, the rest and later items placed without moving the map."""

from __future__ import annotations

import numpy as np

from indexer.projection import Projection, fit_projection

from .test_ann import clustered


def test_fit_on_a_sample_and_place_the_rest(tmp_path):
    x = clustered(600, clusters=4, noise=0.2)
    ids = np.arange(600, dtype=np.int64) + 7
    proj = fit_projection(ids, x, fit_max=200)
    assert len(proj.anchor_coords) == 200 and proj.coords.shape == (600, 2)
    coords = proj.coords_for(ids)
    assert np.isfinite(coords).all()
    # a new point identical to an indexed one lands next to it
    placed = proj.place(x[:5])
    spread = np.ptp(coords, axis=0).max()
    assert np.abs(placed - coords[:5]).max() < 0.1 * spread
    proj.save(tmp_path / "p.npz")
    again = Projection.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(again.coords_for(ids), coords)
    grown = again.extend([1000], x[:1]).keep(np.append(ids[1:], 1000))
    assert len(grown.ids) == 600 and np.isnan(grown.coords_for([ids[0]])).all()
    np.testing.assert_array_equal(grown.coords_for(ids[1:]), coords[1:])  # the map did not move


def test_tiny_collections_get_a_pca_map():
    x = clustered(4)
    proj = fit_projection(np.arange(4), x)
    assert proj.coords.shape == (4, 2) and np.isfinite(proj.coords).all()
