"""Contract 1: the training checkpoint, written atomically, read back with clear refusals.

`training_state` packs what a checkpoint holds and `restore_training_state` puts it back into a
resumed run; `load_backbone` is the one public way for other parts (export, evaluation) to read it.

A checkpoint is a pickle, and unpickling can run any code the file names. So it is read with
`torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers and
numbers, plus the short allow-list below; a file naming anything else is refused before any of
it runs. What `save_checkpoint` writes needs nothing from the allow-list (the RNG states are
stored as tensors, tuples and numbers); the list only keeps older checkpoints readable.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from indexer.files import atomic_write
from moco.backbones import build_backbone
from moco.config import FORMAT_VERSION, TrainConfig, resolve_stem
from moco.data import ImageFolder, listing_digest

if TYPE_CHECKING:
    from moco.model import MoCo
    from moco.pacer import Plan
    from moco.runlog import Progress

CHECKPOINT_NAME = "checkpoint.pt"

try:  # numpy 2 moved the array pickling helper; files name it by the module that wrote them
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

# Globals a checkpoint may name beyond what weights_only allows by default: a uint32 numpy
# array, as checkpoints written before safe loading stored numpy's RNG keys. Array
# reconstruction can build only the array and dtype types listed here, so nothing on this list
# runs code. The helper under both names: numpy 1.x wrote `numpy.core`, 2.x `numpy._core`.
LEGACY_SAFE_GLOBALS: list[Any] = [
    _numpy_reconstruct,
    (_numpy_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line for the user."""


def set_aside(folder: Path, names: Iterable[str]) -> list[tuple[Path, Path]]:
    """Rename what an earlier attempt left under `names` in `folder` to NAME.N, with the first
    N free for all of them, so a fresh run starts its own files and nothing is lost. Returns
    (old, new) pairs."""
    present = [name for name in names if os.path.lexists(folder / name)]
    if not present:
        return []
    number = 1
    while any(os.path.lexists(folder / f"{name}.{number}") for name in present):
        number += 1
    moved = []
    for name in present:
        target = folder / f"{name}.{number}"
        os.rename(folder / name, target)
        moved.append((folder / name, target))
    return moved


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator's state, in types the safe loader builds without an allow-list:
    tensors, tuples and numbers (numpy's own form holds an ndarray)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def restore_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    """Put back what capture_rng_state saved (or an older checkpoint's numpy-array form)."""
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, position, has_gauss, cached_gaussian = rng["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(position), int(has_gauss), float(cached_gaussian)))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def training_state(config: TrainConfig, *, model: MoCo, optimizer: torch.optim.Optimizer, progress: Progress,
                   plan: Plan, device: torch.device, folder: ImageFolder, val: ImageFolder | None,
                   quality: dict[str, Any] | None = None, shipped_encoder: dict[str, torch.Tensor] | None = None,
                   monitor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly, as the checkpoint holds it (Contract 1).

    `quality` says how good the shipped network is and which one ships (moco.quality);
    `shipped_encoder` is the query encoder's state dict to export when that is not the final
    network (the start or the best one); `monitor` the tracker's state for a resumed session.
    """
    extras: dict[str, Any] = {"quality": quality if quality is not None else quality_of({})}
    if shipped_encoder is not None:
        extras["shipped_encoder"] = shipped_encoder
    if monitor is not None:
        extras["monitor"] = monitor
    return {**extras,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling
        "progress": vars(progress),
        "plan": plan.to_dict(),
        "rng": capture_rng_state(device),
        "data": {"root": str(folder.root.resolve()),
                 "val": str(val.root.resolve()) if val else None,
                 "num_images": len(folder.refs),
                 "listing_sha256": listing_digest(folder)},
    }


