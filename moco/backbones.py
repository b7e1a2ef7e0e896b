"""torchvision backbones with their classifier removed, so they output pooled features."""

from __future__ import annotations

from torch import nn
from torchvision import models

WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "vit_small": 384}


def build_backbone(arch: str, *, stem: str = "imagenet", image_size: int = 224) -> nn.Module:
    """A randomly initialised backbone mapping a normalized float batch to [N, width] features.

    No pretrained weights anywhere: self-supervised training starts from scratch, and the
    tool must work without a network connection.
    """
    if arch.startswith("resnet"):
        # zero_init_residual follows the official MoCo/torchvision ImageNet recipes.
        net = getattr(models, arch)(weights=None, zero_init_residual=True)
        if stem in ("small", "small_pool"):
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if stem == "small":
            net.maxpool = nn.Identity()
        # "small_pool" keeps the max-pool: the first stage runs at half the input's side, a
        # quarter of the small stem's arithmetic, for CPU budgets where steps are what is scarce.
        net.fc = nn.Identity()
        return net
    if arch == "vit_small":
        # ViT-S/16 as in the MoCo v3 paper: 12 layers, 6 heads, width 384.
        net = models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=12,
                                       num_heads=6, hidden_dim=384, mlp_dim=1536)
        net.heads = nn.Identity()
        return net
    raise ValueError(f"unknown arch {arch!r}")


def freeze_patch_projection(backbone: nn.Module) -> None:
    """MoCo v3's stability trick for ViT: a fixed random patch projection."""
    conv = getattr(backbone, "conv_proj", None)
    if conv is not None:
        for param in conv.parameters():
            param.requires_grad = False
