"""The one ONNX Runtime set-up: providers, thread counts, the CUDA probe, session options.

The indexer embeds with it (:class:`indexer.embed.EmbeddingModel`) and ``exports`` verifies
and inspects models with it, so an export is checked on exactly the session the indexer will
run: same providers, same graph optimizations, same threads.

Why the provider probe: the ``onnxruntime-gpu`` wheel lists CUDAExecutionProvider (and
TensorRT) in ``get_available_providers()`` on every machine, GPU or not; asking for it where
CUDA cannot load silently falls back to the CPU after printing a page of red log lines. So
"auto" means: create a one-node session with CUDA and keep CUDA only if ONNX Runtime really
kept it. TensorRT is never chosen automatically: building its engines takes minutes per model.

Imports nothing heavier than numpy and onnxruntime (``onnx`` only to build the probe), so
``python -m exports info`` and a serving-only install use it without PyTorch or FAISS.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from indexer.cli import DEVICES
from indexer.threads import available_cores

__all__ = [
    "CPU",
    "CUDA",
    "DEVICES",
    "RuntimeUnavailable",
    "describe_providers",
    "embed",
    "make_session",
    "physical_cores",
    "providers_for",
    "session_options",
    "usable_providers",
]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
SPIN_ENV = "INDEXER_ORT_SPIN"
"""Set to 1 to let ONNX Runtime's idle threads busy-wait between runs (see :func:`session_options`)."""

_QUIET = 4  # ORT logger severity "fatal": silences the provider-probe noise
_DEFAULT_SEVERITY = 2  # ORT's own default ("warning")


class RuntimeUnavailable(ValueError):
    """The device asked for cannot be used here; the message is one line for the user."""


def physical_cores() -> int:
    """Physical cores this process may run on, counting SMT siblings once.

    ORT's intra-op threads are best at one per core: a second thread on an SMT sibling competes
    for the same FMA units and usually slows GEMMs down. The logical count is the one the
    trainer uses too (`indexer.threads.available_cores`: the affinity mask and a container's
    CPU quota), so no part oversubscribes the cores it really has."""
    logical = available_cores()
    try:
        text = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
        # a Linux cpu list such as '0,64' or '0-1'
        per_core = sum(int(hi) - int(lo) + 1 if hi else 1
                       for lo, _, hi in (part.partition("-") for part in text.split(",")))
    except (OSError, ValueError):
        per_core = 1
    return max(1, logical // max(1, per_core))


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """Execution providers that really work on this machine, best first (CUDA, then CPU)."""
    usable: list[str] = []
    if CUDA in ort.get_available_providers():
        ort.set_default_logger_severity(_QUIET)  # the failed CUDA load would print a page of red text
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
    """The provider list for ``--device auto|cpu|cuda``; RuntimeUnavailable for an unknown device
    or for cuda where CUDA does not work."""
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


def session_options(threads: int | None = None, spin: bool | None = None) -> ort.SessionOptions:
    """Every graph optimization on, one intra-op thread per physical core, sequential execution
    (a ResNet is a chain: parallel graph execution only adds scheduling overhead).

    ``spin``: ORT's idle threads busy-wait between runs by default; while decoding threads need
    the same cores that only burns them, so spinning is off unless asked for here or with
    ``INDEXER_ORT_SPIN=1`` (None: the environment decides)."""
    if spin is None:
        spin = os.environ.get(SPIN_ENV) == "1"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def make_session(model: bytes | str | os.PathLike[str], device: str = "auto", *, threads: int | None = None,
                 spin: bool | None = None) -> ort.InferenceSession:
    """An inference session for a serialized model or a model file on the chosen device.

    Raises RuntimeUnavailable for a device that cannot be used; a file ONNX Runtime cannot load
    raises whatever ORT raises (callers word it for their users)."""
    source = model if isinstance(model, bytes) else os.fspath(model)
    providers = providers_for(device)
    return ort.InferenceSession(source, session_options(threads, spin), providers=providers)


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
