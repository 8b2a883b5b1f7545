"""The manifest: one Parquet row per edit, validated before any work.

The columns and the rules for their values are pipeline/engine/rows.py's:
  id          unique, 1-200 characters of [A-Za-z0-9._-], not starting with '.'; names the outputs
  image_uri   fsspec URI, or a path relative to the manifest's own location
  attributes  list of attribute names (models.celeba.ATTRIBUTES)
  targets     list of floats in [0, 1], as long as `attributes`
Optional columns: size (>= 0), smoothing ([0, 1)), seed (int; default: a stable hash of
the id), mode (auto/local/global), blend (include_skin/no_skin). Any other column passes
through unchanged to the metrics output (`align_quad`, from `--align`, must be 8 finite
numbers or null).

The Parquet metadata may record the folders the rows' inputs were found in
(`maskface.input_roots`, a JSON list of folder URIs: `write_manifest`'s `input_roots`);
without `inputs.allow` a job reads only under the manifest's folder and those.

One driver holds a whole manifest in memory: a manifest over MAX_ROWS rows or MAX_BYTES
bytes of Parquet is refused before it is read, with the way to shard it.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import MAX_ECHO, MAX_MESSAGE, clip
from pipeline.store.storage import filesystem, write_bytes
from pipeline.store.uris import redact, resolve_uri
from pipeline.engine.rows import REQUIRED_COLUMNS, default_seed, id_problem, is_null, row_problems

SHOWN = 20
MAX_ROWS = 1_000_000             # rows one driver takes (about 1 GB of driver memory)
MAX_BYTES = 1 << 30              # Parquet bytes one driver reads
SHARD_HINT = ("split it into shards and run one job per shard (they may share one output): "
              "`maskface manifest ... --shard i/n` builds shard i of n")


class ManifestError(ValueError):
    """A manifest that cannot run; the message lists every offending row."""


@dataclass
class Manifest:
    """Validated rows (defaults filled, image URIs resolved), the file's Arrow schema,
    whose types the passthrough columns keep in the metrics, and every row's id in order.
    `rows` leaves out the rows read_manifest was told are complete: `ids` has them too."""
    rows: pd.DataFrame
    schema: pa.Schema
    ids: list[str]


def _problems(row: Mapping[str, Any]) -> list[str]:
    """What is wrong with a row's values (its id is checked apart)."""
    uri = row["image_uri"]
    problems = []
    if not isinstance(uri, str) or not uri.strip():
        problems.append(f"image_uri must be a non-empty string, got {clip(repr(uri))}")
    if "align_quad" in row:
        problems.append(_quad_problem(row["align_quad"]))
    return [p for p in problems if p] + row_problems(row)


def _quad_problem(quad: Any) -> str | None:
    if quad is None or (isinstance(quad, float) and math.isnan(quad)):
        return None
    try:
        values = [float(v) for v in quad]
    except (TypeError, ValueError):
        return "align_quad must be a list of 8 numbers"
    if len(values) != 8 or not all(math.isfinite(v) for v in values):
        return f"align_quad must be 8 finite numbers, got {len(values)} values"
    return None


def validate(table: pa.Table | pd.DataFrame, manifest_uri: str | None = None,
             complete: Collection[str] = frozenset()) -> pd.DataFrame:
    """Check every row; return the rows with defaults filled and image URIs resolved.

    Rows whose id is in `complete` (done in the output already: a run does not redo them)
    have only their ids checked, and are left out of what is returned.
    Raises ManifestError listing every problem (the first 20 rows, then a count).
    """
    df = table.to_pandas() if isinstance(table, pa.Table) else table.copy()
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest has no column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    problems: list[tuple[int, str, str]] = []
    counts = df["id"].value_counts()
    duplicated = set(counts[counts > 1].index)
    for index, row_id in enumerate(df["id"]):
        reason = id_problem(row_id)
        if reason is None and row_id in duplicated:
            reason = f"duplicate id (appears {counts[row_id]} times)"
        if reason:
            problems.append((index, row_id, reason))
    todo = np.fromiter((i not in complete for i in df["id"]), dtype=bool, count=len(df))
    df = df[todo]
    for index, row in zip(np.flatnonzero(todo), df.to_dict("records")):
        problems.extend((index, row["id"], reason) for reason in _problems(row))
    if problems:
        raise ManifestError(_problems_message(problems))
    return _with_defaults(df, manifest_uri)


