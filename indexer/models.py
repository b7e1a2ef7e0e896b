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
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from indexer.embed import ModelError

__all__ = ["ModelInfo", "choose_model", "describe", "list_models", "model_info", "parse_train_data",
           "trained_on"]

TRAIN_DATA = re.compile(r"(?P<count>\d+) images in (?P<root>.+)")


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself, for choosing it and for telling the user."""

    path: Path
    train_data: str  # moco.train_data as recorded ("?" when unreadable)
    train_root: Path | None  # the training folder, when the metadata names one
    image_size: str  # moco.image_size ("?" when unreadable)
    error: str | None = None  # why the file could not be read, if it could not

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
    return ModelInfo(path, data, parse_train_data(data), props.get("moco.image_size", "?"))


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
        if trained_on(info, image_dir):
            return info
    listed = ", ".join(info.describe() for info in infos)
    folder = Path(image_dir).expanduser().resolve()
    where = f" in {models_dir}" if candidates is None else ""
    raise ModelError(f"no model{where} was trained on {folder}; pass --model (candidates: {listed})")
