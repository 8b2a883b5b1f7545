"""The output layout of a job under one fsspec URI, and its metrics dataset.

    images/<id>.png      edited image            latents/<id>.npy   W+ latent, float32
    masks/<id>.png       blend mask, 8-bit       noises/<id>.npz    noise maps (optional)
    pasted/<id>.png      the edit pasted back into the full photo (paste_back, aligned rows)
    prefixes/<key>.npy   shared inversion prefixes (pipeline/job/prefix.py)
    metrics/*.parquet    one row per manifest row (written last: a row with a metrics
                         row is complete)
    job.json, summary.json

The per-row files are ROW_FILES: `Output.put_row_file(kind, id, data)` writes one and
returns the URI the metrics row records.

Every write is whole or absent: on local disk a file is written under a hidden temporary
name and renamed; on object stores one PUT is atomic already. A failed write raises
StorageError (pipeline/errors.py) naming the object and the storage's reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .access import under
from .storage import STORAGE_ERRORS, filesystem, storage_error

log = logging.getLogger(__name__)

# The metrics columns every row has, with what each holds; the manifest's passthrough
# columns follow them (`passthrough_schema`). The docs' column table is made from this.
METRICS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("id", pa.string(), "the manifest row's id"),
    ("status", pa.string(), "`ok` or `error`"),
    ("error", pa.string(), "why the row failed (null when ok)"),
    ("source_uri", pa.string(), "the original photo: the manifest's `source_uri` for aligned "
                                "rows, else its `image_uri`"),
    ("input_uri", pa.string(), "the image edited: the manifest's `image_uri`"),
    ("edited_uri", pa.string(), "the edited image, `images/<id>.png` (null on error rows; "
                                "outputs written before this name call it `image_uri`)"),
    ("latent_uri", pa.string(), "the W+ latent, `latents/<id>.npy`"),
    ("mask_uri", pa.string(), "the blend mask, `masks/<id>.png`"),
    ("noises_uri", pa.string(), "the noise maps, `noises/<id>.npz` (`save_noises: true`)"),
    ("pasted_uri", pa.string(), "the edit pasted back into the full photo, `pasted/<id>.png` "
                                "(`paste_back: true`, aligned rows)"),
    ("attributes", pa.list_(pa.string()), "the edited attributes"),
    ("targets", pa.list_(pa.float64()), "their targets, in [0, 1]"),
    ("size", pa.float64(), "the edit-region size factor (0: off)"),
    ("seed", pa.int64(), "the seed of the row's redrawn noise"),
    ("mode", pa.string(), "`local` or `global`, as the edit ran"),
    ("prob_input", pa.list_(pa.float64()), "the classifier's probability of each edited "
                                           "attribute on the input (aligned with `attributes`)"),
    ("prob_result", pa.list_(pa.float64()), "the same on the (clamped) result"),
    ("preservation_l1", pa.float64(), "mean abs(result - input) weighted by (1 - blend mask)"),
    ("outside_pixels", pa.int64(), "pixels where the blend mask is below 0.01"),
    ("outside_mse", pa.float64(), "MSE of result against input there (null when there are "
                                  "none)"),
    ("outside_psnr", pa.float64(), "PSNR there, dB (inf when identical)"),
    ("recon_mse", pa.float64(), "MSE of the generated image against the input inside the "
                                "final recon mask"),
    ("region_portion_before", pa.float64(), "share of the image the edit regions cover on the "
                                            "input, by the face parser"),
    ("region_portion_after", pa.float64(), "the same on the result"),
    ("steps", pa.int64(), "optimisation steps the edit ran, latent and noise (a branched "
                          "edit counts its share of the prefix)"),
    ("seconds", pa.float64(), "wall seconds per image (its group's time over its size)"),
    ("prefix", pa.string(), "`computed` or `cached` when the edit branched from a shared "
                            "inversion prefix, else null"),
    ("identity_distance", pa.float64(), "dlib face-descriptor distance, input against result "
                                        "(null when not measured)"),
    ("same_person", pa.bool_(), "`identity_distance` below 0.6"),
    ("identity_status", pa.string(), "`ok`, `no face in the input`, `no face in the result`, "
                                     "`unavailable: ...` or `failed: ...`"),
    ("identity_seconds", pa.float64(), "the identity metric's time for this row"),
    ("node", pa.string(), "the node the row ran on"),
    ("actor", pa.string(), "the Ray actor that ran it"),
    ("gpu_ids", pa.string(), "the GPUs that actor held"),
    ("actor_model_loads", pa.int64(), "how often that actor loaded the models (1)"),
    ("generator_sha256", pa.string(), "sha256 of the generator checkpoint"),
    ("face_parser_sha256", pa.string(), "sha256 of the face parser checkpoint"),
    ("classifier_sha256", pa.string(), "sha256 of the classifier checkpoint"),
    ("e4e_sha256", pa.string(), "sha256 of the e4e checkpoint (null when not loaded)"),
    ("lpips_trunk_sha256", pa.string(), "sha256 of the LPIPS trunk (null when not loaded)"),
    ("tiny_models", pa.bool_(), "the row was made by tiny random-weight models: not a real "
                                "edit"),
    ("written_at", pa.float64(), "when the row was written (seconds since the epoch); the "
                                 "newest row of an id counts"),
]
METRICS_SCHEMA = pa.schema([(name, kind) for name, kind, _ in METRICS_COLUMNS])


# Each row's files: folder -> extension (images/<id>.png, ...).
ROW_FILES = {"images": "png", "latents": "npy", "masks": "png", "noises": "npz", "pasted": "png"}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stubs: **kwds
    return buf.getvalue()


class Output:
    """One job's output folder (local or any fsspec URI): whole-or-absent writes, the
    per-row files, JSON files and the metrics dataset (`read_metrics`)."""

    def __init__(self, uri: str, storage_options: Mapping | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, storage_options)
        self.local = "file" in _protocols(self.fs)

    def uri_of(self, kind: str, row_id: str) -> str:
        """The URI of one row's file of a kind (ROW_FILES)."""
        return f"{self.uri}/{_row_key(kind, row_id)}"

    def put_row_file(self, kind: str, row_id: str, data: bytes) -> str:
        """Write one row's file of a kind (ROW_FILES); returns its URI."""
        self.put(_row_key(kind, row_id), data)
        return self.uri_of(kind, row_id)

    def _path(self, rel: str) -> str:
        return under(self.root, rel)         # never outside the output folder

    def put(self, rel: str, data: bytes) -> None:
        """Write one file whole, or raise StorageError and leave nothing new behind."""
        path = self._path(rel)
        try:
            if self.local:
                self._put_local(path, data)
            else:
                self.fs.pipe_file(path, data)
        except STORAGE_ERRORS as e:
            raise storage_error(e, f"{self.uri}/{rel}", "writing") from None

    def _put_local(self, path: str, data: bytes) -> None:
        folder, _, name = path.rpartition("/")
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)            # atomic; fails on a folder (shutil.move would not)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def put_json(self, rel: str, obj) -> None:
        self.put(rel, json.dumps(obj, indent=2, default=str).encode())

    def get_json(self, rel: str) -> dict | None:
        """A JSON file under the output (job.json, summary.json), or None when there is none."""
        try:
            with self.fs.open(self._path(rel), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def put_npy(self, rel: str, array: np.ndarray) -> None:
        self.put(rel, npy_bytes(array))

    def get_npy(self, rel: str) -> np.ndarray | None:
        """A .npy file under the output, or None when there is none (or it is unreadable:
        a cache entry is then made again)."""
        path = self._path(rel)
        try:
            with self.fs.open(path, "rb") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, EOFError, *STORAGE_ERRORS) as e:  # type: ignore[misc]
            log.warning("ignoring %s/%s: %s", self.uri, rel, e)
            return None

    # -- metrics ---------------------------------------------------------------------------
    def metrics_files(self) -> list[str]:
        folder = self._path("metrics")
        self.fs.invalidate_cache(folder)     # other processes write here: list it afresh
        if not self.fs.exists(folder):
            return []
        return sorted(p for p in self.fs.ls(folder, detail=False)
                      if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))

    def write_metrics(self, rows: pd.DataFrame, schema: pa.Schema) -> str:
        """One file per batch, named by its ids: a retried batch overwrites its own file."""
        key = hashlib.sha256("\n".join(sorted(rows["id"])).encode()).hexdigest()[:24]
        table = pa.Table.from_pandas(rows[schema.names], schema=schema, preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        rel = f"metrics/part-{key}.parquet"
        self.put(rel, buf.getvalue())
        return rel

    def read_metrics(self) -> pd.DataFrame:
        """Every metrics row, the newest per id (a retried error row replaces the old one)."""
        files = self.metrics_files()
        if not files:
            return pd.DataFrame(columns=METRICS_SCHEMA.names)
        frames = [_current_columns(pq.read_table(f, filesystem=self.fs).to_pandas())
                  for f in files]
        df = pd.concat(frames, ignore_index=True)
        for name in METRICS_SCHEMA.names:      # columns added since some files were written
            if name not in df.columns:
                df[name] = None
        return df.sort_values("written_at").drop_duplicates("id", keep="last")

    def drop_stale_rows(self) -> int:
        """Rewrite files that hold rows superseded by a newer row of the same id."""
        files = self.metrics_files()
        if not files:
            return 0
        tables = {f: pq.read_table(f, filesystem=self.fs) for f in files}
        newest: dict[str, float] = {}
        for t in tables.values():
            for rid, at in zip(t["id"].to_pylist(), t["written_at"].to_pylist()):
                newest[rid] = max(newest.get(rid, -1.0), at)
        dropped = 0
        for f, t in tables.items():
            keep = [at >= newest[rid] for rid, at in zip(t["id"].to_pylist(),
                                                            t["written_at"].to_pylist())]
            if all(keep):
                continue
            dropped += keep.count(False)
            kept = t.filter(pa.array(keep))
            rel = f[len(self.root) + 1:]
            if kept.num_rows == 0:
                self.fs.rm(f)
            else:
                buf = io.BytesIO()
                pq.write_table(kept, buf)
                self.put(rel, buf.getvalue())
        return dropped


def _row_key(kind: str, row_id: str) -> str:
    return under(kind, f"{row_id}.{ROW_FILES[kind]}")


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _current_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Metrics written before the result column was named `edited_uri` called it
    `image_uri`, and put the input's URI there on error rows."""
    if "image_uri" in df.columns and "edited_uri" not in df.columns:
        df = df.rename(columns={"image_uri": "edited_uri"})
        df.loc[df["status"] != "ok", "edited_uri"] = None
    return df


def passthrough_schema(manifest: pa.Schema | None, columns: Iterable[str]) -> pa.Schema:
    """The metrics schema plus the manifest's passthrough columns, with their own types."""
    fields = list(METRICS_SCHEMA)
    columns = [c for c in columns if c != "source_uri"]   # an aligned row's photo: merged
    clash = sorted(set(columns) & set(METRICS_SCHEMA.names))
    if clash:
        raise ValueError(f"manifest column(s) {clash} would overwrite metrics columns; rename them")
    for col in columns:
        if manifest is not None and col in manifest.names:
            fields.append(manifest.field(col))
        else:
            fields.append(pa.field(col, pa.string()))
    return pa.schema(fields)
