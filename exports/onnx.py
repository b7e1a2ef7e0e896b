"""Checkpoint -> self-describing ONNX embedding model (Contract 2): build, verify, quantize, write.

The graph takes what a decoder hands over (uint8 RGB, [N, S, S, 3]) and returns what an index
stores (L2-normalized float32, [N, D]); the scale to [0, 1], mean/std normalization, layout
change and final normalization live inside it, so the indexer never re-implements them and
can never get them subtly wrong. The model's `metadata_props` say how it was made and how to
feed it (`moco.resize`), so nothing downstream guesses.

Export path, and why: the TorchScript exporter (`dynamo=False`) in eval mode folds every
BatchNorm into the preceding convolution and emits the plain Conv/Relu/Add/GlobalAveragePool
chain ONNX Runtime's CPU kernels are tuned for, in ~4 s; the dynamo exporter on this torch
version emits the same convolutions plus a Shape/Gather/Range/Reshape tail and takes ~30 s.
The dynamo exporter is kept as a fallback for torch builds that drop the TorchScript one. The
result is then simplified with onnxscript's optimizer (constant folding, no-op casts, dead
nodes), which, unlike saving ONNX Runtime's optimized graph, stays independent of the
execution provider: a saved ORT graph of an fp16 model gains CPU-only casts around every conv.

Nothing is written until every check passed (see `exports.verify` for the thresholds), and then
atomically, so an interrupted or refused export leaves no file behind.

With ``with_int8`` one export writes the fp32 model and its int8 sibling ``NAME-int8.onnx``
(calibrated on the training folder recorded in the checkpoint unless a folder is given). The
sibling's metadata names the fp32 file and its sha256 and records the neighbour check it passed,
so the indexer can use it in the fp32 model's place on CPUs with int8 dot-product instructions
(:mod:`indexer.models`) knowing it is the same network, verified.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from torch import nn

from exports import samples, verify
from exports.contract import INPUT_NAME, METADATA_KEYS, MODEL_FORMAT_VERSION, OUTPUT_NAME
from exports.quantize import DEFAULT_VARIANT, QuantizeError, quantize_int8
from indexer import quality, runtime
from indexer.files import atomic_write_bytes, sha256_file

PRECISIONS = ("fp32", "fp16", "int8")
# Variant props of Contract 2 (ARCHITECTURE.md), besides METADATA_KEYS; indexer.models reads them.
PRECISION_PROP = "moco.precision"  # fp32 | fp16 | int8
CHECK_PROP = "moco.precision_check"  # fp16/int8: the neighbour check against fp32, compact JSON
FP32_MODEL_PROP = "moco.fp32_model"  # int8 sibling: the file name of the fp32 model it was made from
FP32_SHA_PROP = "moco.fp32_sha256"  # ... and that file's sha256, so a re-exported fp32 orphans it
VARIANT_KEYS = (PRECISION_PROP, CHECK_PROP, FP32_MODEL_PROP, FP32_SHA_PROP)
INT8_SUFFIX = "-int8"
DEFAULT_OPSET = 17  # read by every ONNX Runtime since 1.11 and by the quantization tools
MIN_OPSET = 13
MAX_OPSET = 20  # the TorchScript exporter's ceiling on this torch version
PARITY_RANDOM = 7  # odd batch on purpose: a graph with a baked-in batch size fails here
PARITY_REAL = 32
DEFAULT_CALIBRATION = 256
DEFAULT_CHECK_IMAGES = 512
GENERATED_CHECK_IMAGES = 256  # without a folder: enough for a stable top-10 overlap


class ExportError(ValueError):
    """Bad input (checkpoint, paths, options): one line for the user, exit code 2."""


class VerificationFailed(RuntimeError):
    """The exported model does not meet a threshold; nothing was written (exit code 1)."""


class ImagesToEmbeddings(nn.Module):
    """uint8 RGB [N, S, S, 3] -> L2-normalized float32 [N, D], preprocessing included.

    (x / 255 - mean) / std is computed as x * scale + shift, one Mul and one Add in the graph.
    With half=True the network runs in float16 while the input scaling and the final
    normalization stay in float32 (they are cheap, and the norm of a 2048-d fp16 vector can
    overflow).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], *,
                 half: bool = False) -> None:
        super().__init__()
        self.net = net.half() if half else net
        self.half = half
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Transpose while still uint8: a quarter of the bytes of a float transpose.
        x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        if self.half:
            x = x.to(torch.float16)
        feats = self.net(x).to(torch.float32)
        # Broadcast division, not F.normalize: that one exports a Shape/Expand pair.
        return feats / torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class Source:
    """A checkpoint opened for export: the fp32 PyTorch reference and the model's metadata."""

    model: ImagesToEmbeddings
    config: dict[str, Any]
    props: dict[str, str]
    checkpoint: Path
    train_root: Path | None = None  # the training folder recorded in the checkpoint


