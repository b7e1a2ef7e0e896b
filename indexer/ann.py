"""FAISS recipes: choose, train, tune, save and search an id-mapped inner-product index.

Embeddings are L2-normalised, so inner product is cosine similarity. ``auto`` chooses by size
and memory (see :func:`choose_recipe`): exact search while it is fast enough, then an IVF
index trained on a sample, whose ``nprobe`` (or an HNSW ``efSearch``) is the smallest value
reaching recall@10 >= :data:`RECALL_TARGET` against exact search on held-out queries. The
measured recall and latency go into the manifest, so ``info`` and the app show what a user
actually gets rather than what a recipe promises.

GPU: when FAISS sees GPUs, training, adding and searching run there (all GPUs), and the CPU
index stays the master copy that files are written from; what GPUs cannot do (k above 2048,
removals, range search, HNSW) runs on the CPU copy. That branch is a few functions at the
FAISS API boundary (:func:`gpu_count`, :func:`to_gpu`, :class:`Searcher`), tested on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from indexer.files import fsync_file

__all__ = [
    "FLAT_MAX",
    "GPU_MAX_K",
    "RECALL_TARGET",
    "Recipe",
    "Searcher",
    "build_index",
    "build_recipe",
    "choose_recipe",
    "describe_recipe",
    "exact_knn",
    "gpu_count",
    "load_index",
    "save_index",
]

FLAT_MAX = 20_000
"""Largest collection (at D=512; scaled by 512/D for other widths) searched exactly by ``auto``.
Measured on 2 CPU cores (BENCHMARKS.md, bench/index_search.py): one exact query scans memory at ~10 GB/s,
9-10 ms at 50k and 18 ms at 100k vectors of 512 floats, so 20k (~4 ms) is what fits the 5 ms
budget; beyond it IVF answers in under 1 ms at recall@10 >= 0.95."""

RECALL_TARGET = 0.95
GPU_MAX_K = 2048
"""FAISS GPU indexes refuse k (and nprobe) above 2048; such searches run on the CPU copy."""

HELD_OUT_QUERIES = 256
ADD_CHUNK = 65_536


@dataclass
class Recipe:
    """An index recipe: a name for people, a FAISS factory string, search parameters, measures."""

    name: str
    factory: str
    params: dict[str, int] = field(default_factory=dict)
    recall_at_10: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    measured_queries: int = 0
    train_size: int = 0
    build_seconds: float = 0.0
    note: str = ""  # why the recipe is what it is, when ``auto`` had to change its first choice

    @property
    def exact(self) -> bool:
        return self.factory in ("Flat", "IDMap2,Flat")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def describe_recipe(recipe: dict[str, Any]) -> str:
    """One line for people from a recipe as the manifest stores it (:meth:`Recipe.to_json`): what
    was built and what it measured, for ``info``, the build summary and the app."""
    params = ", ".join(f"{k}={v}" for k, v in (recipe.get("params") or {}).items())
    recall = recipe.get("recall_at_10")
    text = f"{recipe.get('name')} ({recipe.get('factory')}{'; ' + params if params else ''})"
    if recall is not None:
        text += f", recall@10 {recall:.3f}"
        if recipe.get("measured_queries"):
            text += f" on {recipe['measured_queries']} held-out queries"
    if recipe.get("latency_p50_ms") is not None and recipe.get("latency_p99_ms") is not None:
        text += f", p50 {recipe['latency_p50_ms']:.2f} ms / p99 {recipe['latency_p99_ms']:.2f} ms per query"
    if recipe.get("note"):
        text += f" ({recipe['note']})"
    return text


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable), or 8 GiB where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


HNSW_QUANTIZER_MIN = 500_000
"""From this many vectors IVF gets 16 sqrt(n) lists (4x more) behind an HNSW coarse quantizer.
Measured at 1M embeddings (BENCHMARKS.md, bench/index_search.py): ``IVF4096,Flat`` p50 6.9 ms,
because real collections fill lists unevenly and nprobe 12 then scans ~43k vectors;
``IVF16384_HNSW32,Flat`` p50 4.3 ms at the same recall (0.979), the HNSW finding the nearest of
16k centroids in well under a millisecond where a flat scan of them would cost ~1 ms."""

TRAIN_PER_LIST = 40
"""k-means points per list (FAISS warns below 39) for ordinary IVF."""
TRAIN_PER_LIST_HNSW = 10
"""Fewer for the 16k+ lists of large collections: 40 per list would be 655k points and ~15 min
of k-means on two cores; 10 per list gave the measured 1M recall above (nprobe is tuned after)."""


def ivf_nlist(n: int) -> int:
    """Number of IVF lists: the power of two nearest 4 * sqrt(n) (16 * sqrt(n) from
    :data:`HNSW_QUANTIZER_MIN` vectors), between 16 and 65536, and small enough that k-means
    sees at least 39 points per list (FAISS's own minimum)."""
    factor = 16 if n >= HNSW_QUANTIZER_MIN else 4
    nlist = 2 ** round(math.log2(max(1.0, factor * math.sqrt(n))))
    while nlist > 16 and nlist * 40 > n:
        nlist //= 2
    return int(min(65536, max(16, nlist)))


def ivf_prefix(n: int) -> str:
    """``IVF<nlist>`` or, for large collections, ``IVF<nlist>_HNSW32`` (HNSW coarse quantizer)."""
    nlist = ivf_nlist(n)
    return f"IVF{nlist}_HNSW32" if n >= HNSW_QUANTIZER_MIN else f"IVF{nlist}"


def choose_recipe(n: int, dim: int, spec: str = "auto", *, memory_budget: int | None = None) -> Recipe:
    """Turn ``--index`` (auto, flat, hnsw, ivf or a FAISS factory string) into a recipe.

    ``auto``: exact (``Flat``) up to :data:`FLAT_MAX` vectors (at D=512), else IVF with 4*sqrt(n) lists
    (16*sqrt(n) behind an HNSW quantizer from :data:`HNSW_QUANTIZER_MIN`),
    storing full vectors when they fit in ``memory_budget`` (default: half the available RAM),
    8-bit scalar-quantised ones when a quarter of that fits, else OPQ + PQ (16x smaller).
    """
    spec = spec.strip()
    if spec == "flat":
        return Recipe("flat", "Flat")
    if spec == "hnsw":
        return Recipe("hnsw", "HNSW32")
    budget = available_memory() // 2 if memory_budget is None else memory_budget
    if spec in ("auto", "ivf"):
        if spec == "auto" and n * dim <= FLAT_MAX * 512:
            return Recipe("flat", "Flat")
        ivf = ivf_prefix(n)
        if n * dim * 4 <= budget:
            return Recipe("ivf", f"{ivf},Flat")
        if n * dim <= budget:
            return Recipe("ivf-sq8", f"{ivf},SQ8")
        m = max(4, dim // 16)
        while dim % m:
            m -= 1
        return Recipe("ivf-opq-pq", f"OPQ{m},{ivf},PQ{m}")
    try:  # a FAISS factory string given as is: check it parses now, not after embedding
        faiss.index_factory(max(dim, 8), spec, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ message
        raise ValueError(f"--index {spec!r} is neither auto, flat, hnsw, ivf nor a FAISS factory "
                         f"string FAISS accepts ({str(exc).splitlines()[0][:120]})") from None
    return Recipe("custom", spec)


def _new_index(dim: int, factory: str) -> faiss.Index:
    """The index for a factory string, id-mapped (IVF maps ids itself; others get IndexIDMap2)."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)
    return index


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply search parameters (nprobe, efSearch) through any wrapper (IDMap, pre-transform)."""
    if not params:
        return
    space = faiss.ParameterSpace()
    for key, value in params.items():
        space.set_index_parameter(index, key, int(value))


def tunable(index: faiss.Index) -> tuple[str, list[int]] | None:
    """The one search parameter worth tuning for ``index`` and its candidate values."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        values = [v for v in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
                  if v <= ivf.nlist]
        return "nprobe", values or [1]
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]
    return None


def exact_knn(queries: npt.NDArray[np.float32], vectors: npt.NDArray[np.float32],
              ids: npt.NDArray[np.int64], k: int, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over (possibly memory-mapped) ``vectors``, chunk by chunk."""
    k = min(k, len(vectors))
    best_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        kk = min(k, len(block))
        d, i = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), block, kk, metric=faiss.METRIC_INNER_PRODUCT)
        i = np.asarray(ids[start:start + chunk])[i]
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, i], axis=1)
        order = np.argsort(-all_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(all_d, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_d, best_i


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth))
    denom = sum(len(set(t[:k].tolist()) - {-1}) for t in truth)
    return hits / denom if denom else 1.0


