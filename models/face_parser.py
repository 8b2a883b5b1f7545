"""Face parser: DeepLabV3-ResNet50 with 9 face classes (the original `state.pt`).

The model returns class probabilities only. Which classes make up a mask (recon,
blend, shape, dynamic) is the editing engine's business, not state on this module.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models.segmentation import deeplabv3_resnet50

CLASSES: tuple[str, ...] = ("background", "mouth", "eyebrows", "eyes", "hair", "nose",
                            "skin", "ears", "belowface")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}


class FaceParser(nn.Module):
    """Images [N, 3, H, W] in [0, 1] -> class probabilities [N, 9, h, w].

    Args:
        working_size: the square size the network sees (512 for the real weights).
            Every input is area-resized to it, enlarged or shrunk, as in the original.

    The state-dict keys sit under `model.` as in the original checkpoint.
    """

    def __init__(self, working_size: int = 512):
        super().__init__()
        # weights_backbone=None: the default would download ImageNet weights here.
        self.model = deeplabv3_resnet50(weights=None, weights_backbone=None,
                                        num_classes=len(CLASSES), aux_loss=False)
        self.working_size = working_size

    def forward(self, images: torch.Tensor, out_size: int | tuple[int, int] | None = None,
                working_size: int | None = None) -> torch.Tensor:
        """Softmax class probabilities, bilinearly resized to `out_size`.

        out_size defaults to the input's own (H, W); pass the working size to keep the
        network's resolution (the shape mask does). `working_size` overrides the one
        given at construction for this call.
        """
        working_size = working_size or self.working_size
        size = (working_size, working_size)
        if out_size is None:
            out_size = tuple(images.shape[-2:])
        elif isinstance(out_size, int):
            out_size = (out_size, out_size)
        x = F.interpolate(images, size=size, mode="area") * 2 - 1
        probs = torch.softmax(self.model(x)["out"], dim=1)
        if tuple(out_size) != size:
            probs = F.interpolate(probs, size=out_size, mode="bilinear", align_corners=False)
        return probs


def region_masks(probs: torch.Tensor, regions: Sequence[Iterable[str]]) -> torch.Tensor:
    """Per-image soft masks: the sum of each image's own classes' probabilities.

    probs: [N, 9, h, w]; regions: N collections of class names (an empty one gives a
    zero mask). Returns [N, 1, h, w].
    """
    if len(regions) != probs.shape[0]:
        raise ValueError(f"{len(regions)} region sets for a batch of {probs.shape[0]}")
    select = probs.new_zeros(probs.shape[0], len(CLASSES))
    for n, classes in enumerate(regions):
        for c in classes:
            if c not in CLASS_INDEX:
                raise ValueError(f"unknown face region {c!r}; known: {', '.join(CLASSES)}")
            select[n, CLASS_INDEX[c]] = 1.0
    with torch.autocast(probs.device.type, enabled=False):     # masks stay in probs' dtype
        return torch.einsum("nc,nchw->nhw", select, probs).unsqueeze(1)