def int8_sibling(output: Path) -> Path:
    """``models/x.onnx`` -> ``models/x-int8.onnx``: where ``--with-int8`` writes the int8 model
    (the name ``indexer.models`` looks for beside the fp32 one)."""
    return output.with_name(f"{output.stem}{INT8_SUFFIX}{output.suffix}")


def check_record(check: verify.Check) -> str:
    """``moco.precision_check``: the neighbour check as compact JSON, read back by the indexer."""
    return json.dumps({"name": "top-10 neighbour overlap with fp32", "overlap": round(check.value, 6),
                       "threshold": check.threshold, "images": check.images, "source": check.source,
                       "passed": check.passed}, separators=(",", ":"), sort_keys=True)


def train_data_summary(data: dict[str, Any] | None) -> str:
    """`moco.train_data`: '720 images in /data/flowers', the resolved training folder from the
    checkpoint, so the indexer can tell which model was trained on the folder it indexes
    (:mod:`indexer.models`); a folder's name alone would match any other folder of that name."""
    if not data:
        return "unknown"
    root = str(data.get("root", "")) or "an unknown folder"
    count = data.get("num_images")
    return f"{count} images in {root}" if count is not None else root


def _numbers(values: Any) -> str:
    return ",".join(repr(float(v)) for v in values)


def load_source(checkpoint: str | Path, *, head: bool = False) -> Source:
    """Open a checkpoint (file or run folder) as an ImagesToEmbeddings plus its metadata props."""
    from indexer.images import resize_recipe
    from moco.checkpoint import (
        CheckpointError,
        backbone_from_state,
        load_checkpoint,
        quality_of,
        resolve_checkpoint_path,
    )

    try:
        path = resolve_checkpoint_path(checkpoint)
        state = load_checkpoint(path)
        net, config = backbone_from_state(state, head=head)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    except (KeyError, RuntimeError, TypeError, ValueError) as err:  # weights that do not fit the config
        raise ExportError(f"{checkpoint}: cannot rebuild the model from this checkpoint "
                          f"({type(err).__name__})") from None
    size = int(config["image_size"])
    model = ImagesToEmbeddings(net, tuple(config["mean"]), tuple(config["std"])).eval()
    with torch.no_grad():
        dim = int(model(torch.zeros(1, size, size, 3, dtype=torch.uint8)).shape[1])
    expected = int(config["dim"] if head else config["embedding_dim"])
    if dim != expected:
        raise ExportError(f"{path}: the model gives {dim}-d embeddings but its config says {expected}")
    props = {
        "moco.format_version": str(MODEL_FORMAT_VERSION),
        "moco.image_size": str(size),
        "moco.embedding_dim": str(dim),
        "moco.arch": str(config["arch"]),
        "moco.preset": str(config["preset"]),
        "moco.resize": resize_recipe(size),
        "moco.mean": _numbers(config["mean"]),
        "moco.std": _numbers(config["std"]),
        "moco.checkpoint_sha256": sha256_file(path),
        "moco.train_data": train_data_summary(state.get("data")),
        quality.PROP: quality.to_prop(quality_of(state)),  # the trainer's monitor, start and end
    }
    root = (state.get("data") or {}).get("root")
    return Source(model, config, props, path, Path(root) if root else None)


