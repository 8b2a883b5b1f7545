"""The four masks of MaskFaceGAN, made from face-parser probabilities.

    recon    where the generated image must match the input (local: the skin, plus the
             ears for hair-shape edits; global: every class but the background)
    blend    where the result takes the generated pixels (local: the edit regions, plus
             the skin with blend=include_skin; global: as recon)
    dynamic  the edit region as it grows, whose share of the image the size loss keeps
    shape    the edit region at the parser's working size, the seg loss's target

Masks are [N, 1, S, S] at the generator's size, except `shape` at the parser's. Each
image has its own classes (`MaskRegions`), so one batch mixes attributes freely.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from models.face_parser import region_masks

from . import attributes as attr_table
from .resize import resize
from .rows import EditRequest
from .settings import EditSettings


@dataclass(frozen=True)
class MaskRegions:
    """The parser classes each mask of one image is made of."""
    edit: tuple[str, ...]
    recon: tuple[str, ...]
    blend: tuple[str, ...]
    dynamic: tuple[str, ...]
    shape: tuple[str, ...]


def mask_regions(request: EditRequest, settings: EditSettings) -> MaskRegions:
    edit = attr_table.regions(request.attributes)
    ears = ("ears",) if attr_table.has_hair_shape(request.attributes) else ()
    if not settings.local:
        every = attr_table.GLOBAL_REGIONS
        return MaskRegions(edit=edit, recon=every, blend=every, dynamic=every, shape=edit + ears)
    skin = ("skin",) if (request.blend or settings.blend) == "include_skin" else ()
    return MaskRegions(edit=edit, recon=("skin",) + ears, blend=skin + edit + ears,
                       dynamic=edit, shape=edit + ears)


@dataclass(frozen=True)
class Masks:
    recon: torch.Tensor
    blend: torch.Tensor
    dynamic: torch.Tensor
    shape: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"recon": self.recon, "blend": self.blend, "dynamic": self.dynamic,
                "shape": self.shape}

    def take(self, rows: torch.Tensor) -> "Masks":
        return Masks(**{k: v[rows] for k, v in self.as_dict().items()})

    def put(self, rows: torch.Tensor, part: "Masks") -> "Masks":
        """These masks with `rows` replaced by `part`'s."""
        return Masks(**{k: v.index_copy(0, rows, getattr(part, k))
                        for k, v in self.as_dict().items()})


def upsample(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Parser-resolution masks to the generator's size (bilinear, as the original)."""
    if masks.shape[-1] == size:
        return masks
    return F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)


def edit_region(probs: torch.Tensor, regions: Sequence[MaskRegions], size: int) -> torch.Tensor:
    """Each image's edit region [N, 1, size, size] from parser probabilities."""
    return upsample(region_masks(probs, [r.edit for r in regions]), size)


def initial_masks(probs: torch.Tensor, regions: Sequence[MaskRegions], size: int) -> Masks:
    """The masks from the parser's probabilities on the input, [N, 9, P, P]."""
    def at(name: str) -> torch.Tensor:
        return region_masks(probs, [getattr(r, name) for r in regions])
    return Masks(recon=upsample(at("recon"), size), blend=upsample(at("blend"), size),
                 dynamic=upsample(at("dynamic"), size), shape=at("shape"))


def grow_masks(initial: Masks, current: Masks, probs: torch.Tensor,
               regions: Sequence[MaskRegions], update_shape: torch.Tensor) -> Masks:
    """Dynamic masking, after a step: the edit region the parser now sees on the generated
    image (`probs`) leaves the recon mask and joins the dynamic mask; rows with
    `update_shape` [N] (hair-shape edits) grow their shape mask too. Every mask is
    clamped to [0, 1], the blend mask included, as the original clamps all of them."""
    with torch.no_grad():
        grown = edit_region(probs.detach(), regions, initial.recon.shape[-1])
        shape = (initial.shape + resize(grown, initial.shape.shape[-1])).clamp_(0, 1)
        return replace(
            current,
            recon=(initial.recon - grown).clamp_(0, 1),
            dynamic=(initial.dynamic + grown).clamp_(0, 1),
            shape=torch.where(update_shape.view(-1, 1, 1, 1), shape, current.shape.clamp(0, 1)),
            blend=current.blend.clamp(0, 1))


def blend(x: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The result: the generated pixels where the blend mask is 1, the input's where it is
    0. Written as x + mask * (generated - x), which equals mask * generated + (1 - mask) * x
    and gives back the input bit for bit where the mask is exactly 0."""
    return x + mask * (generated - x)
