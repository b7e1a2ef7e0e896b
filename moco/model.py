"""The MoCo module (v1, v2 and v3): two encoders, a momentum update, a queue, InfoNCE.

Read it next to the papers: query q = f_q(x_q), key k = f_k(x_k) with no gradient, the key
encoder an exponential moving average of the query encoder, and the loss a (1+K)-way
softmax classification of the positive key among K negatives (v1/v2: a FIFO queue of past
keys; v3: the other keys of the batch).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moco import distributed
from moco.backbones import WIDTHS, build_backbone, freeze_patch_projection
from moco.config import TrainConfig, resolve_stem
from moco.precision import autocast, full_precision


def split_count(batch: int, max_splits: int) -> int:
    """Largest number of sub-batches <= max_splits that divides the batch and leaves at least
    two samples in each (batch norm needs two values per channel)."""
    for splits in range(min(max_splits, batch // 2), 1, -1):
        if batch % splits == 0:
            return splits
    return 1


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are computed over S sub-batches of the batch.

    Sub-batch b is the contiguous block of samples [b*N/S, (b+1)*N/S): the batch order is random,
    so each block is a random subset, and a block is a view in any memory format (channels-last
    included), where an interleaved split would copy the tensor at every layer. On one device
    this stands in for the multi-GPU batch norm of the paper: each block is normalised on its
    own, like one GPU's share. Evaluation uses the shared running statistics, so the state dict
    is that of a plain BatchNorm and the trained backbone loads into an unmodified torchvision
    model.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = split_count(x.shape[0], self.num_splits)
        if not self.training or splits == 1:
            return super().forward(x)
        momentum = self.momentum if self.momentum is not None else 0.1
        track = self.track_running_stats
        # Each sub-batch updates its own copy of the running statistics inside the fused
        # batch_norm kernel (no extra pass over the activations); the copies are then averaged.
        means = [self.running_mean.clone() if track else None for _ in range(splits)]
        variances = [self.running_var.clone() if track else None for _ in range(splits)]
        out = torch.cat([F.batch_norm(block, means[i], variances[i], self.weight, self.bias, True, momentum, self.eps)
                         for i, block in enumerate(x.chunk(splits))])
        if track:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(variances).mean(0))
                self.num_batches_tracked.add_(1)
        return out


def use_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm1d/2d in place by a SplitBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps,
                                   momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            use_split_batchnorm(child, num_splits)
    return module


def mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, *, batchnorm: bool,
        last_bn: bool) -> nn.Sequential:
    """The MoCo heads: v2 is Linear-ReLU-Linear; v3 adds BN after every layer (the last one
    without affine parameters, as in the official code)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden,
                                bias=not batchnorm))
        if not last:
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def build_heads(config: TrainConfig) -> tuple[nn.Module, nn.Module | None]:
    width = WIDTHS[config.arch]
    hidden = config.mlp_dim or width
    if config.head == "linear":
        return nn.Linear(width, config.dim), None
    if config.head == "mlp":
        return mlp(2, width, hidden, config.dim, batchnorm=False, last_bn=False), None
    if config.head == "mlp_bn":
        # v2's head with v3's batch norms: centred outputs make the contrastive task well
        # conditioned from the first step (a fresh v2 head maps every image into one narrow cone).
        return mlp(2, width, hidden, config.dim, batchnorm=True, last_bn=True), None
    projector_layers = 3 if config.arch == "vit_small" else 2
    projector = mlp(projector_layers, width, hidden, config.dim, batchnorm=True, last_bn=True)
    predictor = mlp(2, config.dim, hidden, config.dim, batchnorm=True, last_bn=False)
    return projector, predictor


