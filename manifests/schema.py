"""The manifest: one Parquet row per edit. The one schema and validator of the project.

Required columns:
  id          unique, 1-200 characters of [A-Za-z0-9._-], not starting with '.'; names the outputs
  image_uri   fsspec URI, or a path relative to the manifest's own location
  attributes  list of attribute names (models.classifier.ATTRIBUTES)
  targets     list of floats in [0, 1], as long as `attributes`
Optional columns: size (>= 0), smoothing ([0, 1)), seed (int; default: a stable hash of
the id), mode (auto/local/global), blend (include_skin/no_skin). Any other column passes
through unchanged to the metrics output.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import posixpath
import re
from typing import Any, Mapping

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.classifier import ATTRIBUTE_INDEX

REQUIRED = ("id", "image_uri", "attributes", "targets")
OPTIONAL = ("size", "smoothing", "seed", "mode", "blend")
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,200}")
MODES = ("auto", "local", "global")
BLENDS = ("include_skin", "no_skin")
SHOWN = 20


class ManifestError(ValueError):
    """A manifest that cannot run; the message lists every offending row."""


def default_seed(row_id: str) -> int:
    """A stable seed from the id, so a rerun of a row draws the same noise."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def resolve_image_uri(uri: str, manifest_uri: str | None) -> str:
    if manifest_uri is None or "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.join(posixpath.dirname(manifest_uri), uri)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_problems(row: Mapping[str, Any], columns) -> list[str]:
    out = []
    rid = row["id"]
    if not isinstance(rid, str) or not ID_PATTERN.fullmatch(rid) or rid.startswith("."):
        out.append(f"unsafe id {rid!r} (1-200 of A-Z a-z 0-9 . _ -, not starting with '.')")
    uri = row["image_uri"]
    if not isinstance(uri, str) or not uri.strip():
        out.append(f"image_uri must be a non-empty string, got {uri!r}")
    attrs, targets = row["attributes"], row["targets"]
    attrs = list(attrs) if attrs is not None and not isinstance(attrs, str) else attrs
    targets = list(targets) if targets is not None and not isinstance(targets, str) else targets
    if not isinstance(attrs, list) or not attrs:
        out.append(f"attributes must be a non-empty list, got {row['attributes']!r}")
    else:
        unknown = [a for a in attrs if a not in ATTRIBUTE_INDEX]
        if unknown:
            out.append(f"unknown attribute(s) {unknown}")
        if len(set(attrs)) != len(attrs):
            out.append(f"an attribute is listed twice: {attrs}")
    if not isinstance(targets, list):
        out.append(f"targets must be a list of numbers, got {row['targets']!r}")
    else:
        if isinstance(attrs, list) and len(targets) != len(attrs):
            out.append(f"{len(attrs)} attributes but {len(targets)} targets")
        bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, numbers.Real)
               or not 0 <= t <= 1]
        if bad:
            out.append(f"targets must be numbers in [0, 1], got {bad}")
    if "size" in columns and not _is_null(row["size"]):
        s = row["size"]
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s < 0:
            out.append(f"size must be a number >= 0, got {s!r}")
    if "smoothing" in columns and not _is_null(row["smoothing"]):
        s = row["smoothing"]
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1:
            out.append(f"smoothing must be in [0, 1), got {s!r}")
    if "seed" in columns and not _is_null(row["seed"]):
        s = row["seed"]
        if isinstance(s, bool) or not (isinstance(s, numbers.Integral) or
                                       (isinstance(s, float) and s.is_integer())):
            out.append(f"seed must be an integer, got {s!r}")
    for col, allowed in (("mode", MODES), ("blend", BLENDS)):
        if col in columns and not _is_null(row[col]) and row[col] not in allowed:
            out.append(f"{col} must be one of {', '.join(allowed)}, got {row[col]!r}")
    return out


def validate(table: pa.Table | pd.DataFrame, manifest_uri: str | None = None) -> pd.DataFrame:
    """Check every row; return the rows with defaults filled and image URIs resolved.

    Raises ManifestError listing every problem (the first 20 rows, then a count).
    """
    df = table.to_pandas() if isinstance(table, pa.Table) else table.copy()
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest has no column(s) {missing}; required: {list(REQUIRED)}")
    problems: list[tuple[int, str, str]] = []
    counts = df["id"].value_counts()
    duplicated = set(counts[counts > 1].index)
    for index, row in enumerate(df.to_dict("records")):
        reasons = _row_problems(row, df.columns)
        if row["id"] in duplicated:
            reasons.append(f"duplicate id (appears {counts[row['id']]} times)")
        for reason in reasons:
            problems.append((index, row["id"], reason))
    if problems:
        rows = sorted({p[0] for p in problems})
        lines = [f"row {i} (id {rid!r}): {reason}" for i, rid, reason in problems
                 if i in set(rows[:SHOWN])]
        more = f"\n... and {len(rows) - SHOWN} more row(s)" if len(rows) > SHOWN else ""
        raise ManifestError(f"{len(rows)} manifest row(s) cannot run:\n" + "\n".join(lines) + more)

    df["attributes"] = df["attributes"].map(list)
    df["targets"] = df["targets"].map(lambda ts: [float(t) for t in ts])
    df["image_uri"] = df["image_uri"].map(lambda u: resolve_image_uri(u, manifest_uri))
    defaults = {"size": 0.0, "smoothing": None, "mode": "auto", "blend": None}
    for col, value in defaults.items():
        if col not in df.columns:
            df[col] = value
        else:
            df[col] = df[col].astype(object).where(~df[col].isna(), value)
    if "seed" not in df.columns:
        df["seed"] = None
    df["seed"] = [default_seed(i) if _is_null(s) else int(s) for i, s in zip(df["id"], df["seed"])]
    df["size"] = df["size"].astype(float)
    return df


def passthrough_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in REQUIRED + OPTIONAL]


def read_manifest(uri: str, storage_options: Mapping | None = None) -> pd.DataFrame:
    """Read and validate a Parquet manifest (a file or a folder of files)."""
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{uri}: not a readable Parquet manifest ({e})") from None
    base = uri if not fs.isdir(path) else uri.rstrip("/") + "/"
    return validate(table, base)


def write_manifest(df: pd.DataFrame, uri: str, storage_options: Mapping | None = None) -> None:
    """Validate, then write a Parquet manifest to any fsspec URI."""
    validate(df)
    with fsspec.open(uri, "wb", **dict(storage_options or {})) as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)