def export_graph(model: ImagesToEmbeddings, image_size: int, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """torch.onnx.export with a dynamic batch axis, then the provider-independent simplification."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    model = model.eval()
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    # Not under no_grad: that switches nn.MultiheadAttention (ViT) to a fused fast path the
    # TorchScript exporter cannot translate. Tracing records no gradients either way.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice, tracer warnings
        try:
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                              do_constant_folding=True)
            proto = onnx.load_from_string(buffer.getvalue())
        except Exception as first:  # noqa: BLE001 - exporter gone or unable: try the dynamo exporter
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=max(opset, 18),
                                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                                dynamic_shapes={"images": {0: torch.export.Dim("N")}})
                proto = program.model_proto
            except Exception as second:  # noqa: BLE001 - both exporters failed: say why, briefly
                raise ExportError(f"torch.onnx.export failed: {_first_line(first)}; dynamo exporter: "
                                  f"{_first_line(second)}") from None
    return simplify(proto)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal that hold for every execution provider."""
    import onnxscript.optimizer

    try:
        simplified = onnxscript.optimizer.optimize(model)
    except Exception:  # noqa: BLE001 - the exporter's graph is already folded; keep it
        return model
    del simplified.metadata_props[:]  # exporter annotations; ours are set at the end
    return simplified


def torch_embed(model: nn.Module, images: npt.NDArray[np.uint8], batch_size: int = 64,
                ) -> npt.NDArray[np.float32]:
    """The PyTorch reference embeddings of uint8 NHWC images."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start:start + batch_size])
            out.append(model(torch.from_numpy(chunk)).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def finalize(model: onnx.ModelProto, props: dict[str, str], doc: str) -> onnx.ModelProto:
    """Exactly the Contract 2 metadata keys (the variant keys where they apply), a human
    description, and ONNX's own check."""
    missing = [key for key in METADATA_KEYS if key not in props]
    extra = sorted(set(props) - set(METADATA_KEYS) - set(VARIANT_KEYS))
    if missing or extra:
        raise ValueError(f"metadata keys differ from Contract 2: missing {missing}, extra {extra}")
    _prune_opset_imports(model)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {key: props[key] for key in (*METADATA_KEYS, *VARIANT_KEYS) if key in props})
    model.doc_string = doc
    model.producer_name = "moco-search exports"
    onnx.checker.check_model(model)
    return model


