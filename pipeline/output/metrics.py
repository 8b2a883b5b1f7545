"""The metrics dataset of an output: one row per manifest row, under `metrics/`.

    write_metrics(out, rows, schema)       a batch's rows: metrics/part-<ids hash>.parquet
    read_metrics(out, columns)             every id's newest row, only the columns asked
    MetricsReader(out, columns).read()     the same, and read again: only what changed
    iter_metrics(out, rows)                every column of every id's newest row, in batches
    compact(out)                           small files merged into large ones, safely
    drop_stale_rows(out)                   rows superseded by a newer row of their id removed

The files: `part-*.parquet`, one per batch, as actors write them (a retried batch
overwrites its own); `compact-*.parquet`, merged by the driver (at the end of each run
and every COMPACT_EVERY rows while it runs), their row count in their name. A reader
lists the folder once, reads the files in parallel with only the columns it needs, and
keeps each id's newest row (by `written_at`). A compaction writes the merged file whole
and only then deletes the files it replaces: killed between the two, a reader sees
both, which hold the same rows, and still sees each row once; the next compaction drops
the copies. So a kill at any instant loses no row and duplicates none.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.spec import NETWORKS

from .layout import Output

log = logging.getLogger(__name__)

# Each network's checkpoint hash column (`<network>_sha256`), from models/spec.py's names.
NETWORK_HASH_COLUMNS = {name: f"{name}_sha256" for name in NETWORKS}
_NETWORK_WORDS = {"face_parser": "face parser", "lpips_trunk": "LPIPS trunk"}
_NETWORK_NOTES = {"e4e": " (null when not loaded)", "lpips_trunk": " (null when not loaded)",
                  "judge": " (null without one)"}
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
    ("prob_all_input", pa.list_(pa.float32()), "the classifier's probability of each of the "
                                               "40 CelebA attributes on the input, in its "
                                               "order (`models/celeba.py`)"),
    ("prob_all_result", pa.list_(pa.float32()), "the same on the result"),
    ("entanglement", pa.float64(), "mean absolute change of the probabilities of the "
                                   "attributes the edit did not target, nor imply "
                                   "([Evidence](results.md#entanglement)); 0: none moved"),
    ("unintended_flips", pa.list_(pa.string()), "those attributes whose probability crossed "
                                                "0.5"),
    ("judge_prob_input", pa.list_(pa.float64()), "the held-out judge's probability of each "
                                                 "edited attribute on the input (null "
                                                 "without a judge)"),
    ("judge_prob_result", pa.list_(pa.float64()), "the same on the result"),
    ("judge_on_target", pa.bool_(), "every edited attribute on its target's side of 0.5 by "
                                    "the judge (null without a judge)"),
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
    *[(column, pa.string(), f"sha256 of the {_NETWORK_WORDS.get(name, name)} checkpoint"
       + _NETWORK_NOTES.get(name, "")) for name, column in NETWORK_HASH_COLUMNS.items()],
    ("settings_sha256", pa.string(), "sha256 of the edit settings the row ran with "
                                     "([canonical JSON](outputs.md#provenance))"),
    ("code_version", pa.string(), "the maskface version (and git commit) that wrote the row"),
    ("tiny_models", pa.bool_(), "the row was made by tiny random-weight models: not a real "
                                "edit"),
    ("written_at", pa.float64(), "when the row was written (seconds since the epoch); the "
                                 "newest row of an id counts"),
]
METRICS_SCHEMA = pa.schema([(name, kind) for name, kind, _ in METRICS_COLUMNS])
LEGACY = pa.field("image_uri", pa.string())   # `edited_uri`'s name in older outputs
# The columns naming a row's files: recorded relative to the output (`images/<id>.png`),
# given by every reader as URIs where the output is now (`Output.locate`).
ROW_FILE_COLUMNS = ("edited_uri", "latent_uri", "mask_uri", "noises_uri", "pasted_uri")

FOLDER = "metrics"
COMPACT_ROWS = 250_000        # rows of a file compaction makes, at most
COMPACT_EVERY = 5_000         # rows between two compactions while a job runs
READERS = 32                  # files read at once (whole files on a local disk: `_readers`)
CHUNK_FILES = 2_048           # files a compaction or an export reads before it goes on
_COMPACT_NAME = re.compile(r"compact-(\d+)-")


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


def write_metrics(out: Output, rows: pd.DataFrame, schema: pa.Schema) -> str:
    """One file per batch, named by its ids: a retried batch overwrites its own file."""
    key = hashlib.sha256("\n".join(sorted(rows["id"])).encode()).hexdigest()[:24]
    table = pa.Table.from_pandas(rows[schema.names], schema=schema, preserve_index=False)
    rel = f"{FOLDER}/part-{key}.parquet"
    out.put(rel, _parquet(table))
    return rel


# ---- the files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricsFile:
    path: str                # as the output's filesystem names it
    version: str             # changes when the file is written again (size, mtime or ETag)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def rows(self) -> int | None:
        """A compacted file's row count, from its name (None for a batch's file)."""
        match = _COMPACT_NAME.match(self.name)
        return int(match.group(1)) if match else None


def metrics_files(out: Output) -> list[MetricsFile]:
    """The metrics files, listed once (afresh: other processes write there)."""
    folder = out.path_of(FOLDER)
    out.fs.invalidate_cache(folder)
    try:
        entries = out.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    files = []
    for e in entries:
        name = e["name"].rsplit("/", 1)[-1]
        if e.get("type") == "directory" or not name.endswith(".parquet") or name.startswith("."):
            continue
        stamp = e.get("ETag") or e.get("mtime") or e.get("LastModified") or e.get("created")
        files.append(MetricsFile(e["name"], f"{e.get('size')}:{stamp}"))
    return sorted(files, key=lambda f: f.path)


def metrics_paths(out: Output) -> list[str]:
    """The metrics files' paths on the output's filesystem."""
    return [f.path for f in metrics_files(out)]


# ---- reading ----------------------------------------------------------------------------------
def _read_file(out: Output, path: str, columns: Sequence[str] | None,
               threads: bool = True) -> pa.Table | None:
    """One file's table with the asked columns it has (None: the file is gone, replaced
    by a compaction since the listing), the legacy `image_uri` as `edited_uri`. `threads`:
    Arrow decodes the file's columns in parallel (worth it for a big merged file, not
    for a batch's 4 rows read beside many others)."""
    try:
        # a local file through Arrow's own reader: a third faster than a Python file object
        with (nullcontext(path) if out.local else out.fs.open(path, "rb")) as f, \
                pq.ParquetFile(f) as parquet:
            wanted = None                  # every column (not named: 10% faster)
            if columns is not None:
                names = parquet.schema_arrow.names
                wanted = [c for c in columns if c in names]
                if "edited_uri" in columns and "edited_uri" not in names and "image_uri" in names:
                    wanted += ["image_uri"] + (["status"] if "status" not in wanted else [])
            table = parquet.read(columns=wanted, use_threads=threads)
    except FileNotFoundError:
        return None
    if "image_uri" in table.column_names and "edited_uri" not in table.column_names:
        # older outputs: the result was `image_uri`, which held the input's URI on errors
        ok = pc.equal(table["status"], "ok")
        uri = pc.if_else(ok, table["image_uri"], pa.scalar(None, pa.string()))
        table = table.drop_columns(["image_uri"]).append_column("edited_uri", uri)
        if columns is not None and "status" not in columns:
            table = table.drop_columns(["status"])
    return table


