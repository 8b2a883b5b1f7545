"""The output layout of a job under one URI (local or any fsspec store), and its writes.

    images/<id>.png      edited image            latents/<id>.npy   W+ latent, float32
    masks/<id>.png       blend mask, 8-bit       noises/<id>.npz    noise maps (optional)
    pasted/<id>.png      the edit pasted back into the full photo (paste_back, aligned rows)
    prefixes/<key>.npy   shared inversion prefixes (pipeline/runner/prefix.py)
    metrics/*.parquet    one row per manifest row (written last: a row with a metrics
                         row is complete; pipeline/output/metrics.py)
    job.json, summary.json
    lease.json           the run that holds the output while it runs (pipeline/output/lease.py)

The per-row files are ROW_FILES: `Output.put_row_file(kind, id, data)` writes one and
returns what the metrics row records: its key relative to the output (`images/<id>.png`),
so an output moved or copied elsewhere still finds its files. `Output.locate(recorded)`
gives a recorded value's URI where the output is now; it also reads the values older
outputs recorded (the URI at write time, absolute or relative to the job's folder).

Every write is whole or absent (pipeline/store/storage.py `put_file`): on local disk a
file is written under a hidden temporary name and renamed; on object stores one PUT is
atomic already. A failed write raises StorageError (pipeline/errors.py) naming the
object and the storage's reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

from pipeline.store.storage import (STORAGE_ERRORS, filesystem, is_local_fs, put_file,
                                    replaced_atomically, storage_error)
from pipeline.store.uris import under

log = logging.getLogger(__name__)

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
    per-row files and JSON files (the metrics dataset: pipeline/output/metrics.py)."""

    def __init__(self, uri: str, storage_options: Mapping | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, storage_options)
        self.local = is_local_fs(self.fs)

    def put_row_file(self, kind: str, row_id: str, data: bytes) -> str:
        """Write one row's file of a kind (ROW_FILES); returns its key under the output
        (`images/<id>.png`), which the metrics row records."""
        key = row_key(kind, row_id)
        self.put(key, data)
        return key

    def locate(self, recorded: Any) -> str | None:
        """The URI, where this output is now, of a row file a metrics row recorded (None
        for a null). Row files live in ROW_FILES' folders directly under the output, so
        the recorded value's last two segments name it whatever the output's place was
        when it was written (a key, an absolute path, a path relative to the folder the
        job ran in, an s3:// URI)."""
        if not isinstance(recorded, str) or not recorded:
            return None
        folder, _, name = recorded.rstrip("/").rpartition("/")
        kind = folder.rpartition("/")[2]
        if kind not in ROW_FILES or not name:
            return recorded                 # not a row file of an output: as recorded
        return f"{self.uri}/{kind}/{name}"

    def path_of(self, rel: str) -> str:
        """The filesystem path of a key under the output (never outside it)."""
        return under(self.root, rel)

    def put(self, rel: str, data: bytes) -> None:
        """Write one file whole, or raise StorageError and leave nothing new behind."""
        try:
            put_file(self.fs, self.path_of(rel), data)
        except STORAGE_ERRORS as e:
            raise storage_error(e, f"{self.uri}/{rel}", "writing") from None

    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        """A file written in pieces that appears whole when the block ends, or not at all:
        on local disk under a hidden temporary name, renamed at the end; on an object
        store the upload completes at close."""
        path = self.path_of(rel)
        if not self.local:
            try:
                with self.fs.open(path, "wb") as f:
                    yield f
            except STORAGE_ERRORS as e:
                raise storage_error(e, f"{self.uri}/{rel}", "writing") from None
            return
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            yield f

    def put_json(self, rel: str, obj) -> None:
        self.put(rel, json.dumps(obj, indent=2, default=str).encode())

    def get_json(self, rel: str) -> dict | None:
        """A JSON file under the output (job.json, summary.json), or None when there is none."""
        try:
            with self.fs.open(self.path_of(rel), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def put_npy(self, rel: str, array: np.ndarray) -> None:
        self.put(rel, npy_bytes(array))

    def get_npy(self, rel: str) -> np.ndarray | None:
        """A .npy file under the output, or None when there is none (or it is unreadable:
        a cache entry is then made again)."""
        path = self.path_of(rel)
        try:
            with self.fs.open(path, "rb") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, EOFError, *STORAGE_ERRORS) as e:  # type: ignore[misc]
            log.warning("ignoring %s/%s: %s", self.uri, rel, e)
            return None


def row_key(kind: str, row_id: str) -> str:
    """A row's file of a kind, as its key under the output: `images/<id>.png`."""
    return under(kind, f"{row_id}.{ROW_FILES[kind]}")
