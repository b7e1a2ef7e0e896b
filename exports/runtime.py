"""ONNX Runtime sessions for verification and benchmarks: providers, threads, batched runs.

Torch-free on purpose: `python -m exports info` and the benchmark's ONNX side use it without
paying for a PyTorch import.

Why the provider probe: the `onnxruntime-gpu` wheel lists CUDAExecutionProvider (and
TensorRT) in `get_available_providers()` on every machine, GPU or not; asking for it where
CUDA cannot load silently falls back to the CPU after printing a page of red log lines. So
"auto" means: create a one-node session with CUDA and keep CUDA only if ONNX Runtime really
kept it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_QUIET = 4  # ORT logger severity "fatal": silences the provider-probe noise
_DEFAULT_SEVERITY = 2  # ORT's own default ("warning")


class RuntimeUnavailable(ValueError):
    """The device asked for cannot be used here; the message is one line for the user."""


def physical_cores() -> int:
    """Physical cores this process may run on (ORT's intra-op threads are best at one per core:
    a second thread on an SMT sibling competes for the same FMA units and usually slows GEMMs).
    """
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
        per_core = _count_cpu_list(siblings)
    except OSError:
        per_core = 1
    return max(1, logical // max(1, per_core))


def _count_cpu_list(text: str) -> int:
    """Count the CPUs in a Linux cpu list such as '0,64' or '0-1'."""
    count = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi) - int(lo) + 1 if hi else 1
    return count


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """Execution providers that actually work on this machine, best first (CUDA, then CPU).

    TensorRT is never chosen automatically: building its engines takes minutes per model.
    """
    usable: list[str] = []
    if CUDA in ort.get_available_providers():
        ort.set_default_logger_severity(_QUIET)
        try:
            options = ort.SessionOptions()
            options.log_severity_level = _QUIET
            session = ort.InferenceSession(_probe_model(), options, providers=[CUDA, CPU])
            if CUDA in session.get_providers():
                usable.append(CUDA)
        except Exception:  # noqa: BLE001 - any failure means "CUDA is not usable here"
            pass
        finally:
            ort.set_default_logger_severity(_DEFAULT_SEVERITY)
    usable.append(CPU)
    return tuple(usable)


def providers_for(device: str) -> list[str]:
    """The provider list for --device auto|cpu|cuda; raises RuntimeUnavailable for cuda without CUDA."""
    if device not in DEVICES:
        raise RuntimeUnavailable(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU]
    if CUDA in usable_providers():
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeUnavailable("--device cuda was asked for, but ONNX Runtime cannot use CUDA on this "
                                 "machine (no GPU, or CUDA/cuDNN libraries missing)")
    return [CPU]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Every graph optimization on, one intra-op thread per physical core, sequential execution
    (a ResNet is a chain: parallel graph execution only adds scheduling overhead)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def make_session(model: bytes | str | os.PathLike[str], device: str = "auto", *,
                 threads: int | None = None) -> ort.InferenceSession:
    """An inference session for a serialized model or a model file on the chosen device."""
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, session_options(threads), providers=providers_for(device))


def embed(session: ort.InferenceSession, images: npt.NDArray[np.uint8], batch_size: int = 64,
          ) -> npt.NDArray[np.float32]:
    """Run uint8 [N, S, S, 3] images through an embedding model in batches; float32 [N, D]."""
    name = session.get_inputs()[0].name
    outputs: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[start:start + batch_size])
        outputs.append(session.run(None, {name: chunk})[0])
    return np.concatenate(outputs).astype(np.float32, copy=False)


def describe_providers(active: Sequence[str] | None = None) -> str:
    """One line naming what this onnxruntime build lists and what really works here."""
    listed = ", ".join(ort.get_available_providers())
    usable = ", ".join(usable_providers())
    text = f"listed by onnxruntime {ort.__version__}: {listed}; usable here: {usable}"
    if active is not None:
        text += f"; in use: {', '.join(active)}"
    return text