def _readers(out: Output) -> int:
    """Whole files read at once: one per core on a local disk, where decoding a batch
    file's ~90 columns is the cost (2 readers on 2 cores read them 1.3x faster than 8);
    READERS on an object store, where each waits on a round trip."""
    if not out.local:
        return READERS
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))       # the cores this process may use
    return os.cpu_count() or 1


def _read_files(out: Output, files: Sequence[MetricsFile], columns: Sequence[str] | None
                ) -> dict[str, pa.Table]:
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        tables = pool.map(lambda f: _read_file(out, f.path, columns), files)
        return {f.path: t for f, t in zip(files, tables) if t is not None}


@dataclass
class _Share:
    """One reader's share of a chunk: its files that were there (in order), each one's row
    count, and their rows as one table (every column)."""
    files: list[MetricsFile]
    rows: list[int]
    table: pa.Table


def _read_shares(out: Output, files: Sequence[MetricsFile]) -> list[_Share]:
    """Every column of `files`, split among the readers in order: each reads its share
    file after file and combines it into one table. A 4-row batch file costs 1-2 ms of
    a core to read and ~0.2 ms to combine with the others; here both run on every core
    (before, 32 threads read and one combined)."""
    readers = _readers(out)
    threads = len(files) < readers           # a few (merged) files: split each by column
    size = min(-(-len(files) // readers), 256)   # small shares: no reader idles at the end

    def share(part: Sequence[MetricsFile]) -> _Share | None:
        found = [(f, t) for f in part
                 if (t := _read_file(out, f.path, None, threads)) is not None]
        if not found:
            return None
        table = pa.concat_tables([t for _, t in found], promote_options="permissive")
        return _Share([f for f, _ in found], [t.num_rows for _, t in found],
                      table.combine_chunks())
    with ThreadPoolExecutor(max_workers=readers) as pool:
        parts = [files[i:i + size] for i in range(0, len(files), size)]
        return [s for s in pool.map(share, parts) if s is not None]


def _newest(tables: Iterable[pa.Table], want: list[str] | None) -> pd.DataFrame:
    """One DataFrame, each id's newest row, with the columns in `want` (None: all), each
    present (null where a file predates it). The tables hold `id` and `written_at`."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pd.DataFrame(columns=want if want is not None else METRICS_SCHEMA.names)
    table = pa.concat_tables(tables, promote_options="permissive")
    df = table.to_pandas()
    for name in (want if want is not None else METRICS_SCHEMA.names):
        if name not in df.columns:            # a column added since these files were written
            df[name] = None
    df = df.sort_values("written_at", kind="stable").drop_duplicates("id", keep="last")
    return df[want] if want is not None else df


class MetricsReader:
    """Every id's newest metrics row, with only `columns` (None: all, passthrough
    included). `read()` lists the folder once and reads the files not read before (or
    rewritten since): a status that refreshes reads what changed, not the history."""

    def __init__(self, out: Output, columns: Sequence[str] | None = None):
        self.out = out
        self.asked = None if columns is None else list(dict.fromkeys(columns))
        self.columns = None if columns is None else list(dict.fromkeys(   # what is read
            [*columns, "id", "written_at"]))
        self._tables: dict[str, tuple[str, pa.Table]] = {}

    def read(self) -> pd.DataFrame:
        listing = {f.path: f for f in metrics_files(self.out)}
        self._tables = {p: (v, t) for p, (v, t) in self._tables.items()
                        if p in listing and listing[p].version == v}
        new = [f for p, f in listing.items() if p not in self._tables]
        for path, table in _read_files(self.out, new, self.columns).items():
            self._tables[path] = (listing[path].version, table)
        return _located(self.out, _newest((t for _, t in self._tables.values()), self.asked))


def read_metrics(out: Output, columns: Sequence[str] | None = None,
                 ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Every id's newest metrics row, with only `columns` (None: every column); with
    `ids`, only those ids' rows (filtered before any row is converted)."""
    if ids is None:
        return MetricsReader(out, columns).read()
    wanted = pa.array(sorted(set(ids)), pa.string())
    reader = MetricsReader(out, columns)
    tables = _read_files(out, metrics_files(out), reader.columns)
    return _located(out, _newest((t.filter(pc.is_in(t["id"], value_set=wanted))
                                  for t in tables.values()), reader.asked))


def _located(out: Output, df: pd.DataFrame) -> pd.DataFrame:
    """The row-file columns as URIs where the output is now (what is recorded stays)."""
    located = {name: [out.locate(v) for v in df[name]]
               for name in ROW_FILE_COLUMNS if name in df.columns and len(df)}
    return df.assign(**located) if located else df


def metrics_schema(out: Output) -> pa.Schema:
    """Every column the output's metrics files hold, with its type (passthrough columns
    included; older files' `image_uri` as `edited_uri`), from the files' footers."""
    def schema(f: MetricsFile) -> pa.Schema | None:
        try:
            with out.fs.open(f.path, "rb") as handle:
                return pq.read_schema(handle)
        except FileNotFoundError:
            return None
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        schemas = [s for s in pool.map(schema, metrics_files(out)) if s is not None]
    merged = pa.unify_schemas([METRICS_SCHEMA, *schemas], promote_options="permissive")
    if LEGACY.name in merged.names:
        merged = merged.remove(merged.get_field_index(LEGACY.name))
    return merged


def iter_metrics(out: Output, rows: int = 1000) -> Iterator[pd.DataFrame]:
    """Every column of every id's newest row, `rows` at a time (memory: one batch and the
    ids), in file order: a first pass reads ids and times only. Row files located as
    `read_metrics` gives them."""
    files = metrics_files(out)
    newest = read_metrics(out, ["id", "written_at"]).set_index("id")["written_at"].to_dict()
    sent: set[str] = set()
    pending: list[pd.DataFrame] = []
    count = 0
    for chunk in _in_chunks(files):
        for share in _read_shares(out, chunk):
            df = share.table.to_pandas()
            keep = [newest.get(i) == at and i not in sent
                    for i, at in zip(df["id"], df["written_at"])]
            df = df[keep].drop_duplicates("id")
            sent.update(df["id"])
            pending.append(df)
            count += len(df)
            while count >= rows:
                batch = pd.concat(pending, ignore_index=True)
                yield _located(out, _with_columns(batch.iloc[:rows]))
                pending, count = [batch.iloc[rows:]], len(batch) - rows
    if count:
        yield _located(out, _with_columns(pd.concat(pending, ignore_index=True)))


def _in_chunks(files: Sequence[MetricsFile]) -> Iterator[list[MetricsFile]]:
    """The files in order, in chunks read at once by a reader that holds only one chunk:
    CHUNK_FILES batch files, or merged files of COMPACT_ROWS rows in all (one at least)."""
    chunk: list[MetricsFile] = []
    rows = 0
    for f in files:
        if chunk and (len(chunk) == CHUNK_FILES or rows + (f.rows or 0) > COMPACT_ROWS):
            yield chunk
            chunk, rows = [], 0
        chunk.append(f)
        rows += f.rows or 0
    if chunk:
        yield chunk


def _with_columns(df: pd.DataFrame) -> pd.DataFrame:
    for name in METRICS_SCHEMA.names:
        if name not in df.columns:
            df[name] = None
    return df.reset_index(drop=True)


# ---- compaction and stale rows ---------------------------------------------------------------
def compact(out: Output, most_rows: int = COMPACT_ROWS, batch_files_only: bool = False) -> int:
    """Merge the batch files, and merged files smaller than half `most_rows` (unless
    `batch_files_only`: while a job runs, so that no row is rewritten at every
    compaction), into files of about `most_rows` rows at most. Each merged file is
    written whole before the files it replaces are deleted, and names them (with their
    versions) in its metadata: a compaction killed before it deleted them all is
    finished by the next one. A file written again since it was read (a retried batch)
    is not deleted: its newer rows win on read and join the next compaction. Returns
    the files replaced."""
    files = metrics_files(out)
    files = _finish_interrupted(out, files)
    small = [f for f in files
             if f.rows is None or (not batch_files_only and f.rows < most_rows // 2)]
    if len(small) < 2:
        return 0
    pieces: list[pa.Table] = []            # the rows of the files in `chunk`
    replaced, chunk, held = 0, [], 0
    for part in _in_chunks(small):
        for share in _read_shares(out, part):
            begin = end = 0                # share.table's rows from `begin` are held
            for f, rows in zip(share.files, share.rows):
                chunk.append(f)
                held, end = held + rows, end + rows
                if held >= most_rows:
                    pieces.append(share.table.slice(begin, end - begin))
                    replaced += _merge(out, chunk, pieces)
                    pieces, chunk, held, begin = [], [], 0, end
            if end > begin:
                pieces.append(share.table.slice(begin))
    if len(chunk) > 1 or (chunk and chunk[0].rows is None):
        replaced += _merge(out, chunk, pieces)
    return replaced


REPLACES = b"maskface.replaces"       # a merged file's metadata: the files it replaces


def _merge(out: Output, files: list[MetricsFile], tables: list[pa.Table]) -> int:
    table = pa.concat_tables(tables, promote_options="permissive")
    # the copies a killed compaction left (the same id written at the same instant) go;
    # rows of an id written at different times stay for the readers' newest-row rule
    keys = pa.table({"id": table["id"], "at": table["written_at"]})
    first = keys.append_column("i", pa.array(range(table.num_rows))).group_by(
        ["id", "at"]).aggregate([("i", "min")])["i_min"]
    if len(first) < table.num_rows:                              # first copies, in order
        table = table.take(pc.take(first, pc.sort_indices(first)))
    replaces = json.dumps([[f.path, f.version] for f in files]).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), REPLACES: replaces})
    rel = f"{FOLDER}/compact-{table.num_rows}-{uuid.uuid4().hex[:12]}.parquet"
    out.put(rel, _parquet(table))                          # whole, then the files it
    now = {f.path: f.version for f in metrics_files(out)}  # replaces, as they were read
    gone = [f.path for f in files if now.get(f.path) == f.version]
    if gone:
        out.fs.rm(gone)
    log.info("metrics: %d file(s) merged into %s (%d rows)", len(files), rel, table.num_rows)
    return len(files)