class Encoder(nn.Module):
    """Backbone followed by the projection head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MoCo(nn.Module):
    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.temperature = config.temperature
        self.symmetric = config.symmetric or config.head == "v3"
        self.in_batch_negatives = config.queue_size == 0
        self.batch_negatives = config.batch_negatives
        self.queue_starts_empty = config.queue_start == "empty"
        # Autocast of the encoders' forward only ("fp32", "bf16", or "auto": decided per device).
        self.precision = config.precision
        backbone = build_backbone(config.arch, stem=resolve_stem(config), image_size=config.image_size)
        if config.stop_grad_conv1:
            freeze_patch_projection(backbone)
        head, predictor = build_heads(config)
        self.encoder_q = Encoder(backbone, head)
        self.predictor = predictor
        if config.bn_splits > 1:
            use_split_batchnorm(self, config.bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad = False
        # The queue stores keys as columns, as in the paper's pseudo-code: logits = q @ queue.
        self.register_buffer("queue", F.normalize(torch.randn(config.dim, config.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # How many queue slots hold real keys (with queue_start "empty" only those are negatives;
        # they are always the first slots, as the pointer starts at 0).
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, as two fused multi-tensor ops."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: overwrite the oldest keys, wrapping around; any batch size works. The pointer
        stays on the device, so enqueueing never waits for the GPU."""
        size = self.queue.shape[1]
        if size == 0:
            return
        keys = keys[-size:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + keys.shape[0], max=size))

    @torch.no_grad()
    def shrink_queue(self, size: int) -> None:
        """Keep the `size` most recent keys (a plan made after the queue was built asked for a
        shorter one); the oldest of them is overwritten next. Identical on every rank."""
        old = self.queue.shape[1]
        if size >= old or size <= 0:
            return
        if self.queue_filled < size:  # the real keys are the first slots: keep them there
            self.queue = self.queue[:, :size].clone()
            self.queue_ptr.copy_(self.queue_filled % size)
            return
        newest = (self.queue_ptr + torch.arange(old - size, old, device=self.queue.device)) % old
        self.queue = self.queue[:, newest].clone()
        self.queue_ptr.zero_()
        self.queue_filled.fill_(size)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Key features with the batch shuffled before the key encoder and restored after,
        so a key never shares its batch-norm statistics with its own query.

        Across processes (torchrun) this is the paper's shuffle-BN: the keys' images are
        gathered from all ranks, permuted by one shared permutation, encoded where they land,
        and sent back to their own rank in their original order.
        """
        rank, world = distributed.rank_and_size()
        n = images.shape[0]
        everything = distributed.gather(images)
        perm = distributed.shared_permutation(everything.shape[0], images.device)
        mine = everything[perm[rank * n:(rank + 1) * n]]
        if images.is_contiguous(memory_format=torch.channels_last):
            mine = mine.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, self.precision):
            encoded = self.encoder_k(mine)
        encoded = distributed.gather(F.normalize(encoded.float(), dim=1))
        restored = torch.empty_like(encoded)
        restored[perm] = encoded
        return restored[rank * n:(rank + 1) * n] if world > 1 else restored

    def queries(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 queries; the encoder (and v3's predictor) run in the run's precision."""
        with autocast(images.device, self.precision):
            q = self.encoder_q(images)
            if self.predictor is not None:
                q = self.predictor(q)
        return F.normalize(q.float(), dim=1)

    def info_nce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the positive among 1 + K logits; with batch negatives among the batch's
        keys and the queue's (the positive is the key of the same image); v3: the batch's keys only.
        Always float32, even inside a caller's autocast: a bf16 logit keeps only 3 significant digits."""
        with full_precision(q.device):
            return self._info_nce(q.float(), k.float())

    def _info_nce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.in_batch_negatives:
            rank, _ = distributed.rank_and_size()
            logits = q @ distributed.gather(k).T / self.temperature  # negatives from every rank
            labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
            # v3 scales by 2T so the gradient size does not depend on the temperature.
            return F.cross_entropy(logits, labels) * (2 * self.temperature)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        if self.queue_starts_empty:
            unfilled = torch.arange(l_neg.shape[1], device=q.device) >= self.queue_filled
            l_neg = l_neg.masked_fill(unfilled, float("-inf"))
        if self.batch_negatives:
            rank, _ = distributed.rank_and_size()
            l_batch = q @ distributed.gather(k).T
            labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
            logits = torch.cat([l_batch, l_neg], dim=1) / self.temperature
            return F.cross_entropy(logits, labels)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, m: float,
                small: torch.Tensor | None = None) -> torch.Tensor:
        """One training step's loss. The key encoder is updated first, with the query
        encoder as left by the previous optimizer step (the official order).

        `small` (multi-crop): C small crops per image, [C x N, 3, s, s] copy-major; they are
        queries only (one forward at their own size), each positive the key of a global view."""
        q1 = self.queries(view1)
        q2 = self.queries(view2) if self.symmetric else None
        with torch.no_grad():
            self.momentum_update(m)
            k2 = self.keys(view2)
            k1 = self.keys(view1) if self.symmetric else None
        if self.symmetric:
            loss = self.info_nce(q1, k2) + self.info_nce(q2, k1)
        else:
            loss = self.info_nce(q1, k2)
        if small is not None:
            loss = self.with_small_crops(loss, self.queries(small), k1, k2)
        # Every query has used the queue before anything is added to it.
        self.enqueue(distributed.gather(torch.cat([k1, k2]) if self.symmetric else k2))
        return loss

    def with_small_crops(self, global_loss: torch.Tensor, small_q: torch.Tensor, k1: torch.Tensor | None,
                         k2: torch.Tensor) -> torch.Tensor:
        """The loss as the mean over every query, global and small, in the global loss's scale
        (the symmetric loss is the sum of its two directions, so twice the mean).

        Each small crop's positive is the key of view 2, or with the symmetric loss both global
        keys, its two losses averaged (solo-learn's MoCo V2+ multi-crop); its negatives are
        those of a global query (the queue, the batch's keys). Keys never come from small crops."""
        crops = small_q.shape[0] // k2.shape[0]
        keys = [k1, k2] if self.symmetric else [k2]
        small_loss = sum(self.info_nce(q, k) for q in small_q.chunk(crops) for k in keys) / len(keys)
        global_queries = len(keys)  # per image: 2 with the symmetric loss, else 1
        return len(keys) * (global_loss + small_loss) / (global_queries + crops)