def _prune_opset_imports(model: onnx.ModelProto) -> None:
    """Drop operator-set imports no node uses. Models saved by ONNX Runtime (the int8 path)
    import every domain it knows, training ones included, which would make a plain
    inference graph look like it needs a training runtime."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used or opset.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


@dataclass
class ExportOptions:
    """Everything `python -m exports CKPT -o OUT` can be asked for."""

    checkpoint: Path
    output: Path
    head: bool = False
    precision: str = "fp32"
    calibration: Path | None = None
    verify_images: Path | None = None
    opset: int = DEFAULT_OPSET
    device: str = "auto"
    verify: bool = True
    min_overlap: float | None = None
    calibration_count: int = DEFAULT_CALIBRATION
    check_count: int = DEFAULT_CHECK_IMAGES
    int8_variant: str = DEFAULT_VARIANT
    with_int8: bool = False  # also write the int8 sibling (int8_sibling(output)) of the fp32 model


@dataclass
class ExportResult:
    """What was written, and the checks it passed (or failed, with --no-verify)."""

    path: Path
    precision: str
    size_bytes: int
    props: dict[str, str]
    checks: list[verify.Check] = field(default_factory=list)
    int8: ExportResult | None = None  # the int8 sibling, when one was asked for and written


def check_output_path(output: Path) -> None:
    """Refuse an output the atomic write could not complete, before minutes of work."""
    parent = output.parent
    if output.is_dir():
        raise ExportError(f"{output} is a folder; give a file name such as {output / 'model.onnx'}")
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"{parent} is not a folder, so {output.name} cannot be written inside it")
    if not parent.is_dir():
        raise ExportError(f"output folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {parent} is not writable")


def _check_folder(path: Path | None, flag: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise ExportError(f"{flag} {path}: no such folder")


def _overlap_threshold(options: ExportOptions, precision: str) -> float:
    if options.min_overlap is not None:
        return options.min_overlap
    return verify.FP16_MIN_OVERLAP if precision == "fp16" else verify.INT8_MIN_OVERLAP


def calibration_folder(options: ExportOptions, source: Source, log: Callable[[str], None]) -> Path | None:
    """The images int8 is calibrated and checked on: ``--calibration``, else the training folder
    recorded in the checkpoint (images like the ones the model was made for), said aloud."""
    if options.calibration is not None:
        return Path(options.calibration)
    if options.precision != "int8" and not options.with_int8:
        return None
    root = source.train_root
    if root is None:
        raise ExportError("the checkpoint records no training folder to calibrate int8 on; give --calibration "
                          "IMAGE_DIR (images like the ones you will index)")
    if not root.is_dir():
        raise ExportError(f"the training folder recorded in the checkpoint, {root}, is gone; give --calibration "
                          "IMAGE_DIR (images like the ones you will index)")
    log(f"int8 calibration and check on the training folder recorded in the checkpoint: {root} "
        "(--calibration IMAGE_DIR to choose other images)")
    return root


def export_checkpoint(options: ExportOptions, log: Callable[[str], None] = print) -> ExportResult:
    """Build, verify and atomically write the model `options` describe (with ``with_int8``, the
    fp32 model and then its int8 sibling).

    Raises ExportError for bad input and VerificationFailed for a model below its thresholds
    (unless options.verify is False, then the failures are reported and the model is written).
    With ``with_int8`` a verified fp32 model is written even when its int8 sibling fails; the
    VerificationFailed that follows says so.
    """
    if options.precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    if options.with_int8 and options.precision != "fp32":
        raise ExportError("--with-int8 writes an int8 model beside the fp32 one; it cannot be combined with "
                          "--fp16 or --int8")
    output = Path(options.output)
    check_output_path(output)
    _check_folder(options.calibration, "--calibration")
    _check_folder(options.verify_images, "--verify-images")
    if options.calibration_count < 1 or options.check_count < 2:
        raise ExportError("--calibration-count must be >= 1 and --check-images >= 2")
    try:
        runtime.providers_for(options.device)  # fail fast on --device cuda without CUDA
    except runtime.RuntimeUnavailable as err:
        raise ExportError(str(err)) from None

    source = load_source(options.checkpoint, head=options.head)
    calibration = calibration_folder(options, source, log)
    size = int(source.props["moco.image_size"])
    what = "projection head" if options.head else "backbone"
    log(f"exporting {source.props['moco.arch']} {what} ({source.props['moco.embedding_dim']}-d) at {size} px "
        f"from {source.checkpoint}")
    fp32 = export_graph(source.model, size, options.opset)
    fp32_session = runtime.make_session(fp32.SerializeToString(), options.device)
    log(f"verifying with ONNX Runtime on {', '.join(fp32_session.get_providers())}")

    checks = _fp32_checks(source, fp32_session, options, size, calibration)
    final, doc, props = fp32, "fp32", {**source.props, PRECISION_PROP: options.precision}
    if options.precision != "fp32":
        final, doc, check = _reduced_precision(source, fp32, fp32_session, options, size, options.precision,
                                               calibration)
        checks.append(check)
        props[CHECK_PROP] = check_record(check)
    _judge(checks, options, log)
    data = _write(output, final, props, doc, what, options.precision, log)
    report_quality(source.props, log)
    result = ExportResult(output, options.precision, len(data), props, checks)
    if options.with_int8:
        assert calibration is not None  # calibration_folder raised otherwise
        result.int8 = _write_int8_sibling(source, fp32, fp32_session, options, size, calibration, output, data,
                                          what, log)
    return result


def _judge(checks: list[verify.Check], options: ExportOptions, log: Callable[[str], None]) -> None:
    """Log every check; raise VerificationFailed on a failed one unless --no-verify."""
    for check in checks:
        log(check.line())
    failed = [check for check in checks if not check.passed]
    if failed and options.verify:
        raise VerificationFailed(f"verification failed ({failed[0].name}: {failed[0].value:.4f} < "
                                 f"{failed[0].threshold}); nothing written (--no-verify writes it anyway)")
    if failed:
        log("warning: verification failed; writing anyway because of --no-verify")


def _write(output: Path, model: onnx.ModelProto, props: dict[str, str], doc: str, what: str, precision: str,
           log: Callable[[str], None]) -> bytes:
    """Finalize the metadata and write the model atomically; its bytes (for the sibling's sha256)."""
    description = (f"MoCo {props['moco.preset']} {props['moco.arch']} {what} embeddings, "
                   f"{doc}; input images uint8 [N,S,S,3] RGB, output embeddings float32 [N,D] "
                   "L2-normalized")
    data = finalize(model, props, description).SerializeToString()
    try:
        atomic_write_bytes(output, data)  # mode 0666 less the umask: a model is meant to be shared
    except OSError as err:
        raise ExportError(f"cannot write {output}: {err.strerror or err}") from None
    log(f"wrote {output} ({len(data) / 1e6:.1f} MB, {precision})")
    return data


def _write_int8_sibling(source: Source, fp32: onnx.ModelProto, fp32_session: Any, options: ExportOptions, size: int,
                        calibration: Path, output: Path, fp32_bytes: bytes, what: str,
                        log: Callable[[str], None]) -> ExportResult:
    """Quantize, check and write ``NAME-int8.onnx`` naming the fp32 file it stands in for."""
    import hashlib

    path = int8_sibling(output)
    model, doc, check = _reduced_precision(source, fp32, fp32_session, options, size, "int8", calibration)
    props = {**source.props, PRECISION_PROP: "int8", CHECK_PROP: check_record(check),
             FP32_MODEL_PROP: output.name, FP32_SHA_PROP: hashlib.sha256(fp32_bytes).hexdigest()}
    try:
        _judge([check], options, log)
    except VerificationFailed as err:
        stale = " (the older " + str(path) + " there belongs to another fp32 model; the indexer will not use it)" \
            if path.exists() else ""
        raise VerificationFailed(f"int8 {err}; the verified fp32 model {output} was written, no int8 sibling"
                                 f"{stale}") from None
    data = _write(path, model, props, doc, what, "int8", log)
    return ExportResult(path, "int8", len(data), props, [check])


def report_quality(props: dict[str, str], log: Callable[[str], None]) -> quality.ModelQuality:
    """Say in one line how the trained network scored against its random start, and warn when it
    is no better: every index and page built on this model inherits that."""
    measured = quality.from_props(props)
    log(f"quality: {measured.summary()}")
    if measured.doubtful:
        log(f"warning: {measured.doubt()}; searches and few-label results with it are an untrained network's "
            "(train longer, or check the recipe)")
    return measured


def _folder_sample(folder: Path | None, size: int, limit: int, offset: float = 0.0,
                   ) -> samples.FolderSample | None:
    if folder is None:
        return None
    try:
        return samples.folder_images(folder, size, limit, offset=offset)
    except samples.SampleError as err:
        raise ExportError(str(err)) from None


def _fp32_checks(source: Source, session: Any, options: ExportOptions, size: int, calibration: Path | None,
                 ) -> list[verify.Check]:
    """Per-image cosine of ORT against PyTorch on random images (whole batch and one at a time:
    both batch shapes must work) and on real or generated natural images."""
    noise = samples.random_images(PARITY_RANDOM, size, seed=0)
    reference = torch_embed(source.model, noise)
    batched = runtime.embed(session, noise, batch_size=PARITY_RANDOM)
    single = runtime.embed(session, noise[:3], batch_size=1)
    cos_noise = np.concatenate([verify.row_cosines(reference, batched),
                                verify.row_cosines(reference[:3], single)])
    folder = options.verify_images or calibration
    real = _folder_sample(folder, size, PARITY_REAL)
    if real is not None:
        pictures, source_name = real.images, f"images from {folder}"
    else:
        pictures, source_name = samples.natural_images(16, size, seed=1), "generated natural images"
    cos_real = verify.row_cosines(torch_embed(source.model, pictures), runtime.embed(session, pictures))
    return [
        verify.Check("fp32 vs PyTorch, min cosine", float(cos_noise.min()), verify.FP32_MIN_COSINE,
                     PARITY_RANDOM, "random images (batch 7 and 1, incl. all-0 and all-255)"),
        verify.Check("fp32 vs PyTorch, min cosine", float(cos_real.min()), verify.FP32_MIN_COSINE,
                     len(pictures), source_name),
    ]


def _reduced_precision(source: Source, fp32: onnx.ModelProto, fp32_session: Any, options: ExportOptions,
                       size: int, precision: str, calibration_dir: Path | None,
                       ) -> tuple[onnx.ModelProto, str, verify.Check]:
    """Build the fp16 or int8 model and measure its top-10 neighbour overlap with fp32."""
    folder = _folder_sample(calibration_dir, size, options.check_count)
    if folder is not None:
        pictures, where = folder.images, f"images from {calibration_dir}"
    else:
        count = min(options.check_count, GENERATED_CHECK_IMAGES)
        pictures, where = samples.natural_images(count, size, seed=2), "generated natural images"
    if precision == "fp16":
        half = ImagesToEmbeddings(copy.deepcopy(source.model.net), tuple(source.config["mean"]),
                              tuple(source.config["std"]), half=True).eval()
        model = export_graph(half, size, options.opset)
        doc = "fp16 weights and activations (input scaling and output normalization in fp32)"
    else:
        # A different spread of the folder than the check images, so the check is not only
        # scored on the very pictures the ranges were fitted to.
        calibration = _folder_sample(calibration_dir, size, options.calibration_count, offset=0.5)
        assert calibration is not None  # calibration_folder refuses int8 without a folder
        try:
            model = quantize_int8(fp32, calibration.images, variant=options.int8_variant)
        except QuantizeError as err:
            raise ExportError(str(err)) from None
        doc = (f"int8 ({options.int8_variant}: per-channel 7-bit weights, uint8 activations calibrated "
               f"on {len(calibration.images)} images)")
    session = runtime.make_session(model.SerializeToString(), options.device)
    reduced = runtime.embed(session, pictures)
    reference = runtime.embed(fp32_session, pictures)
    overlap = verify.neighbour_overlap(reference, reduced)
    cosine = float(verify.row_cosines(reference, reduced).mean())
    name = f"{precision} vs fp32, top-{verify.OVERLAP_K} neighbour overlap (mean cosine {cosine:.5f})"
    return model, doc, verify.Check(name, overlap, _overlap_threshold(options, precision), len(pictures), where)