def _finish_interrupted(out: Output, files: list[MetricsFile]) -> list[MetricsFile]:
    """Delete the files a merged file replaces that are still there, unchanged (a
    compaction killed before its deletes); returns the listing without them."""
    def replaced(f: MetricsFile) -> list[list[str]]:
        try:
            with out.fs.open(f.path, "rb") as handle:
                meta = pq.read_schema(handle).metadata or {}
        except FileNotFoundError:
            return []
        return json.loads(meta.get(REPLACES, b"[]"))
    merged = [f for f in files if f.rows is not None]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        named = {path: version for entries in pool.map(replaced, merged)
                 for path, version in entries}
    left = [f for f in files if named.get(f.path) == f.version]
    if left:
        out.fs.rm([f.path for f in left])
        log.info("metrics: %d file(s) an interrupted compaction had merged, deleted",
                 len(left))
    gone = {f.path for f in left}
    return [f for f in files if f.path not in gone]


def drop_stale_rows(out: Output) -> int:
    """Rewrite the files that hold rows superseded by a newer row of the same id (after
    --retry-errors); returns the rows dropped."""
    files = metrics_files(out)
    stamps = _read_files(out, files, ["id", "written_at"])
    newest: dict[str, float] = {}
    for t in stamps.values():
        for rid, at in zip(t["id"].to_pylist(), t["written_at"].to_pylist()):
            newest[rid] = max(newest.get(rid, -1.0), at)
    dropped = 0
    for path, t in stamps.items():
        keep = [at >= newest[rid] for rid, at in zip(t["id"].to_pylist(),
                                                    t["written_at"].to_pylist())]
        if all(keep):
            continue
        dropped += keep.count(False)
        full = _read_file(out, path, None)
        if full is None:
            continue
        kept = full.filter(pa.array(keep))
        if kept.num_rows == 0:
            out.fs.rm(path)
        else:
            out.put(path[len(out.root) + 1:], _parquet(kept))
    return dropped


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
