"""Entanglement: what an edit did to the attributes it did not target.

The attribute classifier scores all 40 CelebA attributes at every call. An edit of
`smiling` should leave the other attributes where they were; the classic failure of
face editors is the one that does not ("adding eyeglasses changed the gender"). Per
edit, from the classifier's 40 probabilities on the input and on the result:

    entanglement       mean |p_result - p_input| over the other attributes, in [0, 1]
    unintended_flips   the other attributes whose probability crossed 0.5, by name

The other attributes are all 40 but the edit's targets and the attributes a target
implies by definition (IMPLIED below): CelebA labels those as mutually exclusive, so an
edit that reaches its target has to move them, and counting them would call every
successful hair-colour edit entangled. Nothing else is left out: `male` implies no
beard attribute, `young` no hair colour; those moving is exactly what this measures.

The classifier here is the one the edit optimised. Its scores on the attributes it was
not steered on are still evidence, but the same network's blind spots are in them; the
judge (models/judge.py) gives a second opinion on the targets.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from models.celeba import ATTRIBUTE_INDEX, ATTRIBUTES

HAIR_COLOURS = ("black_hair", "blond_hair", "brown_hair", "gray_hair")
HAIR_TEXTURES = ("straight_hair", "wavy_hair")


def _implied() -> dict[str, tuple[str, ...]]:
    implied: dict[str, set[str]] = {name: set() for name in ATTRIBUTES}
    for group in (HAIR_COLOURS, HAIR_TEXTURES):        # at most one of each group holds
        for name in group:
            implied[name] |= set(group) - {name}
    implied["bald"] |= {*HAIR_COLOURS, *HAIR_TEXTURES, "bangs"}   # no hair: none of these
    for beard in ("goatee", "mustache"):               # a beard is not "no beard"
        implied[beard].add("no_beard")
        implied["no_beard"].add(beard)
    return {name: tuple(sorted(others)) for name, others in implied.items() if others}


# attribute -> the attributes an edit of it moves by definition (docs/results.md's table)
IMPLIED: dict[str, tuple[str, ...]] = _implied()


def other_attributes(attributes: Sequence[str]) -> list[str]:
    """The attributes an edit of `attributes` should leave alone, in the classifier's order."""
    skip = set(attributes).union(*(IMPLIED.get(a, ()) for a in attributes))
    return [name for name in ATTRIBUTES if name not in skip]


def entanglement(prob_input, prob_result, attributes: Sequence[Sequence[str]]
                 ) -> tuple[list[float], list[list[str]]]:
    """Per row: the mean absolute change of the other attributes' probabilities, and the
    other attributes whose probability crossed 0.5 (either way). `prob_input` and
    `prob_result`: [n, 40] probabilities in the classifier's order (arrays or tensors)."""
    before, after = np.asarray(prob_input, dtype=np.float64), np.asarray(prob_result,
                                                                         dtype=np.float64)
    drift, flips = [], []
    for k, attrs in enumerate(attributes):
        idx = [ATTRIBUTE_INDEX[a] for a in other_attributes(attrs)]
        change = np.abs(after[k, idx] - before[k, idx])
        drift.append(float(change.mean()) if idx else 0.0)
        crossed = (after[k, idx] >= 0.5) != (before[k, idx] >= 0.5)
        flips.append([ATTRIBUTES[i] for i, c in zip(idx, crossed) if c])
    return drift, flips
