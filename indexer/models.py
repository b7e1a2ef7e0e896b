"""Which model embeds a folder: the one trained on it, never silently the newest file.

A model embeds well what it was trained on; a 16-px digits model embeds clothing photos badly
and nothing would say so. So ``indexer build`` without ``--model`` and the app's build form
both ask :func:`choose_model` (one rule, one place): the newest model in ``models/`` whose
``moco.train_data`` names the image folder (or a folder that contains it) is used; when there
is none the caller gets a :class:`~indexer.embed.ModelError` listing the candidates with what
each was trained on, and must name one. Whatever is chosen, :func:`describe` says what it is.

``moco.train_data`` is written by the exporter as ``"N images in /resolved/training/folder"``;
models exported before that recorded only ``"folder: N images"``, which names no folder
reliably and so never matches (they are still listed as candidates).

Which variant of that model embeds (:func:`choose_variant`): ``python -m exports --with-int8``
writes ``NAME.onnx`` and its int8 sibling ``NAME-int8.onnx``, whose metadata names the fp32 file
and its sha256 and records the neighbour check it passed. On a CPU whose int8 dot products run
in one instruction (VNNI, AMX: ``/proc/cpuinfo`` flags ``avx512_vnni``, ``avx_vnni``,
``amx_int8``) the int8 model runs 2-3x faster (a whole build about 2x at 64 px) for well under a
point of kNN (bench/int8_indexing.py), so a build on such a CPU uses the sibling when it is
verified and made from this very fp32 file; elsewhere (CUDA, CPUs without those instructions,
where the int8 kernels gain less) the fp32 model. A model named with ``--model`` is used as it
is unless ``--precision`` asks for the other variant. The choice and its reason are printed; the
collection's manifest keeps the model's props (``moco.precision`` among them) and its own copy
of the file, so queries and updates use the variant that made the vectors.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.embed import ModelError
from indexer.files import sha256_file

__all__ = ["PRECISIONS", "ModelInfo", "Variant", "choose_model", "choose_variant", "cpu_int8_flags", "describe",
           "describe_precision", "fp32_of",
           "int8_sibling", "list_models", "model_info", "parse_train_data", "precision_of", "trained_on",
           "verified_int8_sibling"]

TRAIN_DATA = re.compile(r"(?P<count>\d+) images in (?P<root>.+)")
# The exporter's variant props (Contract 2, exports/onnx.py writes them).
PRECISION_PROP = "moco.precision"
CHECK_PROP = "moco.precision_check"
FP32_MODEL_PROP = "moco.fp32_model"
FP32_SHA_PROP = "moco.fp32_sha256"
INT8_SUFFIX = "-int8"
PRECISIONS = ("auto", "fp32", "int8")
UNRECORDED = "not recorded"  # models exported before moco.precision (fp32 unless made with --int8/--fp16)
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
"""CPU flags of int8 dot-product instructions (one instruction for u8 x s8 -> s32 sums, no
saturating int16 step): where ONNX Runtime's int8 kernels clearly beat fp32."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself, for choosing it and for telling the user."""

    path: Path
    train_data: str  # moco.train_data as recorded ("?" when unreadable)
    train_root: Path | None  # the training folder, when the metadata names one
    image_size: str  # moco.image_size ("?" when unreadable)
    error: str | None = None  # why the file could not be read, if it could not
    props: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def precision(self) -> str:
        return precision_of(self.props)

    def describe(self) -> str:
        """``models/a.onnx (trained on /y, 64 px)``: the one wording of CLI and app."""
        if self.error:
            return f"{self.path} (unreadable: {self.error})"
        return f"{self.path} (trained on {self.train_data}, {self.image_size} px)"


def parse_train_data(text: str) -> Path | None:
    """The training folder named by ``moco.train_data``, or None when it names none."""
    match = TRAIN_DATA.fullmatch(text.strip())
    if not match or not match["root"].startswith("/"):
        return None
    return Path(match["root"])


