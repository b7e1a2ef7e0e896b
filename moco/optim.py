"""Optimizers and schedules. Schedules are pure functions of the global step, so a resumed run
lands on exactly the same values and an extended run re-plans by changing `total`."""

from __future__ import annotations

import math

import torch
from torch import nn

from moco.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise trust ratios (You et al. 2017), as MoCo v3 trains ResNets.

    Biases and batch-norm parameters (1-D tensors) get neither weight decay nor the trust
    ratio, following the official MoCo v3 code.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    ratio = torch.where((param_norm > 0) & (update_norm > 0), trust, torch.ones_like(trust))
                    update = update.mul(ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return None


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Only the query side is optimised; the key encoder follows by momentum."""
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("encoder_k.")]
    lr = config.effective_lr
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay,
                               foreach=True)
    if config.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=config.weight_decay, momentum=config.sgd_momentum)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, foreach=True)


def lr_at(step: int, total: int, *, warmup_steps: int, base: float, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero (v2, v3) or x0.1 at 60% and 80% (v1)."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "step":
        progress = step / max(1, total)
        return base * (0.1 ** (int(progress >= 0.6) + int(progress >= 0.8)))
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def momentum_at(step: int, total: int, base: float, cosine: bool) -> float:
    """Key-encoder momentum: constant, or raised from `base` toward 1 on a half cosine."""
    if not cosine:
        return base
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total)))) * (1.0 - base)
