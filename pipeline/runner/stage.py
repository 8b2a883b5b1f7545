"""The Ray Data stage: a model-holding callable class, one instance per GPU.

Ray Data creates an actor pool of `EditStage`; each actor loads the networks the job
needs once, in `__init__`, and edits manifest rows in `__call__`. The job hands it
image groups (all the edit rows of one input image: see `plan.image_groups`),
which it edits `batch_size` rows at a time (on a GPU, the largest size up to that which
fits, probed once). Rows carry URIs, not pixels: the actor reads each image once,
branches its local edits from the image's shared inversion prefix (pipeline/runner/prefix.py),
writes the image, latent, mask (and noise) files, then each batch's metrics file, and
returns the metrics rows.

Failures (pipeline/errors.py): a RowError (a refused URI, an unusable image, a storage
error on one object, a numeric blow-up) becomes that row's `status=error` row. An
exception of the engine fails its whole batch's rows the same way; the failure streak
(`stop_after_failed_batches` such batches in a row that fail with the same exception
type, or every row on the same storage outage) raises JobStopped, which ends the job: a
bug or a broken GPU stops it instead of turning every row into an error. A SetupError
ends the job at once, as does a metrics file that cannot be written (nothing could be
recorded).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import time
import traceback
from collections import OrderedDict
from typing import Any, Generic, Iterator, TypeVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from models.identity import load_identity
from models.loaders import load_models
from pipeline.engine.batch_size import auto_batch_size
from pipeline.engine.editor import Editor, EditResult, StartPoint
from pipeline.engine.rows import EditRequest, is_null
from pipeline.engine.schedule import shared_prefix
from pipeline.errors import (STOPPED, JobStopped, RowError, SetupError, StorageError,
                             MAX_MESSAGE, clip_message)

from pipeline.output.images import encode_png, paste, png_bytes, read_image, read_pil, to_uint8
from pipeline.output.layout import Output, npy_bytes, npz_bytes
from pipeline.output.ledger import OK
from pipeline.output.metrics import METRICS_SCHEMA, NETWORK_HASH_COLUMNS, write_metrics
from pipeline.store.storage import is_outage
from pipeline.store.uris import redact
from .plan import JobPlan
from .prefix import PrefixCache, branch_points, start_for
from .spec import JobSpec

log = logging.getLogger(__name__)

# per edited attribute in the engine's metrics, a list aligned with `attributes` here
PER_ATTRIBUTE = ("prob_input", "prob_result", "judge_prob_input", "judge_prob_result")


class EditStage:
    """One actor of the job: `job` is the job spec, `plan` what the driver decided
    (pipeline/runner/plan.py), `cpu_threads` the torch threads of a CPU actor (None on GPUs:
    torch's own choice)."""

    def __init__(self, job: JobSpec, plan: JobPlan, cpu_threads: int | None = None):
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.job, self.plan = job, plan
        self.setup_error: SetupError | None = None
        self._clock = PhaseClock()
        self._idle_since = time.perf_counter()
        try:
            self._load(job, plan)
        except Exception as e:   # noqa: BLE001 -- every actor would fail alike: not a lost worker
            # Raised here, Ray would take it for a dying worker and restart the actor, again
            # and again; instead the actor lives and stops the job with it (__call__).
            message = " ".join(str(e).split()) or type(e).__name__
            self.setup_error = (e if isinstance(e, SetupError) else SetupError(
                f"an edit actor could not start ({type(e).__name__}: {message})"))
            log.error("edit actor setup failed: %s", redact(str(self.setup_error)))

    def _load(self, job: JobSpec, plan: JobPlan) -> None:
        """The actor's models and state, loaded once."""
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.runtime = job.runtime
        self.runtime.apply(torch.device(self.device))       # this actor's process
        self.editor = Editor(load_models(plan.models_spec, device=self.device,
                                         parser_size=plan.parser_size, networks=plan.networks,
                                         storage_options=job.storage_options),
                             runtime=self.runtime)
        self.models = self.editor.models  # the networks as the runtime prepared them, held once
        self.model_loads = 1          # reported per row: more would mean a reloading actor
        self.chunk = self._batch_size(job.batch_size, job.auto_batch, plan.parser_size)
        self.output = Output(job.output, job.storage_options)
        self.prefixes = PrefixCache(self.output) if job.share_prefix else None
        self._images: dict[str, torch.Tensor] = {}     # this call's decoded inputs, by URI
        self.inputs = job.inputs
        self.placement = self._placement()
        self.face_identity = load_identity()      # dlib's face descriptors (the align extra)
        # each image's input side of the identity metric, and its source photo, once per
        # image: the plan keeps an image's rows together, so a few entries suffice
        self._input_faces: Recent[Any] = Recent(64)
        self._photos: Recent[Image.Image] = Recent(2)
        self.streak = FailureStreak(job.stop_after_failed_batches, self.placement["node"])
        self._idle_since = time.perf_counter()    # waiting for input starts now
        log.info("edit actor ready on %s (%s)", self.placement["node"], self.device)

    def _batch_size(self, cap: int, auto: bool, parser_size: int) -> int:
        """`cap`, or on a GPU the largest batch up to it whose heaviest step fits (on a CPU
        running out of memory kills the process rather than raising: no probe there)."""
        if not auto or self.device != "cuda":
            return cap
        mode = "global" if any(not s.local for s in self.plan.resolved.values()) else "local"
        size = auto_batch_size(self.models, self.runtime, mode, cap, parser_size)
        log.info("batch size %d (probed; the job's cap %d)", size, cap)
        return size

    @staticmethod
    def _placement() -> dict:
        """Where this actor runs: its node, its Ray actor id and its GPUs."""
        try:
            import ray
            if not ray.is_initialized():   # asking would start a local Ray instance
                raise RuntimeError("outside Ray")
            ctx = ray.get_runtime_context()
            actor = ctx.get_actor_id() or f"pid-{os.getpid()}"
            gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
            node = f"{socket.gethostname()}/{ctx.get_node_id()[:12]}"
        except Exception:   # outside Ray (direct use, tests)
            actor, gpu_ids, node = f"pid-{os.getpid()}", "", socket.gethostname()
        return {"node": node, "actor": actor, "gpu_ids": gpu_ids}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """The metrics rows of the batch's edit rows (image groups are unpacked), edited
        `self.chunk` at a time. On a SetupError, the rows not yet done come back with
        status `stopped` and the message (recorded nowhere: they stay pending), which
        tell the driver to end the job (an exception would reach it buried in Ray Data's
        own error)."""
        waited = time.perf_counter() - self._idle_since
        rows = unpack(batch)
        if self.setup_error is not None:
            return self._stopped(rows, self.setup_error)
        self._images = {}                                    # each image read once per call
        self._clock = PhaseClock(wait=waited)    # the first chunk's rows carry the wait
        try:
            return self._call(rows)
        finally:
            self._idle_since = time.perf_counter()

    def _call(self, rows: list[dict]) -> pd.DataFrame:
        parts = []
        for start in range(0, len(rows), self.chunk):
            try:
                parts.append(self._run(rows[start:start + self.chunk]))
            except SetupError as e:
                log.error("stopping the job: %s", e)
                parts.append(self._stopped(rows[start:], e))
                break
        return pd.concat(parts, ignore_index=True)

    def _stopped(self, rows: list[dict], error: SetupError) -> pd.DataFrame:
        """`rows` handed back with status `stopped` and the error: the driver ends the job."""
        stopped = pd.DataFrame({n: [None] * len(rows) for n in self.plan.schema.names})
        stopped["id"] = [r["id"] for r in rows]
        stopped["status"] = STOPPED
        stopped["error"] = clip_message(redact(str(error), MAX_MESSAGE))
        return stopped

    def _run(self, rows: list[dict]) -> pd.DataFrame:
        records = [self._base_record(r) for r in rows]
        errors: list[Exception | None] = [None] * len(rows)
        with self._clock.phase("read"):
            inputs = self._read_inputs(rows, records, errors)
        if inputs:
            self._edit(rows, records, errors, inputs)
        shares = self._clock.per_row(len(rows))      # where this chunk's time went
        self._clock = PhaseClock()
        for r in records:
            r.update(shares)
        self.streak.record(errors)                   # may stop the job (JobStopped)
        now = time.time()
        for r in records:
            r["written_at"] = now
        out = pd.DataFrame.from_records(records)
        for name in self.plan.schema.names:
            if name not in out.columns:
                out[name] = None
        try:
            write_metrics(self.output, out, self.plan.schema)    # last: the rows are now complete
        except StorageError as e:
            raise SetupError(f"cannot write the metrics of {len(out)} row(s) under "
                             f"{redact(self.output.uri)}: the output cannot be written ({e}). "
                             "Nothing can be recorded, so the job stops; rerun it once the "
                             "output is writable") from None
        return out[self.plan.schema.names]

    @staticmethod
    def _fail(records: list[dict], errors: list, k: int, error: Exception,
              prefix: str = "") -> None:
        errors[k] = error
        text = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, RowError):               # an engine exception
            text = f"{type(error).__name__}: {text}"
        records[k].update(status="error",
                          error=clip_message(redact(f"{prefix}: {text}" if prefix else text,
                                                    MAX_MESSAGE)))

    def _read_inputs(self, rows: list[dict], records: list[dict], errors: list) -> list[tuple]:
        """(position, image, request, settings) of each row whose input is usable; the
        others get their error on their record."""
        inputs = []
        for k, row in enumerate(rows):
            try:
                image = self._images.get(row["image_uri"])
                if image is None:
                    self.inputs.check(row["image_uri"])          # before any request
                    image = read_image(row["image_uri"], self.editor.resolution,
                                       self.job.storage_options, self.inputs)
                    self._images[row["image_uri"]] = image
                request = EditRequest.from_row(row)
            except RowError as e:
                self._fail(records, errors, k, e)
                continue
            inputs.append((k, image, request,
                           self.plan.settings_of(request.attributes, row.get("mode"))))
        return inputs

    def _edit(self, rows: list[dict], records: list[dict], errors: list,
              inputs: list[tuple]) -> None:
        """Rows that share an inversion prefix branch from it (rows whose prefixes end at
        different steps in separate calls); the others start as usual."""
        started = time.perf_counter()
        ends = [shared_prefix(x[3]) if self.prefixes is not None else 0 for x in inputs]
        for end in dict.fromkeys(ends):
            self._edit_part(rows, records, errors,
                            [x for x, e in zip(inputs, ends) if e == end], end > 0)
        log.info("edited %d rows in %.1f s", len(inputs), time.perf_counter() - started)

    def _edit_part(self, rows: list[dict], records: list[dict], errors: list,
                   inputs: list[tuple], from_prefix: bool) -> None:
        positions, images, requests, settings = zip(*inputs)
        try:
            with self._clock.phase("engine"):
                results, start = self._engine(images, requests, settings, from_prefix,
                                              positions, records)
        except SetupError:
            raise
        except Exception as e:
            # the engine failed the whole batch (a bug, out of memory, a broken device):
            # its rows fail, and the FailureStreak decides whether the job goes on
            log.error("batch failed: %s", traceback.format_exc())
            for k in positions:
                self._fail(records, errors, k, e, "batch failed")
            return
        for k, image, result in zip(positions, images, results):
            if result.ok and from_prefix:         # its share of the prefix's steps counts too
                result.metrics["steps"] += start.step or 0
            if not result.ok:
                self._fail(records, errors, k, RowError(result.error))
                continue
            try:
                records[k].update(self._write(rows[k], result, image))
            except RowError as e:
                self._fail(records, errors, k, e, "writing outputs")

    def _engine(self, images, requests, settings, from_prefix: bool, positions,
                records: list[dict]) -> tuple[list[EditResult], StartPoint]:
        """The edit itself (from the image's shared prefix when it has one)."""
        start = StartPoint()
        if from_prefix:
            assert self.prefixes is not None
            latents, sources = branch_points(self.editor, self.prefixes, list(images),
                                             list(requests), list(settings), self.chunk,
                                             self.runtime.autocast)
            start = start_for(latents, list(settings))
            for k, source in zip(positions, sources):
                records[k]["prefix"] = source
        results = self.editor.edit(torch.stack(images), list(requests),
                                   settings=list(settings), start=start)
        return results, start

    def _base_record(self, row: dict) -> dict[str, Any]:
        record = {k: v for k, v in row.items() if k in self.plan.schema.names}
        hashes = self.models.hashes
        source = row.get("source_uri")
        record.update({
            "status": OK, "error": None, "input_uri": redact(row["image_uri"]),
            "source_uri": redact(row["image_uri"] if is_null(source) else str(source)),
            "attributes": list(row["attributes"]), "targets": [float(t) for t in row["targets"]],
            "size": float(row["size"]), "seed": int(row["seed"]),
            "mode": None, **self.placement, "actor_model_loads": self.model_loads,
            "tiny_models": self.models.tiny, "code_version": self.plan.code_version,
            **{column: hashes.get(name) for name, column in NETWORK_HASH_COLUMNS.items()}})
        return record

    def _write(self, row: dict, result: EditResult, image: torch.Tensor) -> dict[str, Any]:
        """The row's files, then its metric values for the record (`image`: the input)."""
        out, row_id = self.output, row["id"]
        assert result.edited is not None and result.latent is not None
        level = self.job.png_compress_level
        with self._clock.phase("write"):
            record: dict[str, Any] = {
                "edited_uri": out.put_row_file("images", row_id,
                                               encode_png(result.edited, level)),
                "latent_uri": out.put_row_file("latents", row_id,
                                               npy_bytes(result.latent.float().numpy())),
                "mask_uri": out.put_row_file("masks", row_id,
                                             encode_png(result.masks["blend"], level))}
            if self.job.save_noises and result.noises is not None:
                record["noises_uri"] = out.put_row_file("noises", row_id, npz_bytes(
                    {f"noise_{i}": n.float().numpy() for i, n in enumerate(result.noises)}))
        quad = row.get("align_quad")
        if (self.job.paste_back and not is_null(row.get("source_uri")) and quad is not None
                and len(quad) == 8):
            with self._clock.phase("post"):
                record["pasted_uri"] = self._paste_back(row, result, quad)
        m = result.metrics
        attrs = list(m["prob_input"])
        record.update({k: v for k, v in m.items()           # the engine's values, as named
                       if k in METRICS_SCHEMA.names and k not in PER_ATTRIBUTE})
        record.update({k: None if m[k] is None else [m[k][a] for a in attrs]
                       for k in PER_ATTRIBUTE})
        with self._clock.phase("post"):
            before = to_uint8(image)
            record.update(self.face_identity.compare_one(
                before, to_uint8(result.edited), self._input_face(row["image_uri"], before)))
        return record

    def _input_face(self, uri: str, before: np.ndarray) -> Any:
        """The input's side of the identity metric, once per image (None when it cannot
        be had: `compare_one` then tries again and records why)."""
        if self.face_identity.unavailable:
            return None
        face = self._input_faces.get(uri)
        if face is None:
            try:
                face = self._input_faces.put(uri, self.face_identity.describe(before))
            except Exception:  # noqa: BLE001 -- said on the row by compare_one
                return None
        return face

    def _paste_back(self, row: dict, result: EditResult, quad) -> str:
        """The edit pasted back into its source photo (read once per image), written."""
        uri = row["source_uri"]
        assert result.edited is not None
        photo = self._photos.get(uri)
        if photo is None:
            self.inputs.check(uri)
            photo = self._photos.put(uri, read_pil(uri, self.job.storage_options,
                                                   self.inputs))
        edited = Image.fromarray(to_uint8(result.edited))
        try:
            pasted = paste(photo, edited, np.asarray(quad, dtype=np.float64).reshape(4, 2))
        except np.linalg.LinAlgError:
            raise RowError(f"paste-back: align_quad {[float(v) for v in quad]} is "
                           "degenerate") from None
        return self.output.put_row_file("pasted", row["id"],
                                        png_bytes(pasted, self.job.png_compress_level))


