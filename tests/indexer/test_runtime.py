"""indexer.runtime: the one ONNX Runtime set-up that both the indexer and export verification use."""

from __future__ import annotations

import os

import numpy as np
import pytest

from indexer import runtime
from indexer.embed import EmbeddingModel, ModelError

from .conftest import IMAGE_SIZE, make_model

SPIN = "session.intra_op.allow_spinning"


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def test_providers_for_each_device():
    assert runtime.usable_providers()[-1] == runtime.CPU
    assert runtime.providers_for("cpu") == [runtime.CPU]
    auto = runtime.providers_for("auto")
    assert auto[-1] == runtime.CPU and auto[0] == runtime.usable_providers()[0]
    with pytest.raises(runtime.RuntimeUnavailable, match="--device must be one of auto, cpu, cuda"):
        runtime.providers_for("tpu")


def test_cuda_is_asked_for_only_where_it_works():
    if runtime.CUDA in runtime.usable_providers():
        assert runtime.providers_for("cuda") == [runtime.CUDA, runtime.CPU]
    else:
        with pytest.raises(runtime.RuntimeUnavailable, match="cannot use CUDA"):
            runtime.providers_for("cuda")


def test_physical_cores_counts_each_core_once():
    cores = runtime.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


def test_session_options(monkeypatch):
    monkeypatch.delenv(runtime.SPIN_ENV, raising=False)
    options = runtime.session_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert runtime.session_options().intra_op_num_threads == runtime.physical_cores()
    assert options.get_session_config_entry(SPIN) == "0"  # idle threads must not burn the decoders' cores
    assert runtime.session_options(spin=True).get_session_config_entry(SPIN) == "1"
    monkeypatch.setenv(runtime.SPIN_ENV, "1")
    assert runtime.session_options().get_session_config_entry(SPIN) == "1"
    assert runtime.session_options(spin=False).get_session_config_entry(SPIN) == "0"


def test_batched_runs_match_one_run(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    from_file = runtime.make_session(path, "cpu", threads=1)
    from_bytes = runtime.make_session(path.read_bytes(), "cpu", threads=1)
    batch = images(7)
    whole = runtime.embed(from_file, batch, batch_size=7)
    assert whole.shape == (7, 16) and whole.dtype == np.float32
    np.testing.assert_allclose(runtime.embed(from_bytes, batch, batch_size=3), whole, rtol=1e-6, atol=1e-6)
    assert from_file.get_providers() == [runtime.CPU]


def test_the_indexer_runs_a_model_on_the_same_session_as_export_checks(tmp_path):
    """What export verification measured is what the indexer will compute: same providers and
    options, so the same numbers to the last bit."""
    path = make_model(tmp_path / "m.onnx")
    model = EmbeddingModel(path, device="cpu", threads=2)
    session = runtime.make_session(path, "cpu", threads=2)
    assert model.providers == session.get_providers()
    batch = images(5, seed=1)
    assert np.array_equal(model.embed(batch), runtime.embed(session, batch))


def test_the_indexer_words_a_device_error_as_a_model_error(tmp_path):
    path = make_model(tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="--device must be one of"):
        EmbeddingModel(path, device="tpu")
    if runtime.CUDA not in runtime.usable_providers():
        with pytest.raises(ModelError, match="cannot use CUDA"):
            EmbeddingModel(path, device="cuda")


def test_describe_providers_names_what_works_here():
    line = runtime.describe_providers([runtime.CPU])
    assert "usable here: " in line and runtime.CPU in line and line.endswith(f"in use: {runtime.CPU}")
    assert "\n" not in line