def _latencies_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Single-query latency (one query per call, as the app searches) in milliseconds."""
    out = []
    if len(queries):
        index.search(queries[:1], k)  # warm-up: the first call pays for thread start-up
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        out.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(out)


def build_index(
    vectors: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    recipe: Recipe,
    *,
    seed: int = 0,
    train_size: int | None = None,
    recall_target: float = RECALL_TARGET,
    use_gpu: bool = True,
) -> tuple[faiss.Index, Recipe]:
    """Train (on a sample), fill and tune an index over ``vectors`` (rows may be a memmap).

    Queries held out from the index measure recall@10 against exact search; the smallest
    nprobe/efSearch meeting ``recall_target`` is kept (or the largest tried, with its recall,
    when none does). Returns the CPU index and the recipe with its measurements filled in.
    """
    t_start = time.perf_counter()
    n, dim = vectors.shape
    ids = np.asarray(ids, dtype=np.int64)
    index = _new_index(dim, recipe.factory)
    rng = np.random.default_rng(seed)
    exact = recipe.exact
    n_held = 0 if exact or n < 50 else min(HELD_OUT_QUERIES, max(10, n // 20))
    perm = rng.permutation(n)
    held = np.sort(perm[:n_held])
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[held] = False
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        # 40 points per list (FAISS warns below 39) and 10 k-means iterations: centroids good
        # enough for recall (nprobe is tuned afterwards anyway) at a fraction of the training cost.
        per_list = TRAIN_PER_LIST_HNSW if "_HNSW" in recipe.factory else TRAIN_PER_LIST
        default_train = per_list * ivf.nlist if ivf is not None else 100_000
        if ivf is not None:
            ivf.cp.niter = 10
        size = min(n - n_held, train_size or max(default_train, 10_000))
        rows = np.sort(perm[n_held:n_held + size])
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        if ivf is not None and len(sample) < ivf.nlist:
            raise ValueError(f"index {recipe.factory!r} needs at least {ivf.nlist} vectors to train, "
                             f"got {len(sample)}; use --index flat or fewer lists")
        work = to_gpu(index) if use_gpu else None
        (work or index).train(sample)
        if work is not None:
            index = faiss.index_gpu_to_cpu(work)
        recipe.train_size = len(sample)
    _add(index, vectors, ids, keep_mask, use_gpu=use_gpu)
    if n_held:
        queries = np.ascontiguousarray(vectors[held], dtype=np.float32)
        kept_rows = np.flatnonzero(keep_mask)
        _, truth = exact_knn(queries, _Rows(vectors, kept_rows), ids[kept_rows], 10)
        found_param = tunable(index)
        if found_param is not None:
            key, values = found_param
            best = values[-1]
            for value in values:
                set_params(index, {key: value})
                _, found = index.search(queries, 10)
                recall = recall_at(found, truth)
                if recall >= recall_target:
                    best = value
                    break
            set_params(index, {key: best})
            recipe.params = {key: best}
        _, found = index.search(queries, 10)
        recipe.recall_at_10 = round(recall_at(found, truth), 4)
        lat = _latencies_ms(index, queries[:200])
        index.add_with_ids(queries, ids[held])
    else:
        recipe.recall_at_10 = 1.0 if exact else None
        probe = np.ascontiguousarray(vectors[perm[: min(100, n)]], dtype=np.float32)
        lat = _latencies_ms(index, probe) if len(probe) else np.zeros(1)
    recipe.measured_queries = int(n_held)
    recipe.latency_p50_ms = round(float(np.percentile(lat, 50)), 3)
    recipe.latency_p99_ms = round(float(np.percentile(lat, 99)), 3)
    recipe.build_seconds = round(time.perf_counter() - t_start, 2)
    return index, recipe


def build_recipe(
    vectors: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    spec: str = "auto",
    *,
    use_gpu: bool = True,
    memory_budget: int | None = None,
) -> tuple[faiss.Index, Recipe]:
    """Build the index ``--index spec`` asks for. With ``auto``, an approximate index whose
    tuning could not reach :data:`RECALL_TARGET` (data without structure for IVF, or a
    quantised recipe) is replaced by exact search when the vectors fit in memory: ``auto``
    promises recall, and exact search keeps that promise at a known cost. The recipe's
    ``note`` says what happened, so ``info`` and the app can tell the user."""
    n, dim = vectors.shape
    recipe = choose_recipe(n, dim, spec, memory_budget=memory_budget)
    index, recipe = build_index(vectors, ids, recipe, use_gpu=use_gpu)
    missed = recipe.recall_at_10 is not None and recipe.recall_at_10 < RECALL_TARGET
    if spec != "auto" or recipe.exact or not missed:
        return index, recipe
    budget = available_memory() // 2 if memory_budget is None else memory_budget
    if n * dim * 4 > budget:
        recipe.note = (f"recall@10 {recipe.recall_at_10:.3f} is below {RECALL_TARGET} at the largest "
                       f"{'/'.join(recipe.params)} tried, and exact search would not fit in memory")
        return index, recipe
    first = f"{recipe.factory} {', '.join(f'{k}={v}' for k, v in recipe.params.items())}".strip()
    exact_index, exact = build_index(vectors, ids, Recipe("flat", "Flat"), use_gpu=use_gpu)
    exact.note = (f"exact search: {first} reached only recall@10 {recipe.recall_at_10:.3f} "
                  f"(target {RECALL_TARGET}) on these vectors")
    return exact_index, exact


class _Rows:
    """A lazy row selection of a (memory-mapped) matrix, sliced chunk by chunk by exact_knn."""

    def __init__(self, matrix: npt.NDArray[np.float32], rows: npt.NDArray[np.int64]) -> None:
        self.matrix, self.rows = matrix, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: slice) -> np.ndarray:
        return self.matrix[self.rows[item]]


def _add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, mask: np.ndarray, *, use_gpu: bool) -> None:
    """Add the rows where ``mask`` is set, chunk by chunk (vectors may be far larger than RAM)."""
    for start in range(0, len(vectors), ADD_CHUNK):
        sel = np.flatnonzero(mask[start:start + ADD_CHUNK]) + start
        if len(sel):
            index.add_with_ids(np.ascontiguousarray(vectors[sel], dtype=np.float32), ids[sel])


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add new items to an existing index (update)."""
    if len(ids):
        _add(index, vectors, np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool), use_gpu=False)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> bool:
    """Remove items; False when the index type cannot (HNSW): the caller rebuilds it then."""
    if not len(ids):
        return True
    try:
        index.remove_ids(np.asarray(ids, dtype=np.int64))
    except RuntimeError:
        return False
    return True


