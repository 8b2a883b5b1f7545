"""The output layout of a job under one fsspec URI, and its writes.

    images/<id>.png      edited image            latents/<id>.npy   W+ latent, float32
    masks/<id>.png       blend mask, 8-bit       noises/<id>.npz    noise maps (optional)
    pasted/<id>.png      the edit pasted back into the full photo (paste_back, aligned rows)
    prefixes/<key>.npy   shared inversion prefixes (pipeline/job/prefix.py)
    metrics/*.parquet    one row per manifest row (written last: a row with a metrics
                         row is complete; pipeline/job/metrics.py)
    job.json, summary.json

The per-row files are ROW_FILES: `Output.put_row_file(kind, id, data)` writes one and
returns the URI the metrics row records.

Every write is whole or absent: on local disk a file is written under a hidden temporary
name and renamed; on object stores one PUT is atomic already. A failed write raises
StorageError (pipeline/errors.py) naming the object and the storage's reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from typing import BinaryIO, Iterator, Mapping

import numpy as np

from .access import under
from .storage import STORAGE_ERRORS, filesystem, storage_error

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
    per-row files and JSON files (the metrics dataset: pipeline/job/metrics.py)."""

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

    def path_of(self, rel: str) -> str:
        """The filesystem path of a key under the output (never outside it)."""
        return under(self.root, rel)

    def put(self, rel: str, data: bytes) -> None:
        """Write one file whole, or raise StorageError and leave nothing new behind."""
        path = self.path_of(rel)
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
        folder, _, name = path.rpartition("/")
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

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


def _row_key(kind: str, row_id: str) -> str:
    return under(kind, f"{row_id}.{ROW_FILES[kind]}")


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
