"""FAISS recipes: choice by size and memory, recall of tuned approximate indexes, GPU choice and fallback.

The GPU tests run on CPU: they replace FAISS's GPU functions at the API boundary with fakes that
record what was asked of them, so the choice and fallback logic is checked on any machine.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer import ann
from indexer.dupes import duplicate_groups


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0, noise: float = 0.35) -> np.ndarray:
    """Vectors that behave like embeddings: unit vectors scattered around cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_choose_recipe_by_size_and_memory():
    assert ann.choose_recipe(1000, 512).factory == "Flat"
    assert ann.choose_recipe(ann.FLAT_MAX, 512).factory == "Flat"
    assert ann.choose_recipe(200_000, 512, memory_budget=16 << 30).factory == "IVF2048,Flat"
    big = ann.choose_recipe(1_000_000, 512, memory_budget=16 << 30)
    assert big.factory == "IVF16384_HNSW32,Flat"  # many small lists behind an HNSW quantizer
    assert ann.choose_recipe(1_000_000, 512, memory_budget=1 << 30).factory.endswith(",SQ8")
    assert "PQ" in ann.choose_recipe(1_000_000, 512, memory_budget=100 << 20).factory
    assert ann.choose_recipe(10, 64, "hnsw").factory == "HNSW32"
    assert ann.choose_recipe(10, 64, "ivf").factory.startswith("IVF")
    assert ann.choose_recipe(10, 64, "IVF64,SQ8").factory == "IVF64,SQ8"
    with pytest.raises(ValueError, match="FAISS factory"):
        ann.choose_recipe(10, 64, "nonsense")


def test_exact_recipe_equals_brute_force():
    x = clustered(3000)
    ids = np.arange(100, 3100, dtype=np.int64)
    index, recipe = ann.build_index(x, ids, ann.choose_recipe(len(x), 32), use_gpu=False)
    assert recipe.recall_at_10 == 1.0 and index.ntotal == 3000
    q = clustered(20, seed=9)
    sims, found = ann.Searcher(index, use_gpu=False).search(q, 10)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[want])
    np.testing.assert_allclose(sims, np.take_along_axis(q @ x.T, want, axis=1), atol=1e-5)


@pytest.mark.parametrize("spec", ["ivf", "hnsw"])
def test_approximate_recipes_meet_the_recall_bar_on_new_queries(spec):
    data = clustered(20_200)
    x, queries = data[:20_000], data[20_000:]  # queries: same distribution, not in the index
    ids = np.arange(len(x), dtype=np.int64) * 3
    recipe = ann.choose_recipe(len(x), 32, spec)
    index, recipe = ann.build_index(x, ids, recipe, use_gpu=False)
    assert recipe.recall_at_10 >= ann.RECALL_TARGET
    assert recipe.params and recipe.measured_queries > 0 and recipe.latency_p50_ms is not None
    assert index.ntotal == len(x)  # held-out queries are added after tuning
    _, found = ann.Searcher(index, recipe.params, use_gpu=False).search(queries, 10)
    _, truth = ann.exact_knn(queries, x, ids, 10)
    assert ann.recall_at(found, truth) >= 0.93


def test_update_in_place_remove_and_add():
    x = clustered(2000)
    ids = np.arange(len(x), dtype=np.int64)
    index, _ = ann.build_index(x, ids, ann.Recipe("flat", "Flat"), use_gpu=False)
    assert ann.remove_ids(index, ids[:10])
    ann.add_vectors(index, x[:3], np.array([5000, 5001, 5002]))
    _, found = index.search(x[:3], 1)
    assert found[:, 0].tolist() == [5000, 5001, 5002]
    hnsw, _ = ann.build_index(x, ids, ann.Recipe("hnsw", "HNSW32"), use_gpu=False)
    assert ann.remove_ids(hnsw, ids[:2]) is False  # the caller rebuilds


def test_save_and_load(tmp_path):
    x = clustered(500)
    index, _ = ann.build_index(x, np.arange(500), ann.Recipe("flat", "Flat"), use_gpu=False)
    ann.save_index(index, tmp_path / "i.faiss")
    again = ann.load_index(tmp_path / "i.faiss")
    np.testing.assert_array_equal(again.search(x[:5], 3)[1], index.search(x[:5], 3)[1])


def test_duplicate_groups_chain_through_range_and_knn_search():
    rng = np.random.default_rng(0)
    x = clustered(400, noise=2.0)
    x[10] = x[3] + 0.01 * rng.standard_normal(32)
    x[11] = x[10] + 0.01 * rng.standard_normal(32)
    x[200] = x[100]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1000, 1400, dtype=np.int64)
    for recipe in (ann.Recipe("flat", "Flat"), ann.Recipe("hnsw", "HNSW32")):  # HNSW: k-NN fallback
        index, recipe = ann.build_index(x, ids, recipe, use_gpu=False)
        groups = duplicate_groups(ann.Searcher(index, recipe.params, use_gpu=False), x, ids, 0.99)
        assert [1003, 1010, 1011] in groups and [1100, 1200] in groups and len(groups) == 2


