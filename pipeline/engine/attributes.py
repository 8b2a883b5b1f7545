"""The attribute table: which face regions an edit may touch, and how it is optimised.

Every classifier attribute (models.celeba.ATTRIBUTES) can be edited; the names are
checked in pipeline/engine/rows.py. The 14 local ones run the local schedule (mean-latent
start, masked MSE); every other attribute runs the global schedule (e4e start, masked
LPIPS), as in the original.
"""
from __future__ import annotations

from typing import Iterable

# The original edits these locally; it lists male, young and pale_skin as global, and
# every attribute not listed here is global too.
LOCAL_ATTRIBUTES = frozenset({
    "wearing_lipstick", "mouth_slightly_open", "smiling", "bushy_eyebrows", "arched_eyebrows",
    "narrow_eyes", "pointy_nose", "big_nose", "black_hair", "brown_hair", "blond_hair",
    "gray_hair", "wavy_hair", "straight_hair"})
HAIR_COLOURS = frozenset({"black_hair", "brown_hair", "blond_hair", "gray_hair"})
HAIR_SHAPES = frozenset({"wavy_hair", "straight_hair"})

_REGIONS = {
    "mouth": ("wearing_lipstick", "mouth_slightly_open", "smiling", "big_lips"),
    "eyebrows": ("bushy_eyebrows", "arched_eyebrows"),
    "eyes": ("narrow_eyes",),
    "nose": ("pointy_nose", "big_nose"),
    "hair": tuple(sorted(HAIR_COLOURS | HAIR_SHAPES)),
}
REGIONS: dict[str, tuple[str, ...]] = {a: (r,) for r, attrs in _REGIONS.items() for a in attrs}
DEFAULT_REGIONS = ("mouth", "eyebrows", "eyes", "hair", "nose", "ears")
# Global mode reconstructs and blends every class but the background.
GLOBAL_REGIONS = ("mouth", "eyebrows", "eyes", "hair", "nose", "skin", "ears", "belowface")


def regions(attributes: Iterable[str]) -> tuple[str, ...]:
    """The union of the attributes' edit regions, in a fixed order."""
    found = {r for a in attributes for r in REGIONS.get(a, DEFAULT_REGIONS)}
    return tuple(r for r in DEFAULT_REGIONS if r in found)


def is_local(attributes: Iterable[str]) -> bool:
    """A row is local only when every attribute is: any global one makes it global."""
    return all(a in LOCAL_ATTRIBUTES for a in attributes)


def has_hair(attributes: Iterable[str]) -> bool:
    return any(a in HAIR_COLOURS or a in HAIR_SHAPES for a in attributes)


def has_hair_shape(attributes: Iterable[str]) -> bool:
    return any(a in HAIR_SHAPES for a in attributes)
