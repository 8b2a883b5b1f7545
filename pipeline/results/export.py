"""An output as a dataset a training loop loads directly.

    export_output(output_uri, "hf-parquet", dest)
        dest/data/train-00000-of-0000N.parquet     the Hugging Face `datasets` layout
    export_output(output_uri, "imagefolder", dest)
        dest/train/<id>.png, dest/train/metadata.jsonl   the ImageFolder convention

hf-parquet: `image` is a struct {bytes, path}, as the `datasets` Image feature stores
it, and the schema metadata records that feature, so `load_dataset("parquet", ...)`
decodes it as an image. imagefolder: `file_name` in metadata.jsonl names each image.
Both carry, per row: the id, `source_uri`, `input_uri`, the manifest's passthrough
labels (`attr_*`), `labels_after`, `reached_target`, and the metrics columns.

`labels_after` (a struct with one field per label: the `attr_<name>` names without
the prefix, plus any edited attribute without a label column), per row:
    - an edited attribute whose result is on its target's side of 0.5: the target
      (1 when target >= 0.5, else 0);
    - an edited attribute that did not reach its target: null, unknown (the label it
      had may no longer hold, and the edit did not give it the new one);
    - an attribute the row did not edit: its passthrough label (null without one);
    - a failed row (status error): no edited image, `labels_after` null as a whole.
`reached_target`: every edited attribute on target (null on failed rows).

Rows: hf-parquet keeps every row, failed ones with a null image, so the export
accounts for the whole output; imagefolder keeps the rows with an edited image.
`only_successful` keeps only rows that finished and reached every target.
"""
from __future__ import annotations

import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.rows import on_target, target_side
from pipeline.job.ledger import OK
from pipeline.job.outputs import METRICS_SCHEMA, Output

log = logging.getLogger(__name__)

FORMATS = ("hf-parquet", "imagefolder")
SPLIT = "train"
SHARD_ROWS = 1000          # rows per Parquet file (images inline: ~1000 x 1 MB at 1024 px)
LABEL_PREFIX = "attr_"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}}}}


@dataclass
class ExportResult:
    dest: str
    rows: int
    files: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)   # (id, reason): left out


def label_names(metrics: pd.DataFrame) -> list[str]:
    """The labels of `labels_after`: the attr_* columns, then edited attributes without one."""
    names = [c[len(LABEL_PREFIX):] for c in metrics.columns if c.startswith(LABEL_PREFIX)]
    edited = {a for attrs in metrics["attributes"] for a in attrs} if len(metrics) else set()
    return names + sorted(edited - set(names))


def labels_after(row: Mapping[str, Any], names: list[str]) -> tuple[dict | None, bool | None]:
    """(labels_after, reached_target) of one metrics row, by the rule in the module doc."""
    if row["status"] != OK:
        return None, None
    labels: dict[str, int | None] = {}
    for name in names:
        value = row.get(LABEL_PREFIX + name)
        labels[name] = None if value is None or pd.isna(value) else int(value)
    reached = True
    for a, t, p in zip(row["attributes"], row["targets"], row["prob_result"]):
        hit = on_target(p, t)
        labels[a] = int(target_side(t)) if hit else None
        reached = reached and bool(hit)
    return labels, reached


def export_rows(metrics: pd.DataFrame, fmt: str, only_successful: bool) -> pd.DataFrame:
    """The rows to export, sorted by id, with labels_after and reached_target."""
    names = label_names(metrics)
    rows = metrics.sort_values("id").reset_index(drop=True)
    pairs = [labels_after(r, names) for r in rows.to_dict("records")]
    rows["labels_after"] = [p[0] for p in pairs]
    rows["reached_target"] = pd.array([p[1] for p in pairs], dtype="boolean")
    keep = rows["status"] == OK if fmt == "imagefolder" else pd.Series(True, index=rows.index)
    if only_successful:
        keep &= (rows["status"] == OK) & rows["reached_target"].fillna(False).astype(bool)
    return rows[keep].reset_index(drop=True)