# ----------------------------------------------------------------------------------------------
# GPU choice and fallback, at the FAISS API boundary
# ----------------------------------------------------------------------------------------------


class FakeGpuIndex:
    """Stands in for a GPU index: answers like the CPU index it wraps, records every call."""

    def __init__(self, cpu, calls: list[str], fail: bool = False) -> None:
        self.cpu, self.calls, self.fail = cpu, calls, fail

    def search(self, q, k):
        self.calls.append(f"gpu-search-{k}")
        if self.fail:
            raise RuntimeError("not supported on GPU")
        return self.cpu.search(q, k)


@pytest.fixture()
def fake_gpus(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: FakeGpuIndex(index, calls))

    class Space:
        def set_index_parameter(self, index, key, value):
            calls.append(f"gpu-param-{key}={value}")

    monkeypatch.setattr(faiss, "GpuParameterSpace", Space)
    return calls


def test_searcher_uses_the_gpu_and_falls_back_to_the_cpu(fake_gpus):
    x = clustered(3000)
    index, _ = ann.build_index(x, np.arange(3000), ann.Recipe("flat", "Flat"), use_gpu=False)
    searcher = ann.Searcher(index)
    assert searcher.gpu is not None and searcher.device_for(10) == "gpu"
    searcher.search(x[:2], 10)
    assert fake_gpus == ["gpu-search-10"]
    assert searcher.device_for(ann.GPU_MAX_K + 1) == "cpu"
    _, found = searcher.search(x[:1], ann.GPU_MAX_K + 1)  # large k: CPU copy
    assert found.shape == (1, ann.GPU_MAX_K + 1) and fake_gpus == ["gpu-search-10"]
    lims, _, _ = searcher.range_search(x[:2], 0.9)  # range search: CPU copy, never the GPU
    assert len(lims) == 3 and fake_gpus == ["gpu-search-10"]
    searcher.gpu.fail = True  # anything the GPU refuses is answered by the CPU
    assert searcher.search(x[:1], 5)[1][0, 0] == 0
    assert ann.Searcher(index, use_gpu=False).gpu is None


def test_ivf_trains_on_gpu_copy_and_params_reach_it(fake_gpus, monkeypatch):
    trained: list[str] = []

    class Trainer(FakeGpuIndex):
        def train(self, sample):
            trained.append(f"train-{len(sample)}")
            self.cpu.train(sample)

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: Trainer(index, fake_gpus))
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda gpu: gpu.cpu)
    x = clustered(5000)
    index, recipe = ann.build_index(x, np.arange(5000), ann.Recipe("ivf", "IVF64,Flat"))
    assert trained and index.is_trained and index.ntotal == 5000
    ann.Searcher(index, recipe.params)
    assert f"gpu-param-nprobe={recipe.params['nprobe']}" in fake_gpus


def test_unsupported_index_stays_on_cpu(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)

    def refuse(index):
        raise RuntimeError("HNSW is not supported on GPU")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse)
    x = clustered(500)
    index, _ = ann.build_index(x, np.arange(500), ann.Recipe("hnsw", "HNSW32"))
    assert ann.Searcher(index).gpu is None and ann.to_gpu(index) is None
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert ann.gpu_count() == 0


def uniform_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_falls_back_to_exact_search_when_tuning_misses_the_recall(monkeypatch):
    """A coarse 4-bit PQ cannot reach recall@10 0.95 on structureless vectors at any nprobe:
    ``auto`` then answers exactly, and says why; an explicit recipe is kept as asked."""
    x = uniform_unit(4000, 32)
    ids = np.arange(10, 4010, dtype=np.int64)
    monkeypatch.setattr(ann, "choose_recipe", lambda n, dim, spec="auto", memory_budget=None:
                        ann.Recipe("ivf-pq", "IVF16,PQ4x4") if spec == "auto" else ann.Recipe("custom", spec))
    index, recipe = ann.build_recipe(x, ids, "auto", use_gpu=False)
    assert recipe.exact and recipe.recall_at_10 == 1.0
    assert "IVF16,PQ4x4" in recipe.note and "recall@10 0." in recipe.note
    _, found = index.search(x[:5], 1)
    assert found[:, 0].tolist() == ids[:5].tolist()  # exact: every vector finds itself

    index, recipe = ann.build_recipe(x, ids, "IVF16,PQ4x4", use_gpu=False)
    assert not recipe.exact and recipe.recall_at_10 < ann.RECALL_TARGET and recipe.note == ""

    _, recipe = ann.build_recipe(x, ids, "auto", use_gpu=False, memory_budget=1000)
    assert not recipe.exact and "would not fit in memory" in recipe.note
