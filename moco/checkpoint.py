"""Contract 1: the training checkpoint, written atomically, read back with clear refusals.

`load_backbone` is the one public way for other parts (export, evaluation) to read it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from moco.backbones import build_backbone
from moco.config import FORMAT_VERSION, TrainConfig, resolve_stem

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line for the user."""


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temp file in the same folder, fsync, then os.replace: a crash at any
    instant leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept either the checkpoint file or the run folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        # weights_only=False: the checkpoint carries RNG states and plain Python records.
        # Only open checkpoints you made or trust, as with any pickle.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: not a MoCo checkpoint or damaged "
                              f"({type(err).__name__})") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a MoCo checkpoint written by this tool")
    version = state["config"].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this version of the "
                              f"tool reads version {FORMAT_VERSION}")
    return state


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _submodule_weights(state: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}


def backbone_from_state(state: dict[str, Any], *, head: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    config = TrainConfig.from_dict(state["config"])
    backbone = build_backbone(config.arch, stem=resolve_stem(config), image_size=config.image_size)
    backbone.load_state_dict(_submodule_weights(state, "encoder_q.backbone."))
    module: nn.Module = backbone
    if head:
        from moco.model import build_heads

        projector, _ = build_heads(config)
        projector.load_state_dict(_submodule_weights(state, "encoder_q.head."))
        module = nn.Sequential(backbone, projector)
    module.eval()
    return module, state["config"]


def load_backbone(path: str | Path, *, head: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The trained query backbone (eval mode, CPU) and the run's config dict.

    The module maps a float batch normalised with config['mean']/config['std'] to pooled
    backbone features [N, config['embedding_dim']]; with head=True, to the projection head's
    output [N, config['dim']] instead.
    """
    return backbone_from_state(load_checkpoint(path), head=head)
