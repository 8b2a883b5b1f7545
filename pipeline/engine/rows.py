"""The edit row: every rule about what one edit may ask, written once.

A row names an image, the attributes to push and their targets, and optional per-row
options. `EditRequest` (what the engine takes), the manifest validator
(`manifests/schema.py`), the edit settings (`pipeline/engine/settings.py`) and the command line
all check values with the rules below, so a value means the same thing everywhere.

    attributes   names from models.celeba.ATTRIBUTES (the 40 CelebA attributes),
                 each at most once, at least one
    targets      one number in [0, 1] per attribute; the classifier aims at
                 |target - smoothing|
    size         >= 0: the edit region's size relative to the input's (0: no size loss)
    smoothing    in [0, 1), or null for the edit settings' value
    seed         an integer; draws the image's noise maps; default: a stable hash of the id
    mode         auto (from the attributes), local or global
    blend        include_skin or no_skin, or null for the edit settings' value

An edit is on target for an attribute when the classifier's probability of it ends on
the target's side of 0.5 (`on_target`): the rule early stopping, summary.json, the
report and the export all use.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import numbers
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from models.celeba import ATTRIBUTE_INDEX, ATTRIBUTES
from pipeline.errors import RowError, clip

TARGET_RANGE = (0.0, 1.0)
MODES = ("auto", "local", "global")
BLENDS = ("include_skin", "no_skin")
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,200}")

# The manifest's own columns; any other column passes through to the metrics.
REQUIRED_COLUMNS = ("id", "image_uri", "attributes", "targets")
OPTIONAL_COLUMNS = ("size", "smoothing", "seed", "mode", "blend")
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


def is_null(value: Any) -> bool:
    """None or NaN: how a missing optional value arrives from Parquet or pandas."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def passthrough_columns(columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c not in MANIFEST_COLUMNS]


def default_seed(row_id: str) -> int:
    """A stable seed from the id, so a rerun of a row draws the same noise."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def safe_stem(path: str) -> str:
    """A file's stem made safe as an id or a file name: 'dir/My photo.jpg' -> 'My_photo'."""
    name = posixpath.basename(path.split("?")[0].rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.splitext(name)[0]).lstrip(".") or "image"


def unique_stems(paths: Iterable[str]) -> list[str]:
    """safe_stem of each path, made unique in order: x, x-1, x-2, ..."""
    names, seen = [], set()
    for path in paths:
        stem = name = safe_stem(path)
        n = 0
        while name in seen:
            n += 1
            name = f"{stem}-{n}"
        seen.add(name)
        names.append(name)
    return names


def target_side(target):
    """True where a target asks for the attribute (>= 0.5), False where it asks for its
    absence. Works on numbers, arrays, tensors and pandas Series alike."""
    return target >= 0.5


def on_target(prob, target):
    """The result's probability is on the target's side of 0.5 (element-wise)."""
    return (prob >= 0.5) == target_side(target)


# -- one rule per value: each returns what is wrong, or None ------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _plain(value: Any) -> Any:
    """A value as its writer wrote it: Parquet and pandas hand numpy arrays and scalars
    (`array([], dtype=object)`, `np.float64(nan)`), which a message shows as lists and
    plain numbers."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(value: Any, limit: int = 120) -> str:
    """A value for a message, as written, clipped: a hostile manifest may hold huge values."""
    return clip(repr(_plain(value)), limit)


def id_problem(row_id: Any) -> str | None:
    if isinstance(row_id, str) and ID_PATTERN.fullmatch(row_id) and not row_id.startswith("."):
        return None
    return f"unsafe id {_short(row_id)} (1-200 of A-Z a-z 0-9 . _ -, not starting with '.')"


def _as_list(value: Any) -> list | None:
    """A list, tuple or 1-d array (how Parquet list columns arrive) as a list."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return list(value)
    return None


def attributes_problem(attributes: Any) -> str | None:
    names = _as_list(attributes)
    if not names:
        return f"attributes must be a non-empty list of names, got {_short(attributes)}"
    if len(names) > len(ATTRIBUTES):
        return f"{len(names)} attributes listed; there are only {len(ATTRIBUTES)}"
    unknown = [a for a in names if a not in ATTRIBUTE_INDEX]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), ATTRIBUTES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown attribute(s) {_short(unknown)}{hint}"
    if len(set(names)) != len(names):
        return f"an attribute is listed twice: {_short(names)}"
    return None


def targets_problem(targets: Any, n_attributes: int | None) -> str | None:
    values = _as_list(targets)
    if values is None:
        return f"targets must be a list of numbers, got {_short(targets)}"
    if len(values) > len(ATTRIBUTES):
        return f"{len(values)} targets listed; there are only {len(ATTRIBUTES)} attributes"
    if n_attributes is not None and len(values) != n_attributes:
        return f"{n_attributes} attributes but {len(values)} targets"
    low, high = TARGET_RANGE
    bad = [t for t in values if not _number(t) or not low <= t <= high]
    if bad:
        return f"targets must be numbers in [{low:g}, {high:g}], got {_short(bad)}"
    return None


def size_problem(size: Any) -> str | None:
    if _number(size) and math.isfinite(size) and size >= 0:
        return None
    return f"size must be a number >= 0, got {_short(size)}"


def smoothing_problem(smoothing: Any) -> str | None:
    if _number(smoothing) and 0 <= smoothing < 1:
        return None
    return f"smoothing must be in [0, 1), got {_short(smoothing)}"


def seed_problem(seed: Any) -> str | None:
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return None
    if isinstance(seed, float) and seed.is_integer():
        return None
    return f"seed must be an integer, got {_short(seed)}"


def choice_problem(name: str, value: Any, allowed: Sequence[str]) -> str | None:
    if value in allowed:
        return None
    return f"{name} must be one of {', '.join(allowed)}, got {_short(value)}"


def row_problems(row: Mapping[str, Any]) -> list[str]:
    """Everything wrong with one row (a manifest row or a request); optional values that
    are absent or null are not checked."""
    attributes = _as_list(row.get("attributes"))
    problems = [attributes_problem(row.get("attributes"))]
    n = len(attributes) if attributes is not None and problems[0] is None else None
    problems.append(targets_problem(row.get("targets"), n))
    optional = {"size": size_problem, "smoothing": smoothing_problem, "seed": seed_problem,
                "mode": lambda v: choice_problem("mode", v, MODES),
                "blend": lambda v: choice_problem("blend", v, BLENDS)}
    for name, rule in optional.items():
        if not is_null(row.get(name)):
            problems.append(rule(row[name]))
    return [p for p in problems if p is not None]


@dataclass(frozen=True)
class EditRequest:
    """What to do to one image (see the module doc for each field). Invalid values raise
    RowError (a ValueError) naming every problem."""
    attributes: tuple[str, ...]
    targets: tuple[float, ...]
    size: float = 0.0
    smoothing: float | None = None
    blend: str | None = None
    mode: str | None = None
    seed: int = 0

    def __post_init__(self):
        problems = row_problems(self.__dict__)
        if problems:
            raise RowError("; ".join(problems))
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "targets", tuple(float(t) for t in self.targets))
        object.__setattr__(self, "size", float(self.size))
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "EditRequest":
        """From a validated manifest row (nulls mean 'the settings' value')."""
        def opt(name):
            value = row.get(name)
            return None if is_null(value) else value
        return cls(tuple(row["attributes"]), tuple(row["targets"]),
                   size=float(opt("size") or 0.0), smoothing=opt("smoothing"),
                   blend=opt("blend"), mode=opt("mode"), seed=int(row["seed"]))