def _schema(rows: pd.DataFrame, names: list[str]) -> pa.Schema:
    """image, the keys and labels first, then every metrics column, typed as the metrics
    files type them (passthrough columns as pandas infers them)."""
    known = {f.name: f for f in METRICS_SCHEMA}
    first = ["id", "source_uri", "input_uri"]
    labels = [c for c in rows.columns if c.startswith(LABEL_PREFIX)]
    rest = [c for c in rows.columns
            if c not in first + labels + ["labels_after", "reached_target"]]
    inferred = pa.Schema.from_pandas(rows[[c for c in labels + rest if c not in known]],
                                     preserve_index=False)
    fields = [pa.field("image", IMAGE_TYPE)]
    for c in first + labels:
        fields.append(known[c] if c in known else inferred.field(c))
    fields.append(pa.field("labels_after", pa.struct([(n, pa.int8()) for n in names])))
    fields.append(pa.field("reached_target", pa.bool_()))
    fields += [known[c] if c in known else inferred.field(c) for c in rest]
    return pa.schema(fields, metadata={"huggingface": json.dumps(HF_FEATURES)})


def _read_images(rows: pd.DataFrame, storage_options: Mapping | None
                 ) -> list[bytes | str | None]:
    """Each row's edited PNG bytes; None for failed rows; the reason for unreadable ones."""
    def read(uri):
        if not isinstance(uri, str):
            return None
        try:
            with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
                return f.read()
        except Exception as e:
            return f"edited image {uri}: {type(e).__name__}: {e}"
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(read, rows["edited_uri"]))


def _write_parquet(site: Output, rows: pd.DataFrame, schema: pa.Schema,
                   storage_options: Mapping | None, result: ExportResult) -> None:
    shards = max(math.ceil(len(rows) / SHARD_ROWS), 1)
    for k in range(shards):
        part = rows.iloc[k * SHARD_ROWS:(k + 1) * SHARD_ROWS].copy()
        images = _read_images(part, storage_options)
        bad = [(rid, d) for rid, d in zip(part["id"], images) if isinstance(d, str)]
        result.missing += bad
        part["image"] = [{"bytes": d, "path": f"{rid}.png"} if isinstance(d, bytes) else None
                         for rid, d in zip(part["id"], images)]
        part = part[~part["id"].isin({rid for rid, _ in bad})]
        table = pa.Table.from_pandas(part[schema.names], schema=schema, preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=100)
        rel = f"data/{SPLIT}-{k:05d}-of-{shards:05d}.parquet"
        site.put(rel, buf.getvalue())
        result.files.append(f"{site.uri}/{rel}")
        result.rows += len(part)


def _json_value(value: Any) -> Any:
    """A metrics value as JSON: arrays as lists, NaN and infinities as null."""
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return None if value is pd.NA or value is pd.NaT else value


def _write_imagefolder(site: Output, rows: pd.DataFrame, storage_options: Mapping | None,
                       result: ExportResult) -> None:
    lines = []
    for start in range(0, len(rows), SHARD_ROWS):
        part = rows.iloc[start:start + SHARD_ROWS]
        for row, data in zip(part.to_dict("records"), _read_images(part, storage_options)):
            if not isinstance(data, bytes):
                result.missing.append((row["id"], str(data)))
                continue
            site.put(f"{SPLIT}/{row['id']}.png", data)
            lines.append(json.dumps({"file_name": f"{row['id']}.png",
                                     **{k: _json_value(v) for k, v in row.items()}}))
    site.put(f"{SPLIT}/metadata.jsonl", ("\n".join(lines) + "\n").encode())
    result.files.append(f"{site.uri}/{SPLIT}/metadata.jsonl")
    result.rows = len(lines)


def export_output(output_uri: str, fmt: str, dest: str, only_successful: bool = False,
                  storage_options: Mapping | None = None) -> ExportResult:
    """Export the output's metrics rows and edited images (see the module doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    out = Output(output_uri, storage_options)
    if not out.metrics_files():
        raise FileNotFoundError(f"no metrics under {output_uri}: nothing to export")
    metrics = out.read_metrics()
    clash = sorted({"image", "labels_after", "reached_target", "file_name"} & set(metrics.columns))
    if clash:
        raise ValueError(f"the output's metrics have column(s) {clash}, which the export "
                         "writes itself; rename them in the manifest")
    rows = export_rows(metrics, fmt, only_successful)
    site = Output(dest, storage_options)
    result = ExportResult(dest=site.uri, rows=0)
    if fmt == "hf-parquet":
        _write_parquet(site, rows, _schema(rows, label_names(metrics)), storage_options, result)
    else:
        _write_imagefolder(site, rows, storage_options, result)
    for rid, why in result.missing:
        log.warning("export: row %s left out: %s", rid, why)
    return result