@functools.lru_cache(maxsize=256)
def _read(path: Path, mtime_ns: int, size: int) -> ModelInfo:  # the file's identity is the cache key
    from indexer import runtime

    try:
        session = runtime.make_session(path, "cpu", threads=1)
        props = dict(session.get_modelmeta().custom_metadata_map)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad files
        return ModelInfo(path, "?", None, "?", error=str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
    data = props.get("moco.train_data", "unknown")
    return ModelInfo(path, data, parse_train_data(data), props.get("moco.image_size", "?"), props=props)


def model_info(path: Path) -> ModelInfo:
    """Read a model's training summary (cached per file version, so a page redraw costs nothing)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        return ModelInfo(path, "?", None, "?", error=exc.strerror or str(exc))
    return _read(path, st.st_mtime_ns, st.st_size)


def describe(path: Path) -> str:
    """What to print about the model used: its path and what it was trained on."""
    return model_info(path).describe()


def list_models(models_dir: Path) -> list[Path]:
    """``models_dir/*.onnx``, newest first (ties by name, so the order is stable)."""
    if not Path(models_dir).is_dir():
        return []
    found = []
    for p in Path(models_dir).glob("*.onnx"):
        try:
            found.append((-p.stat().st_mtime_ns, p.name, p))
        except OSError:  # vanished between listing and stat
            continue
    return [p for _, _, p in sorted(found)]


def trained_on(info: ModelInfo, image_dir: Path) -> bool:
    """True when the model was trained on ``image_dir`` or on a folder that contains it."""
    if info.train_root is None:
        return False
    folder = Path(image_dir).expanduser().resolve()
    root = info.train_root
    return folder == root or root in folder.parents


def choose_model(image_dir: Path, models_dir: Path = Path("models"), *,
                 candidates: Sequence[Path] | None = None) -> ModelInfo:
    """The newest model in ``models_dir`` (or the first of ``candidates``, in their order) trained
    on ``image_dir``; :class:`ModelError` (one line that lists the candidates) when there is none,
    so the caller must name one (``--model``; the app's form asks the person to choose)."""
    infos = [model_info(p) for p in (list_models(models_dir) if candidates is None else candidates)]
    if not infos:
        raise ModelError(f"no --model given and no {models_dir}/*.onnx found; train and export one with "
                         "'python -m moco train IMAGE_DIR --out runs/NAME' and "
                         f"'python -m exports runs/NAME -o {models_dir}/NAME.onnx', or pass --model M.onnx")
    for info in infos:
        if trained_on(info, image_dir) and not _has_fp32_sibling(info):
            return info
    listed = ", ".join(info.describe() for info in infos)
    folder = Path(image_dir).expanduser().resolve()
    where = f" in {models_dir}" if candidates is None else ""
    raise ModelError(f"no model{where} was trained on {folder}; pass --model (candidates: {listed})")


def _has_fp32_sibling(info: ModelInfo) -> bool:
    """An int8 sibling whose fp32 model lies beside it: that one is the candidate (its variant is
    chosen afterwards by :func:`choose_variant`), so the newer int8 file never shadows it."""
    return info.precision == "int8" and fp32_of(info) is not None


def fp32_of(info: ModelInfo) -> Path | None:
    """The fp32 model an int8 sibling was made from, when it lies beside it: the file it names,
    or its own name without ``-int8`` (a pair renamed together), whose sha256 is the recorded one."""
    want = info.props.get(FP32_SHA_PROP)
    if not want:
        return None
    names = [str(info.props.get(FP32_MODEL_PROP, ""))]
    if info.path.stem.endswith(INT8_SUFFIX):
        names.append(info.path.stem[: -len(INT8_SUFFIX)] + info.path.suffix)
    for name in filter(None, names):
        candidate = info.path.parent / name
        if candidate.is_file() and sha256_file(candidate) == want:
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Which variant: fp32 or its verified int8 sibling
# --------------------------------------------------------------------------------------------


def precision_of(props: Mapping[str, str]) -> str:
    """``fp32`` / ``fp16`` / ``int8`` as the exporter recorded it, or ``not recorded`` for models
    exported before ``moco.precision`` existed."""
    return props.get(PRECISION_PROP) or UNRECORDED


def describe_precision(props: Mapping[str, str]) -> str:
    """``int8 (top-10 overlap with fp32 0.970 on 240 images (need >= 0.85): passed)``: the
    variant that made a collection's vectors, as ``indexer info`` and the app show it."""
    check = check_summary(props)
    return f"{precision_of(props)} ({check})" if check else precision_of(props)


def check_summary(props: Mapping[str, str]) -> str:
    """The recorded neighbour check of a reduced-precision model, in words ('' when none)."""
    record = _check(props)
    if record is None:
        return ""
    verdict = "passed" if record.get("passed") else "FAILED"
    return (f"top-10 overlap with fp32 {float(record.get('overlap', 0)):.3f} on {record.get('images', '?')} "
            f"images (need >= {record.get('threshold', '?')}): {verdict}")


def _check(props: Mapping[str, str]) -> dict[str, object] | None:
    try:
        record = json.loads(props.get(CHECK_PROP, ""))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: the flags are unknown, so int8 is not assumed to pay
        return frozenset()
    return parse_cpu_flags(text)


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of a ``/proc/cpuinfo`` text (the first processor's; they are the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_int8_flags(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The int8 dot-product flags this CPU has (``INT8_CPU_FLAGS``); ``flags`` replaces the
    ones read from ``/proc/cpuinfo`` (a seam for tests)."""
    have = _cpuinfo_flags() if flags is None else flags
    return tuple(flag for flag in INT8_CPU_FLAGS if flag in have)


def int8_sibling(fp32: Path) -> Path:
    """``models/x.onnx`` -> ``models/x-int8.onnx``, where ``python -m exports --with-int8`` writes it."""
    return fp32.with_name(f"{fp32.stem}{INT8_SUFFIX}{fp32.suffix}")


def verified_int8_sibling(fp32: Path) -> tuple[Path | None, str]:
    """The int8 sibling of ``fp32`` when it may stand in for it, else None; and why, in words.

    It must be an int8 model made from this very file (its recorded fp32 sha256), of
    the same checkpoint, whose recorded neighbour check against fp32 passed."""
    path = int8_sibling(Path(fp32))
    if not path.is_file():
        return None, f"no int8 sibling {path.name} (export with --with-int8 to make one)"
    info, base = model_info(path), model_info(Path(fp32))
    if info.error:
        return None, f"its int8 sibling {path} is unreadable ({info.error})"
    props = info.props
    if info.precision != "int8":
        return None, f"{path} is not an int8 model (moco.precision {info.precision})"
    if props.get(FP32_SHA_PROP) != sha256_file(fp32):  # the bytes, not the name: a renamed pair still matches
        return None, f"{path} was made from another {Path(fp32).name} (export both again with --with-int8)"
    if props.get("moco.checkpoint_sha256") != base.props.get("moco.checkpoint_sha256"):
        return None, f"{path} comes from another checkpoint than {fp32}"
    record = _check(props)
    if record is None or not record.get("passed"):
        return None, f"{path} did not pass its check against fp32 ({check_summary(props) or 'no check recorded'})"
    return path, f"its int8 sibling {path.name} is verified ({check_summary(props)})"


@dataclass(frozen=True)
class Variant:
    """The model file a build embeds with, its precision, and why (printed before any work)."""

    path: Path
    precision: str
    reason: str


def choose_variant(model: Path, *, precision: str = "auto", device: str = "auto", given: bool = False,
                   cpu_flags: frozenset[str] | None = None) -> Variant:
    """fp32 ``model`` or its verified int8 sibling (module doc); ``given``: named with --model,
    which is used as it is unless ``precision`` asks for the other variant. ModelError (one
    line) when ``precision`` asks for a variant that does not exist or did not pass its check."""
    from indexer import runtime

    if precision not in PRECISIONS:
        raise ModelError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"model not found: {model}")
    own = model_info(model).precision
    if precision == "int8":
        if own == "int8":
            return Variant(model, "int8", "int8 as asked")
        sibling, why = verified_int8_sibling(model)
        if sibling is None:
            raise ModelError(f"--precision int8: {model} has no usable int8 variant: {why}")
        return Variant(sibling, "int8", f"int8 as asked; {why}")
    if precision == "fp32":
        if own in ("fp32", UNRECORDED):
            return Variant(model, own, "fp32 as asked")
        if own != "int8":
            raise ModelError(f"--precision fp32: {model} is a {own} model; pass the fp32 model with --model")
        base = fp32_of(model_info(model))
        if base is None:
            raise ModelError(f"--precision fp32: {model} is an int8 model with no fp32 sibling beside it; "
                             "pass the fp32 model with --model")
        return Variant(base, "fp32", f"fp32 as asked (the model {model.name} was made from)")
    if given:
        return Variant(model, own, "given with --model (--precision int8|fp32 picks a variant of it)")
    if own not in ("fp32", UNRECORDED):
        return Variant(model, own, f"the model is {own}")
    try:
        on_cpu = runtime.providers_for(device)[0] == runtime.CPU
    except runtime.RuntimeUnavailable as exc:
        raise ModelError(str(exc)) from None
    if not on_cpu:
        return Variant(model, "fp32", "fp32 on CUDA (int8 pays on CPUs with VNNI/AMX)")
    flags = cpu_int8_flags(cpu_flags)
    if not flags:
        return Variant(model, "fp32", "this CPU has no VNNI/AMX int8 instructions, where int8 gains less and "
                       "loses more (--precision int8 to use it anyway)")
    sibling, why = verified_int8_sibling(model)
    if sibling is None:
        return Variant(model, "fp32", f"fp32: {why}")
    return Variant(sibling, "int8", f"int8 on a CPU with {', '.join(flags)}: {why} (--precision fp32 to use fp32)")
