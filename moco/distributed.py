"""torchrun / DDP support: the device each process runs on, process group set-up and the few
collectives MoCo needs.

Everything here is a no-op in a single process, so the model and the loop read the same
either way. Launch with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """CUDA when present (the GPU of this process's LOCAL_RANK under torchrun), else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init(world: World, device: torch.device) -> None:
    """NCCL between GPUs, gloo on CPUs; one GPU per process, chosen by LOCAL_RANK."""
    if not world.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0 (no gradient: used for keys only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def shared_permutation(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation drawn on rank 0 and sent to all, so every rank shuffles alike."""
    perm = torch.randperm(n, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(perm, src=0)
    return perm


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def any_ranks(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag true on every rank when it is true on one, in one collective: all ranks stop and
    save at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return tuple(bool(f) for f in flags)
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in value.tolist())


def reduce_over_ranks(value: float, op: str, device: torch.device) -> float:
    """The max or min of a number over all ranks, on every rank (so all ranks make one plan)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return float(tensor.item())


def gather_objects(items: list) -> list:
    """All ranks' lists joined, on every rank (small Python objects: failed-file records)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
