"""Masked LPIPS (VGG16 trunk, v0.1 linear layers): the global-mode reconstruction loss.

The trunk is torchvision's VGG16 `features` (keys `features.N.*`, as in
`vgg16-397923af.pth`); the five 1x1 linear layers are the `lpips` package's v0.1 VGG
weights, which ship inside the package. Neither is read at construction.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models import vgg16

# VGG16 feature indices after which LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"


def lpips_linear_file() -> Path:
    """The v0.1 VGG linear-layer weights shipped by the `lpips` package."""
    import lpips
    return Path(os.path.dirname(lpips.__file__)) / "weights" / "v0.1" / "vgg.pth"


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


class MaskedLPIPS(nn.Module):
    """LPIPS distance per image, each layer's squared feature difference weighted by a mask.

    forward(x, y, mask) with x, y [N, 3, H, W] in [0, 1] and mask [N, 1, H, W] (or None)
    returns [N]. The mask is area-resized to each layer's size; every layer is averaged
    over its whole map (not normalised by the mask's area), as in the original.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.features = vgg16(weights=None).features[:TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(normalize_channels(x))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                y_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`y_features` (from `layer_features(y)`) may be passed to skip recomputing a fixed y."""
        fx = self.layer_features(x)
        fy = y_features if y_features is not None else self.layer_features(y)
        total = 0
        for a, b, lin in zip(fx, fy, self.lins):
            d = (a - b) ** 2
            if mask is not None:
                d = d * F.interpolate(mask, size=d.shape[-2:], mode="area")
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total