def save_index(index: faiss.Index, path: Path) -> None:
    """Write a CPU index (never a GPU one: GPU indexes cannot be serialised) and fsync it."""
    faiss.write_index(index, str(path))
    fsync_file(path)


def load_index(path: Path) -> faiss.Index:
    """Read an index written by :func:`save_index` (raises FAISS's RuntimeError when it cannot)."""
    return faiss.read_index(str(path))


# --------------------------------------------------------------------------------------------
# GPU boundary
# --------------------------------------------------------------------------------------------


def gpu_count() -> int:
    """GPUs FAISS can use (0 for CPU-only builds, which lack the function or return 0)."""
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A copy of ``index`` spread over all GPUs, or None when there are none or the type is not
    supported on GPU (HNSW, some transforms): the caller then stays on the CPU."""
    if gpu_count() < 1:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return None


class Searcher:
    """Search an index on GPUs when possible, falling back to the CPU master copy.

    Large k, range search and anything the GPU copy rejects run on the CPU; the CPU copy is
    also what is saved and updated, so the GPU copy is a disposable accelerator.
    """

    def __init__(self, index: faiss.Index, params: dict[str, int] | None = None, *, use_gpu: bool = True) -> None:
        self.cpu = index
        self.params = dict(params or {})
        set_params(self.cpu, self.params)
        self.gpu = to_gpu(index) if use_gpu else None
        if self.gpu is not None and self.params:
            try:
                space = faiss.GpuParameterSpace()
                for key, value in self.params.items():
                    space.set_index_parameter(self.gpu, key, int(value))
            except (RuntimeError, AttributeError):
                self.gpu = None

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    def device_for(self, k: int) -> str:
        """Where a k-NN search of this k runs: 'gpu' or 'cpu'."""
        return "gpu" if self.gpu is not None and k <= GPU_MAX_K else "cpu"

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, ids) for each query row; ids are -1 where fewer exist."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        k = max(1, min(int(k), max(1, self.ntotal)))
        if self.device_for(k) == "gpu":
            try:
                return self.gpu.search(q, k)
            except RuntimeError:
                pass  # anything the GPU refuses is answered by the CPU copy
        return self.cpu.search(q, k)

    def range_search(self, queries: npt.ArrayLike, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lims, sims, ids) of every indexed item with similarity > threshold; CPU only."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        return self.cpu.range_search(q, float(threshold))
