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
`only_successful` keeps only rows that finished and reached every target (by the
classifier the edit optimised: filter on `judge_on_target` too when the models had a
judge). `reviewed` (a person's verdicts, pipeline/results/review.py) keeps only the
rows they accepted; `ExportResult.not_accepted` counts the others by why.
"""
from __future__ import annotations

import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.rows import on_target, target_side
from pipeline.output.layout import Output
from pipeline.output.ledger import OK
from pipeline.output.metrics import iter_metrics, metrics_paths, metrics_schema, read_metrics
from pipeline.store.storage import read_many
from pipeline.results.review import ACCEPT

log = logging.getLogger(__name__)

FORMATS = ("hf-parquet", "imagefolder")
SPLIT = "train"
SHARD_ROWS = 1000          # rows per Parquet file (images inline: ~1000 x 1 MB at 1024 px)
WRITERS = 16               # imagefolder: images written at once
LABEL_PREFIX = "attr_"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}}}}


@dataclass
class ExportResult:
    dest: str
    rows: int                                    # written
    selected: int = 0                            # chosen to export (rows whose image is
    files: list[str] = field(default_factory=list)  # missing are left out of `rows`)
    missing: list[tuple[str, str]] = field(default_factory=list)   # (id, reason): left out
    not_accepted: dict[str, int] = field(default_factory=dict)     # with `reviewed`: rows
                                                   # left out, by verdict or "not reviewed"


def label_names(columns: Iterable[str], attributes: Iterable[Iterable[str]]) -> list[str]:
    """The labels of `labels_after`: the attr_* columns, then edited attributes without one."""
    names = [c[len(LABEL_PREFIX):] for c in columns if c.startswith(LABEL_PREFIX)]
    edited = {a for attrs in attributes for a in attrs}
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


def with_labels(rows: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The rows with labels_after and reached_target (the rule in the module doc)."""
    pairs = [labels_after(r, names) for r in rows.to_dict("records")]
    return rows.assign(labels_after=[p[0] for p in pairs],
                       reached_target=pd.array([p[1] for p in pairs], dtype="boolean"))


def exported_ids(rows: pd.DataFrame, fmt: str, only_successful: bool) -> set[str]:
    """Which rows an export keeps: every row (hf-parquet) or those with an image
    (imagefolder); with only_successful, those that reached every target."""
    keep = rows["status"] == OK if fmt == "imagefolder" else pd.Series(True, index=rows.index)
    if only_successful:
        reached = [labels_after(r, [])[1] for r in rows.to_dict("records")]
        keep &= (rows["status"] == OK) & pd.Series([bool(x) for x in reached], index=rows.index)
    return set(rows.loc[keep, "id"])


def accepted_only(keep: set[str], verdicts: Mapping[str, str]) -> tuple[set[str], dict[str, int]]:
    """The rows of `keep` a reviewer accepted, and the others counted by why: their
    verdict (reject, unsure) or "not reviewed"."""
    left: dict[str, int] = {}
    for rid in keep:
        verdict = verdicts.get(rid, "not reviewed")
        if verdict != ACCEPT:
            left[verdict] = left.get(verdict, 0) + 1
    return {rid for rid in keep if verdicts.get(rid) == ACCEPT}, left


def _schema(columns: pa.Schema, names: list[str]) -> pa.Schema:
    """image, the keys and labels first, then every metrics column, typed as the metrics
    files type them (passthrough columns too)."""
    first = ["id", "source_uri", "input_uri"]
    labels = [c for c in columns.names if c.startswith(LABEL_PREFIX)]
    rest = [c for c in columns.names if c not in first + labels]
    fields = [pa.field("image", IMAGE_TYPE)] + [columns.field(c) for c in first + labels]
    fields.append(pa.field("labels_after", pa.struct([(n, pa.int8()) for n in names])))
    fields.append(pa.field("reached_target", pa.bool_()))
    fields += [columns.field(c) for c in rest]
    return pa.schema(fields, metadata={"huggingface": json.dumps(HF_FEATURES)})


def _read_images(rows: pd.DataFrame, storage_options: Mapping | None
                 ) -> list[bytes | str | None]:
    """Each row's edited PNG bytes; None for failed rows; the reason for unreadable ones.
    One concurrent fetch per filesystem (on S3: one GET per image, many in flight)."""
    uris = [u if isinstance(u, str) else None for u in rows["edited_uri"]]
    found = read_many(filter(None, uris), storage_options)

    def image(uri: str | None) -> bytes | str | None:
        data = None if uri is None else found[uri]
        if data is None or isinstance(data, bytes):
            return data
        return f"edited image {uri}: {type(data).__name__}: {data}"
    return [image(u) for u in uris]


class _ParquetShards:
    """hf-parquet: rows gathered into shards of SHARD_ROWS, each written whole with its
    images as soon as it is full."""

    def __init__(self, site: Output, schema: pa.Schema, total: int,
                 storage_options: Mapping | None, result: ExportResult):
        self.site, self.schema, self.options, self.result = site, schema, storage_options, result
        self.shards = max(math.ceil(total / SHARD_ROWS), 1)
        self.pending: list[pd.DataFrame] = []
        self.held = self.written = 0

    def add(self, rows: pd.DataFrame) -> None:
        self.pending.append(rows)
        self.held += len(rows)
        while self.held >= SHARD_ROWS:
            self._write(SHARD_ROWS)

    def close(self) -> None:
        if self.held or not self.written:
            self._write(self.held)

    def _write(self, count: int) -> None:
        rows = pd.concat(self.pending, ignore_index=True) if self.pending else pd.DataFrame(
            columns=self.schema.names)
        part, rest = rows.iloc[:count].copy(), rows.iloc[count:]
        self.pending, self.held = [rest], len(rest)
        images = _read_images(part, self.options)
        bad = [(rid, d) for rid, d in zip(part["id"], images) if isinstance(d, str)]
        self.result.missing += bad
        part["image"] = [{"bytes": d, "path": f"{rid}.png"} if isinstance(d, bytes) else None
                         for rid, d in zip(part["id"], images)]
        part = part[~part["id"].isin({rid for rid, _ in bad})]
        table = pa.Table.from_pandas(part[self.schema.names], schema=self.schema,
                                     preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=100)
        rel = f"data/{SPLIT}-{self.written:05d}-of-{self.shards:05d}.parquet"
        self.site.put(rel, buf.getvalue())
        self.written += 1
        self.result.files.append(f"{self.site.uri}/{rel}")
        self.result.rows += len(part)


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


class _ImageFolder:
    """imagefolder: each image as it comes, its metadata.jsonl line streamed to `lines`
    (Output.writer: the file appears whole at the end)."""

    def __init__(self, site: Output, lines: BinaryIO, storage_options: Mapping | None,
                 result: ExportResult):
        self.site, self.lines, self.options, self.result = site, lines, storage_options, result

    def add(self, rows: pd.DataFrame) -> None:
        images = _read_images(rows, self.options)
        written = [(row, data) for row, data in zip(rows.to_dict("records"), images)
                   if isinstance(data, bytes)]
        self.result.missing += [(rid, str(data)) for rid, data in zip(rows["id"], images)
                                if not isinstance(data, bytes)]
        with ThreadPoolExecutor(max_workers=WRITERS) as pool:
            list(pool.map(lambda item: self.site.put(f"{SPLIT}/{item[0]['id']}.png", item[1]),
                          written))
        for row, _ in written:                  # each line after its image is written
            line = json.dumps({"file_name": f"{row['id']}.png",
                               **{k: _json_value(v) for k, v in row.items()}})
            self.lines.write((line + "\n").encode())
            self.result.rows += 1

    def close(self) -> None:
        self.result.files.append(f"{self.site.uri}/{SPLIT}/metadata.jsonl")


def export_output(output_uri: str, fmt: str, dest: str, only_successful: bool = False,
                  storage_options: Mapping | None = None,
                  progress: Callable[[int], None] | None = None,
                  reviewed: Mapping[str, str] | None = None) -> ExportResult:
    """Export the output's metrics rows and edited images (see the module doc), streamed:
    a first pass reads a few columns of every row to choose the rows and labels, then
    the rows go through SHARD_ROWS at a time with their images (memory: one shard).
    `progress(n)` is told each batch of rows done; `reviewed`: verdicts by id, only the
    accepted rows are exported."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    out = Output(output_uri, storage_options)
    if not metrics_paths(out):
        raise FileNotFoundError(f"no metrics under {output_uri}: nothing to export")
    columns = metrics_schema(out)
    clash = sorted({"image", "labels_after", "reached_target", "file_name"} & set(columns.names))
    if clash:
        raise ValueError(f"the output's metrics have column(s) {clash}, which the export "
                         "writes itself; rename them in the manifest")
    lean = read_metrics(out, ["id", "status", "attributes", "targets", "prob_result"])
    names = label_names(columns.names, lean.loc[lean["status"] == OK, "attributes"])
    keep = exported_ids(lean, fmt, only_successful)
    not_accepted: dict[str, int] = {}
    if reviewed is not None:
        keep, not_accepted = accepted_only(keep, reviewed)
    site = Output(dest, storage_options)
    result = ExportResult(dest=site.uri, rows=0, selected=len(keep), not_accepted=not_accepted)

    def stream(writer: _ParquetShards | _ImageFolder) -> None:
        for batch in iter_metrics(out, SHARD_ROWS):
            batch = batch[batch["id"].isin(keep)]
            if len(batch):
                writer.add(with_labels(batch, names))
            if progress:
                progress(len(batch))
        writer.close()
    if fmt == "hf-parquet":
        stream(_ParquetShards(site, _schema(columns, names), len(keep), storage_options,
                              result))
    else:
        with site.writer(f"{SPLIT}/metadata.jsonl") as lines:
            stream(_ImageFolder(site, lines, storage_options, result))
    for rid, why in result.missing:
        log.warning("export: row %s left out: %s", rid, why)
    return result
