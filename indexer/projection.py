"""The 2-D map of a collection: PCA, then t-SNE (openTSNE) fitted on a sample, others placed into it.

Why fit on a sample: t-SNE costs minutes per 100k points on two cores and the map only needs
its shape from a representative subset. The remaining items, and items added later by
``update``, are placed without moving the map: each new point goes to the similarity-weighted
mean of its nearest fitted points in PCA space (the initialisation openTSNE itself uses for
``transform``), so the app's map stays stable from one update to the next. Everything needed
to place new points (PCA basis, the sample's PCA features and 2-D coordinates) is stored in
one ``.npz`` file, with no pickles.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.files import atomic_write_bytes
from indexer.npy import reading_headers

__all__ = ["FIT_MAX", "Projection", "fit_projection"]

FIT_MAX = 5_000
"""Points the t-SNE is fitted on (about 20 s on two cores); the rest are placed into the map."""

PCA_DIMS = 50
NEIGHBOURS = 10


@dataclass
class Projection:
    """A fitted map: PCA basis, anchor points (PCA features + 2-D coordinates), item coordinates."""

    mean: npt.NDArray[np.float32]
    components: npt.NDArray[np.float32]  # [p, D]
    anchor_features: npt.NDArray[np.float32]  # [m, p]
    anchor_coords: npt.NDArray[np.float32]  # [m, 2]
    ids: npt.NDArray[np.int64]
    coords: npt.NDArray[np.float32]  # [n, 2], row i for ids[i]

    def reduce(self, vectors: npt.ArrayLike) -> npt.NDArray[np.float32]:
        x = np.asarray(vectors, dtype=np.float32)
        return ((x - self.mean) @ self.components.T).astype(np.float32)

    def place(self, vectors: npt.ArrayLike, *, chunk: int = 8192) -> npt.NDArray[np.float32]:
        """2-D positions for new vectors, without moving the existing map."""
        x = np.asarray(vectors, dtype=np.float32)
        out = np.zeros((len(x), 2), dtype=np.float32)
        if not len(x):
            return out
        if len(self.anchor_features) == 0:
            return out
        k = min(NEIGHBOURS, len(self.anchor_features))
        for start in range(0, len(x), chunk):
            z = self.reduce(x[start:start + chunk])
            d2 = (np.sum(z**2, axis=1)[:, None] - 2 * z @ self.anchor_features.T
                  + np.sum(self.anchor_features**2, axis=1)[None, :])
            nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
            dist = np.sqrt(np.maximum(np.take_along_axis(d2, nearest, axis=1), 0.0))
            weights = 1.0 / (dist + 1e-6)
            weights /= weights.sum(axis=1, keepdims=True)
            out[start:start + len(z)] = np.einsum("nk,nkc->nc", weights, self.anchor_coords[nearest])
        return out

    def extend(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> Projection:
        """A projection with ``ids`` placed and added (update)."""
        ids = np.asarray(ids, dtype=np.int64)
        coords = self.place(vectors)
        return Projection(self.mean, self.components, self.anchor_features, self.anchor_coords,
                          np.concatenate([self.ids, ids]), np.concatenate([self.coords, coords]))

    def keep(self, ids: npt.ArrayLike) -> Projection:
        """A projection restricted to ``ids`` (items removed by an update are dropped)."""
        mask = np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        return Projection(self.mean, self.components, self.anchor_features, self.anchor_coords,
                          self.ids[mask], self.coords[mask])

    def coords_for(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Coordinates in the order of ``ids`` (NaN for unknown ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids)
        pos = np.searchsorted(self.ids, ids, sorter=order)
        pos = np.clip(pos, 0, max(0, len(order) - 1))
        out = np.full((len(ids), 2), np.nan, dtype=np.float32)
        if len(order):
            found = self.ids[order[pos]] == ids
            out[found] = self.coords[order[pos[found]]]
        return out

    def save(self, path: Path) -> None:
        """Write the map as one ``.npz`` (no pickles), atomically and fsynced, so a manifest that
        names it never points at a half-written file."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, anchor_features=self.anchor_features,
                 anchor_coords=self.anchor_coords, ids=self.ids, coords=self.coords)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, dim: int | None = None) -> Projection:
        """Read a map written by :meth:`save`, checking that its parts fit together (and, given
        ``dim``, the collection's vectors): a damaged file raises ``ValueError`` naming the
        problem instead of a shape error at the first ``place``."""
        names = [f.name for f in fields(cls)]
        with reading_headers(), np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("is a single array, not a map (.npz)")
            missing = [name for name in names if name not in data.files]
            if missing:
                raise ValueError(f"lacks {', '.join(missing)}")
            proj = cls(**{name: data[name] for name in names})
        d = proj.mean.shape[0] if proj.mean.ndim == 1 else -1
        p = proj.components.shape[0] if proj.components.ndim == 2 else -1
        m = len(proj.anchor_coords)
        checks = [
            (d >= 1 and proj.components.shape == (p, d),
             f"PCA basis {proj.components.shape} for mean {proj.mean.shape}"),
            (dim is None or d == dim, f"made for {d}-d vectors, the collection has {dim}"),
            (proj.anchor_features.shape == (m, p),
             f"anchor features {proj.anchor_features.shape}, expected ({m}, {p})"),
            (proj.anchor_coords.shape == (m, 2), f"anchor coordinates {proj.anchor_coords.shape}"),
            (proj.ids.ndim == 1 and proj.ids.dtype.kind in "iu", f"ids {proj.ids.dtype} {proj.ids.shape}"),
            (proj.coords.shape == (len(proj.ids), 2), f"{proj.coords.shape} coordinates for {len(proj.ids)} ids"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"inconsistent map: {problem}")
        return proj


def fit_projection(
    ids: npt.ArrayLike,
    vectors: npt.NDArray[np.float32],
    *,
    fit_max: int = FIT_MAX,
    seed: int = 0,
    n_jobs: int = 1,
) -> Projection:
    """Fit PCA + t-SNE on up to ``fit_max`` random rows of ``vectors`` and place all the others."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    dim = vectors.shape[1]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(n)[: min(n, fit_max)])
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    mean = sample.mean(axis=0) if len(sample) else np.zeros(dim, dtype=np.float32)
    centred = sample - mean
    p = max(1, min(PCA_DIMS, dim, max(1, len(sample) - 1)))
    if len(sample) >= 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:p].astype(np.float32)
    else:
        components = np.eye(p, dim, dtype=np.float32)
    features = (centred @ components.T).astype(np.float32)
    if len(sample) > 10:
        from openTSNE import TSNE

        tsne = TSNE(perplexity=min(30.0, (len(sample) - 1) / 3.0), n_jobs=n_jobs, random_state=seed,
                    initialization="pca", verbose=False)
        anchor = np.asarray(tsne.fit(features), dtype=np.float32)
    else:  # too few points for t-SNE: the first two principal components are the map
        anchor = np.zeros((len(sample), 2), dtype=np.float32)
        anchor[:, : min(2, p)] = features[:, : min(2, p)]
    proj = Projection(mean.astype(np.float32), components, features, anchor, ids[rows], anchor)
    rest = np.setdiff1d(np.arange(n), rows)
    coords = [anchor]
    for start in range(0, len(rest), 65_536):  # streamed: vectors may be a memmap larger than RAM
        coords.append(proj.place(vectors[rest[start:start + 65_536]]))
    order = np.concatenate([rows, rest])
    return Projection(proj.mean, components, features, anchor, ids[order], np.concatenate(coords))