T = TypeVar("T")


class Recent(Generic[T]):
    """The last `size` values by key (least recently used first out): an actor's
    per-image work kept while that image's rows run."""

    def __init__(self, size: int):
        self.size, self._items = size, OrderedDict()     # type: ignore[var-annotated]

    def get(self, key: str) -> T | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, value: T) -> T:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


class PhaseClock:
    """Where an actor's time goes while it runs rows (PHASES: reading and decoding
    inputs, the engine, encoding and writing files, identity and paste-back, waiting
    for input), for one chunk; each row records its share (`per_row`), so the engine's
    share of an actor's time is read from the metrics alone (pipeline/output/ledger.py)."""
    PHASES = ("read", "engine", "write", "post", "wait")

    def __init__(self, wait: float = 0.0):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.seconds["wait"] = wait

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def per_row(self, rows: int) -> dict[str, float]:
        return {f"time_{k}_s": v / max(rows, 1) for k, v in self.seconds.items()}


class FailureStreak:
    """The failure streak, on one actor: `limit` whole batches in a row that failed the
    same way raise JobStopped. A batch failed whole when every row of it failed with the
    same engine exception type, or on a storage outage of the same kind
    (pipeline/store/storage.py `is_outage`: not a missing or denied object); a bad input
    is the row's own business and never counts. Any other batch resets the count; a
    limit of 0 never stops."""

    def __init__(self, limit: int, node: str):
        self.limit, self.node = limit, node
        self.kind: str | None = None
        self.count = 0
        self.error_rows = 0               # rows the streak's earlier batches recorded as errors
        self.last = ""

    def record(self, errors: list[Exception | None]) -> None:
        kinds = {_failure_kind(e) for e in errors}
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind is None:
            self.kind, self.count, self.error_rows = None, 0, 0
            return
        if kind != self.kind:
            self.kind, self.count, self.error_rows = kind, 0, 0
        self.count += 1
        self.last = redact(" ".join(str(errors[0]).split()))[:500]
        if self.limit and self.count >= self.limit:
            raise JobStopped(
                f"{self.count} batches in a row failed with {kind} on {self.node} (the "
                f"last: {self.last}). The job stops here (stop_after_failed_batches: "
                f"{self.limit}). Rows already complete stay complete; the earlier "
                f"{self.error_rows} row(s) of this streak were recorded as errors and this "
                "batch's rows stay pending. Fix the cause, then rerun the job with "
                "--retry-errors to redo them.")
        self.error_rows += len(errors)


def _failure_kind(error: Exception | None) -> str | None:
    """What a row's failure says about the batch: an engine exception's type, a storage
    outage's kind, or None (the row succeeded, or its own input failed it)."""
    if error is None:
        return None
    if isinstance(error, StorageError):
        return f"a storage error ({error.kind})" if is_outage(error) else None
    if isinstance(error, RowError):
        return None
    return type(error).__name__


def unpack(batch: pd.DataFrame) -> list[dict]:
    """The edit rows of a batch: image groups unpacked (as `plan.image_groups` packs them:
    pickled by this job's driver), or a batch of edit rows as it is (the stage called
    directly)."""
    if "rows" in batch.columns and "id" not in batch.columns:
        return [row for packed in batch["rows"] for row in pickle.loads(packed)]
    return batch.to_dict("records")
