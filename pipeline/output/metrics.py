"""The metrics dataset of an output: one row per manifest row, under `metrics/`.

    write_metrics(out, rows, schema)       a batch's rows: metrics/part-<ids hash>.parquet
    read_metrics(out, columns)             every id's newest row, only the columns asked
    MetricsReader(out, columns).read()     the same, and read again: only what changed
    iter_metrics(out, rows)                every column of every id's newest row, in batches
    compact(out)                           small files merged into large ones, safely
    drop_stale_rows(out)                   rows superseded by a newer row of their id removed
    quarantined(out)                       the damaged files compaction set aside

The files: `part-<24 hex>.parquet`, one per batch, as actors write them (a retried
batch overwrites its own); `compact-<rows>-<12 hex>.parquet`, merged by the driver (at
the end of each run and every COMPACT_EVERY rows while it runs), their row count in
their name. A reader lists the folder once, reads the files in parallel with only the
columns it needs, and keeps each id's newest row (by `written_at`). A compaction writes
the merged file whole and only then deletes the files it replaces: killed between the
two, a reader sees both, which hold the same rows, and still sees each row once; the
next compaction drops the copies. So a kill at any instant loses no row and duplicates
none.

Only the job's own files count: a file is the job's when its name is one of the two
above AND it has the job's key columns (OWN_COLUMNS). Anything else in `metrics/`
(another tool's Parquet, a text file, our name with other columns) is foreign: never
read into the history, merged or deleted; the driver's compaction names it in a warning
once per run. A file of the job's name that is not readable Parquet (cut by a crash, a
bad footer) is damaged: readers skip it and say so (`MetricsReader.damaged`), the
driver's compaction moves it to `quarantine/metrics/` with a record beside it, and its
rows, no longer complete, are edited again by the run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.spec import NETWORKS

from pipeline.errors import MAX_ECHO, clip
from pipeline.store.uris import redact

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
    ("time_read_s", pa.float64(), "this row's share of its actor's seconds reading and "
                                  "decoding inputs (its chunk's time over its rows)"),
    ("time_engine_s", pa.float64(), "the same in the engine: the edit itself"),
    ("time_write_s", pa.float64(), "the same encoding and writing the row's files"),
    ("time_post_s", pa.float64(), "the same in the identity metric and paste-back"),
    ("time_wait_s", pa.float64(), "the same waiting for input before the chunk (the "
                                  "actor idle); engine busy = engine / all five, per actor"),
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
# The job's own file names: write_metrics' batch files (the first 24 hex digits of their
# ids' sha256) and compaction's merged files (their rows, a uuid's first 12 hex digits).
BATCH_FILE = re.compile(r"part-[0-9a-f]{24}\.parquet")
MERGED_FILE = re.compile(r"compact-(\d+)-[0-9a-f]{12}\.parquet")
# The columns, with their types, that a file of the job's name must have to be the job's:
# those every reader and resume rely on (which id, how it ended, which row is newest).
OWN_COLUMNS: dict[str, tuple[pa.DataType, ...]] = {
    "id": (pa.string(), pa.large_string()), "status": (pa.string(), pa.large_string()),
    "written_at": (pa.float64(),)}
QUARANTINE = "quarantine/metrics"   # where compaction sets damaged files aside, under the output


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
    size: int | None = None  # bytes, as listed

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def rows(self) -> int | None:
        """A compacted file's row count, from its name (None for a batch's file)."""
        match = MERGED_FILE.fullmatch(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class UnreadFile:
    """A file in `metrics/` that no reader takes rows from, and why. `damaged`: the job's
    name, but not readable as Parquet (cut by a crash, a bad footer, other bytes): its
    rows are not complete, and the driver's compaction sets it aside. Otherwise it is
    foreign (another name, or the job's name with other columns): left as it is."""
    path: str                # as the output's filesystem names it
    size: int | None
    reason: str
    damaged: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def as_dict(self) -> dict[str, Any]:
        """What a person is shown: the file under the output, its size, the reason."""
        return {"file": f"{FOLDER}/{self.name}", "size": self.size, "reason": self.reason}


@dataclass
class MetricsListing:
    """`metrics/` listed once: the files of the job's names, and every other entry."""
    files: list[MetricsFile]
    foreign: list[UnreadFile]


def _version(entry: dict) -> str:
    stamp = (entry.get("ETag") or entry.get("mtime") or entry.get("LastModified")
             or entry.get("created"))
    return f"{entry.get('size')}:{stamp}"


def list_metrics(out: Output) -> MetricsListing:
    """The metrics folder, listed once (afresh: other processes write there). Hidden
    entries (a local write's temporary file) are neither; a folder is foreign."""
    folder = out.path_of(FOLDER)
    out.fs.invalidate_cache(folder)
    try:
        entries = out.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return MetricsListing([], [])
    files, foreign = [], []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        if e.get("type") != "directory" and (BATCH_FILE.fullmatch(name)
                                             or MERGED_FILE.fullmatch(name)):
            files.append(MetricsFile(e["name"], _version(e), e.get("size")))
        else:
            foreign.append(UnreadFile(e["name"].rstrip("/"), e.get("size"),
                                      "not a name the job writes (part-<24 hex>.parquet, "
                                      "compact-<rows>-<12 hex>.parquet)"))
    return MetricsListing(sorted(files, key=lambda f: f.path),
                          sorted(foreign, key=lambda f: f.path))


def metrics_files(out: Output) -> list[MetricsFile]:
    """The files of the job's names (`list_metrics`; their columns are checked on read)."""
    return list_metrics(out).files


def metrics_paths(out: Output) -> list[str]:
    """The paths of the files of the job's names, on the output's filesystem."""
    return [f.path for f in metrics_files(out)]


# ---- reading ----------------------------------------------------------------------------------
class _NotRead(Exception):
    """A file no reader may take rows from: damaged (not readable as Parquet), or not the
    job's (another schema). Raised by the file readers, turned into an UnreadFile."""

    def __init__(self, reason: str, damaged: bool, size: int | None = None):
        super().__init__(reason)
        self.reason, self.damaged, self.size = reason, damaged, size


# What Arrow raises on bytes that are not a whole Parquet file: ArrowInvalid (no footer,
# sizes that do not add up) or a plain OSError (thrift that does not decode). A storage
# failure may be an OSError too: `_parsed` tells the two apart.
_PARSE_ERRORS = (pa.ArrowException, OSError, ValueError)
_ARROW_SOURCE = re.compile(r"^Could not open Parquet input source '[^']*': ")
T = TypeVar("T")


def _own_columns(schema: pa.Schema) -> None:
    """_NotRead (foreign) unless `schema` has the job's key columns with their types."""
    problems = []
    for name, kinds in OWN_COLUMNS.items():
        if name not in schema.names:
            problems.append(f"no `{name}` column")
        elif schema.field(name).type not in kinds:
            problems.append(f"`{name}` is {schema.field(name).type}, not {kinds[0]}")
    if problems:
        raise _NotRead(f"the job's name but not its columns: {'; '.join(problems)}",
                       damaged=False)


def _damage(error: BaseException) -> str:
    """Why a file is damaged, on one line (without Arrow's name for the bytes it parsed)."""
    said = _ARROW_SOURCE.sub("", " ".join(str(error).split()))[:300]
    return f"not readable as Parquet ({type(error).__name__}: {said})"


def _parsed(out: Output, path: str, parse: Callable[[Any], T]) -> T | None:
    """`parse` applied to a metrics file (a local path, else an open file); None when it
    is gone (replaced by a compaction since the listing). When Arrow cannot parse it, its
    bytes are fetched whole and parsed in memory: failing there too, the file is damaged
    (_NotRead); so a storage hiccup never marks a file damaged, and a storage failure
    raises as it is."""
    try:
        # a local file through Arrow's own reader: a third faster than a Python file object
        with (nullcontext(path) if out.local else out.fs.open(path, "rb")) as source:
            return parse(source)
    except FileNotFoundError:
        return None
    except _PARSE_ERRORS:
        pass                               # damaged, or the storage: asked again below
    try:
        data = out.fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return parse(pa.BufferReader(data))
    except _PARSE_ERRORS as e:
        raise _NotRead(_damage(e), damaged=True, size=len(data)) from None


def _read_file(out: Output, path: str, columns: Sequence[str] | None,
               threads: bool = True) -> pa.Table | None:
    """One file's table with the asked columns it has (None: the file is gone, replaced
    by a compaction since the listing), the legacy `image_uri` as `edited_uri`; _NotRead
    when it is damaged or not the job's. `threads`: Arrow decodes the file's columns in
    parallel (worth it for a big merged file, not for a batch's 4 rows read beside many
    others)."""
    def parse(source: Any) -> pa.Table:
        with pq.ParquetFile(source) as parquet:
            _own_columns(parquet.schema_arrow)
            wanted = None                  # every column (not named: 10% faster)
            if columns is not None:
                names = parquet.schema_arrow.names
                wanted = [c for c in columns if c in names]
                if "edited_uri" in columns and "edited_uri" not in names and "image_uri" in names:
                    wanted += ["image_uri"] + (["status"] if "status" not in wanted else [])
            return parquet.read(columns=wanted, use_threads=threads)
    table = _parsed(out, path, parse)
    if table is None:
        return None
    if "image_uri" in table.column_names and "edited_uri" not in table.column_names:
        # older outputs: the result was `image_uri`, which held the input's URI on errors
        ok = pc.equal(table["status"], "ok")
        uri = pc.if_else(ok, table["image_uri"], pa.scalar(None, pa.string()))
        table = table.drop_columns(["image_uri"]).append_column("edited_uri", uri)
        if columns is not None and "status" not in columns:
            table = table.drop_columns(["status"])
    return table


def _footer(out: Output, path: str) -> pa.Schema | None:
    """A file's schema and metadata, from its footer alone (None: gone); _NotRead when
    it is damaged or not the job's."""
    def parse(source: Any) -> pa.Schema:
        schema = pq.read_schema(source)
        _own_columns(schema)
        return schema
    return _parsed(out, path, parse)


def _attempt(f: MetricsFile, read: Callable[[], T]) -> T | UnreadFile:
    """`read()` of one file, or the file as an UnreadFile when no reader may take its rows."""
    try:
        return read()
    except _NotRead as e:
        return UnreadFile(f.path, f.size if e.size is None else e.size, e.reason, e.damaged)


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
                ) -> tuple[dict[str, pa.Table], list[UnreadFile]]:
    """The tables of the files still there, by path, and the files none may be read from."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        got = list(pool.map(lambda f: _attempt(f, lambda: _read_file(out, f.path, columns)),
                            files))
    tables = {f.path: t for f, t in zip(files, got) if isinstance(t, pa.Table)}
    return tables, [u for u in got if isinstance(u, UnreadFile)]


@dataclass
class _Share:
    """One reader's share of a chunk: its files that were there (in order), each one's row
    count, and their rows as one table (every column)."""
    files: list[MetricsFile]
    rows: list[int]
    table: pa.Table


def _read_shares(out: Output, files: Sequence[MetricsFile]
                 ) -> tuple[list[_Share], list[UnreadFile]]:
    """Every column of `files`, split among the readers in order: each reads its share
    file after file and combines it into one table. A 4-row batch file costs 1-2 ms of
    a core to read and ~0.2 ms to combine with the others; here both run on every core
    (before, 32 threads read and one combined). Also the files none may be read from."""
    readers = _readers(out)
    threads = len(files) < readers           # a few (merged) files: split each by column
    size = min(-(-len(files) // readers), 256)   # small shares: no reader idles at the end

    def share(part: Sequence[MetricsFile]) -> tuple[_Share | None, list[UnreadFile]]:
        got = [(f, _attempt(f, lambda: _read_file(out, f.path, None, threads)))
               for f in part]
        found = [(f, t) for f, t in got if isinstance(t, pa.Table)]
        unread = [u for _, u in got if isinstance(u, UnreadFile)]
        if not found:
            return None, unread
        table = pa.concat_tables([t for _, t in found], promote_options="permissive")
        return _Share([f for f, _ in found], [t.num_rows for _, t in found],
                      table.combine_chunks()), unread
    with ThreadPoolExecutor(max_workers=readers) as pool:
        parts = [files[i:i + size] for i in range(0, len(files), size)]
        done = list(pool.map(share, parts))
    return [s for s, _ in done if s is not None], [u for _, unread in done for u in unread]


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
    rewritten since): a status that refreshes reads what changed, not the history.
    After each read, `unread` (and its parts `damaged` and `foreign`) names the files in
    `metrics/` it took no rows from, for the caller to show: it never moves one."""

    def __init__(self, out: Output, columns: Sequence[str] | None = None):
        self.out = out
        self.asked = None if columns is None else list(dict.fromkeys(columns))
        self.columns = None if columns is None else list(dict.fromkeys(   # what is read
            [*columns, "id", "written_at"]))
        self._tables: dict[str, tuple[str, pa.Table]] = {}
        self._unread: dict[str, tuple[str, UnreadFile]] = {}
        self.unread: list[UnreadFile] = []

    def read(self) -> pd.DataFrame:
        listing = list_metrics(self.out)
        files = {f.path: f for f in listing.files}
        self._tables = {p: (v, t) for p, (v, t) in self._tables.items()
                        if p in files and files[p].version == v}
        self._unread = {p: (v, u) for p, (v, u) in self._unread.items()
                        if p in files and files[p].version == v}
        new = [f for p, f in files.items() if p not in self._tables and p not in self._unread]
        tables, unread = _read_files(self.out, new, self.columns)
        for path, table in tables.items():
            self._tables[path] = (files[path].version, table)
        for u in unread:
            self._unread[u.path] = (files[u.path].version, u)
        self.unread = sorted([*listing.foreign, *(u for _, u in self._unread.values())],
                             key=lambda u: u.path)
        return _located(self.out, _newest((t for _, t in self._tables.values()), self.asked))

    @property
    def damaged(self) -> list[UnreadFile]:
        """Files of the job's name that are not readable Parquet: their rows not complete."""
        return [u for u in self.unread if u.damaged]

    @property
    def foreign(self) -> list[UnreadFile]:
        """Files that are not the job's (another name, or other columns): not read."""
        return [u for u in self.unread if not u.damaged]