def restore_training_state(state: dict[str, Any], *, model: MoCo, optimizer: torch.optim.Optimizer,
                           device: torch.device, folder: ImageFolder) -> None:
    """Put a checkpoint's weights, optimizer and random generators back (the caller takes its
    progress and plan), and warn when the data folder's file list changed since it was written."""
    weights = dict(state["model"])
    # Checkpoints from before the queue counted its real keys: theirs is full (random start).
    weights.setdefault("queue_filled", torch.tensor(model.queue.shape[1]))
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], device)
    if state["data"]["listing_sha256"] != listing_digest(folder):
        tqdm.write("warning: the data folder changed since the checkpoint; resuming on its current "
                   "contents (the run will not match an uninterrupted one exactly)")


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The size of the tensors a checkpoint holds (weights and optimizer state), to price a write."""
    return sum(t.numel() * t.element_size() for t in [
        *model.state_dict().values(),
        *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically (see :func:`indexer.files.atomic_write`)."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept either the checkpoint file or the run folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def _refusal(path: Path, err: pickle.UnpicklingError) -> CheckpointError | None:
    """The one-line refusal for a file that names a function or class outside the allow-list,
    or None when the unpickler stopped for another reason (damage, an opcode it does not read)."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    # torch words it as "GLOBAL posix.system ..." or "... but got <class 'x.Y'>", by version
    found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
    if found is None:
        return None
    what = found.group(1) or found.group(2)
    return CheckpointError(f"refused to load {path}: it names {what}, which a MoCo checkpoint never holds "
                           "(unpickling it could run code)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS), warnings.catch_warnings():  # this load only
            # a bare pickle (not torch.save's format) draws a protocol warning: the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise (_refusal(path, err) or CheckpointError(
            f"cannot read checkpoint {path}: not a MoCo checkpoint or damaged (UnpicklingError)")) from None
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: not a MoCo checkpoint or damaged "
                              f"({type(err).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a MoCo checkpoint written by this tool")
    version = state["config"].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this version of the "
                              f"tool reads version {FORMAT_VERSION}")
    return state


def _submodule_weights(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def quality_of(state: dict[str, Any]) -> dict[str, Any]:
    """How good the checkpoint's shipped network is by the trainer's monitor (`moco.quality`):
    the stored quality dict, or an "unmeasured" one for checkpoints written before it was recorded."""
    from moco.quality import unmeasured

    quality = state.get("quality")
    if isinstance(quality, dict) and "verdict" in quality:
        return quality
    return unmeasured("trained before quality was recorded")


def shipped_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The query encoder's weights that ship ("backbone.*" and "head.*" keys): the stored
    `shipped_encoder` (the start or the best network) when there is one, else the final network's."""
    if isinstance(state.get("shipped_encoder"), dict):
        return state["shipped_encoder"]
    return {k[len("encoder_q."):]: v for k, v in state["model"].items() if k.startswith("encoder_q.")}


def backbone_from_state(state: dict[str, Any], *, head: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped query backbone (and head), eval mode: see `shipped_weights` and `quality_of`."""
    config = TrainConfig.from_dict(state["config"])
    weights = shipped_weights(state)
    backbone = build_backbone(config.arch, stem=resolve_stem(config), image_size=config.image_size)
    backbone.load_state_dict(_submodule_weights(weights, "backbone."))
    module: nn.Module = backbone
    if head:
        from moco.model import build_heads

        projector, _ = build_heads(config)
        projector.load_state_dict(_submodule_weights(weights, "head."))
        module = nn.Sequential(backbone, projector)
    module.eval()
    return module, state["config"]


def load_backbone(path: str | Path, *, head: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The trained query backbone (eval mode, CPU) and the run's config dict.

    The weights are those the run ships (`quality_of(state)["shipped"]`: the final, the best
    or the start network). The module maps a float batch normalised with config['mean']/config['std'] to pooled
    backbone features [N, config['embedding_dim']]; with head=True, to the projection head's
    output [N, config['dim']] instead.
    """
    return backbone_from_state(load_checkpoint(path), head=head)