def _problems_message(problems: list[tuple[int, Any, str]]) -> str:
    """A line per problem of the first SHOWN rows, or of fewer when their lines would pass
    MAX_MESSAGE (each id and value quoted clipped: a hostile manifest must not make a
    megabyte-long error), then a count of the rows left unsaid."""
    problems = sorted(problems, key=lambda p: p[0])
    total = Counter(p[0] for p in problems)
    lines = [f"{len(total)} manifest row(s) cannot run:"]
    size, said = len(lines[0]), Counter[int]()
    for i, rid, reason in problems:
        line = f"row {i} (id {clip(repr(rid), 100)}): {clip(reason)}"
        if ((i not in said and len(said) == SHOWN)
                or size + 1 + len(line) > MAX_MESSAGE - 32):
            break
        lines.append(line)
        size += 1 + len(line)
        said[i] += 1
    unsaid = len(total) - sum(1 for i, n in said.items() if n == total[i])
    more = f"\n... and {unsaid} more row(s)" if unsaid else ""
    return "\n".join(lines) + more


def _with_defaults(df: pd.DataFrame, manifest_uri: str | None) -> pd.DataFrame:
    df["attributes"] = df["attributes"].map(list)
    df["targets"] = df["targets"].map(lambda ts: [float(t) for t in ts])
    df["image_uri"] = df["image_uri"].map(lambda u: resolve_uri(u, manifest_uri))
    defaults = {"size": 0.0, "smoothing": None, "mode": "auto", "blend": None}
    for col, value in defaults.items():
        if col not in df.columns:
            df[col] = value
        else:
            df[col] = df[col].astype(object).where(~df[col].isna(), value)
    if "seed" not in df.columns:
        df["seed"] = None
    df["seed"] = [default_seed(i) if is_null(s) else int(s) for i, s in zip(df["id"], df["seed"])]
    df["size"] = df["size"].astype(float)
    return df


def read_manifest(uri: str, storage_options: Mapping | None = None, max_rows: int = MAX_ROWS,
                  max_bytes: int = MAX_BYTES, complete: Collection[str] = frozenset()) -> Manifest:
    """Read and validate a Parquet manifest (a file or a folder of files). One over
    `max_rows` rows or `max_bytes` bytes is refused from its sizes before it is read.
    The rows whose ids are in `complete` have their ids checked, not their values: a
    resumed run does not redo them, and a million of them would take a minute."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {redact(uri, MAX_ECHO)}")
    try:
        _check_size(uri, fs, path, max_rows, max_bytes)
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{redact(uri, MAX_ECHO)}: not a readable Parquet manifest "
                            f"({redact(str(e), MAX_ECHO)})") from None
    base = uri if not fs.isdir(path) else uri.rstrip("/") + "/"
    return Manifest(validate(table, base, complete), table.schema,
                    table.column("id").to_pylist())


def _check_size(uri: str, fs, path: str, max_rows: int, max_bytes: int) -> None:
    """Refuse a manifest too big for one driver, from its file sizes and Parquet footers."""
    files = ([f for f in fs.find(path) if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
             if fs.isdir(path) else [path])
    size = sum(fs.size(f) for f in files)
    if size > max_bytes:
        raise ManifestError(f"{redact(uri, MAX_ECHO)}: {size:,} bytes of Parquet, over the "
                            f"limit of {max_bytes:,} for one driver; {SHARD_HINT}")
    rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    if rows > max_rows:
        raise ManifestError(f"{redact(uri, MAX_ECHO)}: {rows:,} rows, over the limit of "
                            f"{max_rows:,} for one driver; {SHARD_HINT}")


def write_manifest(df: pd.DataFrame, uri: str, storage_options: Mapping | None = None,
                   input_roots: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Validate, then write a Parquet manifest to any URI, whole or not at all (its folder
    made as needed). `input_roots`: the folders the rows' inputs were found in (a
    builder's --images, --aligned-out), recorded in the Parquet metadata: without
    inputs.allow a job reads only under the manifest's folder and these, so the
    layouts the builders make run as they are (pipeline/runner/access.py)."""
    validate(df)
    table = pa.Table.from_pandas(df, preserve_index=False)
    roots = list(input_roots)
    if roots:
        # here, not at the top: the runner's module brings torch, which reading and
        # validating manifests do not need
        from pipeline.runner.access import roots_metadata
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **roots_metadata(roots)})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue().to_pybytes(), storage_options)