def read_metrics(out: Output, columns: Sequence[str] | None = None,
                 ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Every id's newest metrics row, with only `columns` (None: every column); with
    `ids`, only those ids' rows (filtered before any row is converted). Foreign files are
    not read; a damaged one is skipped and named in the log (`MetricsReader` gives both
    to a caller that shows them)."""
    reader = MetricsReader(out, columns)
    if ids is None:
        read = reader.read()
        _say_damaged(out, reader.damaged)
        return read
    tables, unread = _read_files(out, metrics_files(out), reader.columns)
    _say_damaged(out, [u for u in unread if u.damaged])
    wanted = pa.array(sorted(set(ids)), pa.string())
    return _located(out, _newest((t.filter(pc.is_in(t["id"], value_set=wanted.cast(
        t["id"].type))) for t in tables.values()), reader.asked))


def _say_damaged(out: Output, damaged: Sequence[UnreadFile]) -> None:
    for u in damaged:
        log.warning("metrics: %s/%s/%s skipped: %s (%s bytes); its rows count as not done "
                    "until a run sets it aside in %s/%s/", out.uri, FOLDER, u.name, u.reason,
                    u.size, out.uri, QUARANTINE)


def _located(out: Output, df: pd.DataFrame) -> pd.DataFrame:
    """The row-file columns as URIs where the output is now (what is recorded stays)."""
    located = {name: [out.locate(v) for v in df[name]]
               for name in ROW_FILE_COLUMNS if name in df.columns and len(df)}
    return df.assign(**located) if located else df


def metrics_schema(out: Output) -> pa.Schema:
    """Every column the output's metrics files hold, with its type (passthrough columns
    included; older files' `image_uri` as `edited_uri`), from the files' footers (the
    job's files only: a foreign or damaged file adds no column)."""
    schemas = _footers(out, metrics_files(out))[0].values()
    merged = pa.unify_schemas([METRICS_SCHEMA, *schemas], promote_options="permissive")
    if LEGACY.name in merged.names:
        merged = merged.remove(merged.get_field_index(LEGACY.name))
    return merged


def iter_metrics(out: Output, rows: int = 1000) -> Iterator[pd.DataFrame]:
    """Every column of every id's newest row, `rows` at a time (memory: one batch and the
    ids), in file order: a first pass reads ids and times only (and names a damaged file
    in the log). Row files located as `read_metrics` gives them."""
    files = metrics_files(out)
    newest = read_metrics(out, ["id", "written_at"]).set_index("id")["written_at"].to_dict()
    sent: set[str] = set()
    pending: list[pd.DataFrame] = []
    count = 0
    for chunk in _in_chunks(files):
        for share in _read_shares(out, chunk)[0]:
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
    is not deleted: its newer rows win on read and join the next compaction.

    Only the job's files take part. A damaged one is moved to `quarantine/metrics/`
    (`_quarantine`); a foreign one is left as it is and named in a warning once per run
    (the driver's compactions while a run goes on are `batch_files_only`, its last one
    is not: `_warn_foreign`). Returns the files replaced."""
    listing = list_metrics(out)
    files, unread = _finish_interrupted(out, listing.files)
    small = [f for f in files
             if f.rows is None or (not batch_files_only and f.rows < most_rows // 2)]
    replaced = 0
    if len(small) >= 2:
        replaced, missed = _merge_small(out, small, most_rows)
    else:                    # a lone batch file, which no merge reads: checked by its footer
        missed = _footers(out, [f for f in small if f.rows is None])[1]
    _set_aside(out, [*listing.foreign, *unread, *missed], run_ends=not batch_files_only)
    return replaced


def _merge_small(out: Output, small: list[MetricsFile], most_rows: int
                 ) -> tuple[int, list[UnreadFile]]:
    """`small` merged, in order, into files of about `most_rows` rows; returns the files
    replaced and those of `small` none may be read from (left out of every merge)."""
    pieces: list[pa.Table] = []            # the rows of the files in `chunk`
    replaced, chunk, held = 0, [], 0
    unread: list[UnreadFile] = []
    for part in _in_chunks(small):
        shares, missed = _read_shares(out, part)
        unread += missed
        for share in shares:
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
    return replaced, unread


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


def _footers(out: Output, files: Sequence[MetricsFile]
             ) -> tuple[dict[str, pa.Schema], list[UnreadFile]]:
    """The schemas (with metadata) of the files still there, by path, from their footers
    alone, and the files none may be read from."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        got = list(pool.map(lambda f: _attempt(f, lambda: _footer(out, f.path)), files))
    schemas = {f.path: s for f, s in zip(files, got) if isinstance(s, pa.Schema)}
    return schemas, [u for u in got if isinstance(u, UnreadFile)]


def _finish_interrupted(out: Output, files: list[MetricsFile]
                        ) -> tuple[list[MetricsFile], list[UnreadFile]]:
    """Delete the files a merged file replaces that are still there, unchanged (a
    compaction killed before its deletes). Returns the listing without them and without
    the merged files none may be read from (their footers, read here anyway, say so),
    and those."""
    footers, unread = _footers(out, [f for f in files if f.rows is not None])
    named = {path: version for schema in footers.values()
             for path, version in json.loads((schema.metadata or {}).get(REPLACES, b"[]"))}
    skipped = {u.path for u in unread}
    left = [f for f in files if named.get(f.path) == f.version and f.path not in skipped]
    if left:
        out.fs.rm([f.path for f in left])
        log.info("metrics: %d file(s) an interrupted compaction had merged, deleted",
                 len(left))
    gone = {f.path for f in left} | skipped
    return [f for f in files if f.path not in gone], unread


# ---- files that are not the job's, or damaged ------------------------------------------------
# The foreign files each output's compactions named this run, in the driver's process: its
# compactions while a run goes on are batch-files-only and its last one is not, which
# forgets them, so that the next run names them again.
_FOREIGN_SAID: dict[str, set[str]] = {}


def _set_aside(out: Output, unread: Sequence[UnreadFile], run_ends: bool) -> None:
    for u in unread:
        if u.damaged:
            _quarantine(out, u)
    _warn_foreign(out, [u for u in unread if not u.damaged], run_ends)


def _warn_foreign(out: Output, foreign: Sequence[UnreadFile], run_ends: bool) -> None:
    """Name the foreign files in `metrics/` once per run: someone put them there, and
    should know that the job takes no rows from them, and never moves them."""
    said = _FOREIGN_SAID.setdefault(out.uri, set())
    new = [u for u in foreign if f"{u.name}\n{u.reason}" not in said]
    if new:
        named = "; ".join(clip(f"{u.name} ({u.reason})", 200) for u in new[:5])
        more = f"; and {len(new) - 5} more" if len(new) > 5 else ""
        log.warning("metrics: %d file(s) in %s/%s/ are not the job's and are left as they "
                    "are (never read, merged or deleted): %s%s", len(new),
                    redact(out.uri, MAX_ECHO), FOLDER, named, more)
    said.update(f"{u.name}\n{u.reason}" for u in new)
    if run_ends:
        _FOREIGN_SAID.pop(out.uri, None)


def _damage_in(data: bytes) -> str | None:
    """Why these bytes are not a readable Parquet file (None: they are)."""
    try:
        pq.read_table(pa.BufferReader(data))
    except _PARSE_ERRORS as e:
        return _damage(e)
    return None


def _quarantine(out: Output, file: UnreadFile) -> None:
    """Move a damaged file of the job's name out of `metrics/`, its bytes kept: copied
    whole to `quarantine/metrics/`, a record beside it (file, size, reason, at), then
    removed from `metrics/` unless it was written again meanwhile. Its rows, no longer
    read, are not complete: the run edits them again. Bytes that read whole now (a
    retried batch rewrote the file since) are left where they are."""
    out.fs.invalidate_cache(file.path)
    try:
        before = _version(out.fs.info(file.path))
        data = out.fs.cat_file(file.path)
    except FileNotFoundError:
        return                                 # gone since it was listed
    reason = _damage_in(data)
    if reason is None:
        return
    rel = f"{QUARANTINE}/{file.name}"
    if out.fs.exists(out.path_of(rel)):        # an earlier file of that name: both kept
        rel = f"{QUARANTINE}/{uuid.uuid4().hex[:12]}-{file.name}"
    out.put(rel, data)
    out.put_json(f"{rel}.json", {"file": f"{FOLDER}/{file.name}", "size": len(data),
                                 "reason": reason, "at": time.time(), "moved_to": rel})
    out.fs.invalidate_cache(file.path)
    try:
        if _version(out.fs.info(file.path)) == before:
            out.fs.rm(file.path)
    except FileNotFoundError:
        pass
    log.warning("metrics: %s/%s/%s is damaged (%s, %d bytes): moved to %s/%s, a record "
                "beside it; its rows are not complete and are edited again", out.uri,
                FOLDER, file.name, reason, len(data), out.uri, rel)


def quarantined(out: Output) -> list[dict[str, Any]]:
    """The metrics files compaction set aside as damaged, oldest first: each record's
    `file` (where it was, under the output), `size`, `reason`, `at` (seconds since the
    epoch) and `moved_to`. For `maskface status` and the report."""
    folder = out.path_of(QUARANTINE)
    out.fs.invalidate_cache(folder)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in out.fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    records = []
    for name in sorted(n for n in names if n.endswith(".json") and not n.startswith(".")):
        try:
            record = out.get_json(f"{QUARANTINE}/{name}")
        except ValueError as e:              # not JSON: not one of ours, or cut short
            log.warning("ignoring the quarantine record %s/%s/%s: %s", out.uri,
                        QUARANTINE, name, e)
            continue
        if isinstance(record, dict):
            records.append({k: clip(str(v), 300) if isinstance(v, str) else v
                            for k, v in record.items()})
    return sorted(records, key=lambda r: (_seconds(r.get("at")), str(r.get("file"))))


def _seconds(value: Any) -> float:
    """A record's time, 0 when it is none (a record another tool wrote: never a crash)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def drop_stale_rows(out: Output) -> int:
    """Rewrite the files that hold rows superseded by a newer row of the same id (after
    --retry-errors); returns the rows dropped. Only the job's files: a foreign or
    damaged one is never rewritten."""
    files = metrics_files(out)
    stamps = _read_files(out, files, ["id", "written_at"])[0]
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
        try:
            full = _read_file(out, path, None)
        except _NotRead:
            continue
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
