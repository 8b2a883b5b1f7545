"""The original's resize rule, for images and for masks alike."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size] as the original resizes: area when shrinking,
    bilinear when enlarging (or when only one side shrinks)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
