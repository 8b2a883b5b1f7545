"""The main job on Ray Data: validated rows in, edited files and metrics out, resumable.

    rows (validated manifest) -> drop ids already complete in the output
      -> Ray Data map_batches(EditStage) on an actor pool, one actor per GPU
      -> each actor writes its rows' files, then their metrics -> summary.json

A row is complete once its metrics row exists; a rerun skips complete rows (error rows
too, unless retry_errors) and never duplicates a metrics row. A SetupError (an output
that cannot be written, `stop_after_failed_batches` whole batches in a row failing the
same way, an actor that keeps dying on one batch) ends the job with its message; what
was complete stays complete and a rerun resumes (docs/reliability.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from typing import Mapping

import pandas as pd
import pyarrow as pa

from models.check import preflight
from pipeline.engine.rows import passthrough_columns
from pipeline.errors import STOPPED, SetupError, StorageError

from pipeline.output.ledger import HISTORY_COLUMNS, SUMMARY_COLUMNS, among, pending_rows, summarize
from pipeline.output.metrics import (COMPACT_EVERY, compact, drop_stale_rows, passthrough_schema,
                      read_metrics)
from pipeline.output.jobfile import FILE, edits_of, job_record, merge_edits
from pipeline.output.layout import Output
from pipeline.output.lease import HEARTBEAT_S, Lease, Owner
from pipeline.store.storage import STORAGE_ERRORS
from pipeline.store.uris import redact
from .plan import JobPlan, code_version, image_groups, plan_job, schedule_order
from .progress import DriverProgress, describe_cluster, ray_data_progress_wanted
from .spec import JobSpec

log = logging.getLogger(__name__)


# How often Ray runs a batch again on a restarted actor after its actor died (a killed
# process, a lost node) before the job stops: finite, so an input that crashes the process
# every time cannot keep a job running forever.
ACTOR_TASK_RETRIES = 4
# How often a job runs the rows left again after Ray lost workers past those retries, and
# how long it waits for the cluster to declare a lost node dead before each such run.
RESUMES_AFTER_LOSS = 3
NODE_LOSS_WAIT_S = 60.0


def compact_and_read_history(out: Output) -> pd.DataFrame:
    """Where a run starts from: the output's metrics rows as far as a resume needs them
    (id, status, written_at), read after its batch files are merged. An old output of
    many small files (or a run killed between two compactions) is read once, by the
    merge, and every later read of it is of a few big files."""
    Compaction(out).run(batch_files_only=True)
    return read_metrics(out, HISTORY_COLUMNS)


def hold_output(job: JobSpec, *, takeover: bool = False, command: str = "") -> Lease:
    """The lease on the job's output this run holds while it writes there (one run per
    output: pipeline/output/lease.py); LeaseHeld (a SetupError) when another run holds it.
    Read-only commands never take it."""
    expiry_s = job.lease_expiry_s
    try:
        return Lease.take(Output(job.output, job.storage_options),
                          Owner.this_process(command or f"maskface run ({job.manifest})"),
                          takeover=takeover, heartbeat_s=min(HEARTBEAT_S, expiry_s / 4),
                          expiry_s=expiry_s)
    except STORAGE_ERRORS as e:            # a file where the folder should be, no access
        raise SetupError(f"the output {redact(job.output)} cannot be written "
                         f"({type(e).__name__}: {redact(str(e))}); nothing was run") from None


def run_job(rows: pd.DataFrame, job: JobSpec, manifest_schema: pa.Schema | None = None,
            address: str | None = None, ray_init_kwargs: Mapping | None = None, *,
            manifest_ids: list[str] | None = None, history: pd.DataFrame | None = None,
            lease: Lease | None = None) -> dict:
    """Run (or resume) a job over validated manifest rows. Returns the summary dict.

    `rows` may leave out rows already complete when `manifest_ids` lists every id of the
    manifest (read_manifest's `complete`); `history`: compact_and_read_history's answer,
    when the caller has it already (read under `lease`). `lease`: the output's lease the
    caller holds (`hold_output`); without one, the run takes it and lets it go at the end."""
    if lease is None:
        with hold_output(job) as lease:
            return run_job(rows, job, manifest_schema, address, ray_init_kwargs,
                           manifest_ids=manifest_ids, history=history, lease=lease)
    started = time.time()
    out = Output(job.output, job.storage_options)
    ids = list(rows["id"]) if manifest_ids is None else manifest_ids
    schema = passthrough_schema(manifest_schema, passthrough_columns(rows.columns))
    history = compact_and_read_history(out) if history is None else history   # read once
    todo = pending_rows(rows, history, job.retry_errors)
    skipped = len(ids) - len(todo)
    # the default rule's folders (the manifest's and those it records) made explicit
    # once, here: every actor checks its rows' inputs against the same ones
    job = dataclasses.replace(job, inputs=job.inputs.for_manifest(job.manifest, manifest_schema))
    log.log(logging.WARNING if job.inputs.allows_any else logging.INFO, "%s",
            job.inputs.describe())
    plan = plan_job(todo, job, schema) if len(todo) else None
    # every checkpoint the actors will load, checked before any of them starts: a bad
    # file ends the job here, in seconds, naming it (CheckpointError, a SetupError)
    checkpoints = preflight(plan.models_spec, plan.networks, job.storage_options) if plan else {}
    lease.check()                  # taken over meanwhile: the output is another run's
    _record_start(out, job, plan, started, len(ids), checkpoints)
    log.info("%d rows: %d already complete, %d to edit", len(ids), skipped, len(todo))
    this_run = pd.DataFrame(columns=["id", "status"])
    stopped = None
    if plan is not None:
        try:
            this_run = _run_with_resumes(todo, len(ids), out, job, plan, history, address,
                                         ray_init_kwargs, lease)
        except SetupError as e:
            stopped = e
    lease.check()                        # taken over: the output is another run's now
    return _finish(out, job, set(ids), this_run, skipped, started, stopped)


def _record_start(out: Output, job: JobSpec, plan: JobPlan | None, started: float, rows: int,
                  checkpoints: dict[str, str]) -> None:
    """job.json for this run: the spec, the edits (the earlier runs' kept), the checkpoint
    hashes the driver checked; an output that cannot take it stops the job before any work."""
    try:
        edits = merge_edits(_recorded_edits(out), plan.edits() if plan else [])
        out.put_json(FILE, job_record(
            job.as_dict(), job.edit.base.as_dict(), edits, code_version=code_version(),
            started_at=started, rows=rows, checkpoints_sha256=checkpoints))
    except StorageError as e:
        raise SetupError(f"the output cannot be written ({e}); nothing was run") from None


def _finish(out: Output, job: JobSpec, ids: set[str], this_run: pd.DataFrame, skipped: int,
            started: float, stopped: SetupError | None) -> dict:
    """The run's end: stale rows dropped, the metrics compacted, summary.json written.
    When the job stopped, its cause is what the caller sees: a failure here (the output
    that stopped it is full, say) is logged after it and never replaces it."""
    try:
        if job.retry_errors and stopped is None:
            drop_stale_rows(out)
        Compaction(out).run()              # the next read of this output is a few files
        summary = summarize(read_metrics(out, SUMMARY_COLUMNS), ids, this_run, skipped,
                            time.time() - started, job.output)
        summary["this_run"]["started_at"] = started  # the report matches it to job.json's
        if stopped is not None:
            summary["stopped"] = str(stopped)
        out.put_json("summary.json", summary)
    except (StorageError, *STORAGE_ERRORS) as e:      # type: ignore[misc]
        if stopped is not None:
            log.warning("after the job stopped, its summary.json could not be written "
                        "either: %s", redact(str(e)))
            raise stopped from None
        raise SetupError(f"the output cannot be written ({redact(str(e))}): summary.json is "
                         "missing; complete rows stay complete, rerun to finish") from None
    if stopped is not None:
        raise stopped
    return summary


def _recorded_edits(out: Output) -> list[dict] | None:
    """The edits the output's job.json records from the runs before this one (None when
    there is none, or it cannot be read: this run's own edits are then recorded alone)."""
    try:
        return edits_of(out.get_json(FILE))
    except ValueError as e:                 # not JSON: another tool's, or cut short
        log.warning("ignoring the edits of the unreadable %s/%s: %s", out.uri, FILE, e)
        return None


class WorkersLost(Exception):
    """Ray lost edit actors mid-run past their retries (a node gone, a process that keeps
    dying); `nodes`: the nodes alive when that run started."""

    def __init__(self, message: str, nodes: set[str]):
        super().__init__(message)
        self.nodes = nodes


def _run_with_resumes(todo: pd.DataFrame, total: int, out: Output, job: JobSpec, plan: JobPlan,
                      history: pd.DataFrame, address: str | None,
                      ray_init_kwargs: Mapping | None, lease: Lease) -> pd.DataFrame:
    """`_run_on_ray`, run again over the rows still to do when Ray lost workers (a
    preempted node), at most RESUMES_AFTER_LOSS times, once the cluster knows which
    nodes are gone. Rows whose metrics row appeared meanwhile (`history`: the rows
    before the run) are not run again."""
    before = _written(out, history)
    compaction = Compaction(out)
    for attempt in range(RESUMES_AFTER_LOSS + 1):
        try:
            this_run = _run_on_ray(schedule_order(todo, plan), total, job, plan, compaction,
                                   address, ray_init_kwargs, lease)
            if attempt == 0:
                return this_run
            break
        except WorkersLost as e:
            if attempt == RESUMES_AFTER_LOSS:
                raise SetupError(f"Ray lost edit workers {attempt + 1} times ({e}); the job "
                                 "stops. Complete rows stay complete: rerun to resume") from None
            todo = todo[~among(todo["id"], _changed(before, out))]
            log.warning("lost edit workers (%s); %d row(s) left: resuming on the nodes still "
                        "alive", e, len(todo))
            _wait_for_lost_nodes(e.nodes)
            if not len(todo):
                break
    done = read_metrics(out, HISTORY_COLUMNS)       # after a loss: what this run wrote
    return done.loc[among(done["id"], _changed(before, out, done)), ["id", "status"]]


def _changed(before: dict[str, float], out: Output, done: pd.DataFrame | None = None) -> set:
    """Ids whose metrics row appeared or was replaced since `before` (no clocks compared)."""
    return {i for i, at in _written(out, done).items() if before.get(i) != at}


def _written(out: Output, done: pd.DataFrame | None = None) -> dict[str, float]:
    done = read_metrics(out, ["id", "written_at"]) if done is None else done
    return dict(zip(done["id"], done["written_at"])) if len(done) else {}


class Compaction:
    """The batch files the actors write, merged by the driver: every COMPACT_EVERY rows
    while the job runs (the batch files since the last time into one), and when it ends
    (the merged files into files of up to COMPACT_ROWS rows; pipeline/output/metrics.py).
    A compaction that fails is said and left for the next one: it only makes reads
    faster."""

    def __init__(self, out: Output):
        self.out, self.rows = out, 0

    def rows_done(self, n: int) -> None:
        self.rows += n
        if self.rows >= COMPACT_EVERY:
            self.run(batch_files_only=True)

    def run(self, batch_files_only: bool = False) -> None:
        self.rows = 0
        try:
            compact(self.out, batch_files_only=batch_files_only)
        except Exception as e:                       # noqa: BLE001 -- reads stay correct
            log.warning("metrics compaction skipped (%s: %s); the next one tries again",
                        type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))


def _alive_nodes() -> set[str]:
    import ray
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _wait_for_lost_nodes(nodes: set[str]) -> None:
    """Until the cluster reports one of `nodes` dead (or NODE_LOSS_WAIT_S: an actor lost on
    a node that lives): resources counted then are the ones left, so the next run does not
    wait for an actor on a node that is gone."""
    timeout_s = NODE_LOSS_WAIT_S
    started = time.time()
    while time.time() < started + timeout_s and not nodes - _alive_nodes():
        time.sleep(2)
    gone = nodes - _alive_nodes()
    log.info("%s after %.0f s", f"{len(gone)} node(s) gone" if gone else "no node gone",
             time.time() - started)


def _actor_resources(job: JobSpec) -> tuple[int, dict, bool]:
    """(actors, resources per actor, on GPUs). An actor must never hold every CPU: the
    read and repartition tasks would then wait forever (a GPU actor takes 1 CPU by
    default; a CPU actor its threads)."""
    import ray
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n_actors = job.actors or max(gpus, 1)
    cpu_room = max(resources.get("CPU", 1) - 1, 0.5) / n_actors
    per_actor = ({"num_gpus": 1, "num_cpus": min(job.actor_cpus, cpu_room)} if gpus
                 else {"num_gpus": 0, "num_cpus": min(job.cpu_threads, cpu_room)})
    return n_actors, per_actor, bool(gpus)


def _run_on_ray(todo: pd.DataFrame, total: int, job: JobSpec, plan: JobPlan,
                compaction: Compaction, address: str | None,
                ray_init_kwargs: Mapping | None, lease: Lease) -> pd.DataFrame:
    """The rows through an actor pool of EditStage, with progress over the manifest's
    `total` rows; returns each row's id and status."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from .stage import EditStage

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None,
                 **dict(ray_init_kwargs or {}))
    log.info("%s", describe_cluster(address or os.environ.get("RAY_ADDRESS")))
    nodes = _alive_nodes()
    n_actors, per_actor, on_gpus = _actor_resources(job)
    log.info("%d %s actor(s), batch size %d", n_actors, "GPU" if on_gpus else "CPU",
             job.batch_size)
    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = job.no_progress_timeout_s
    ctx.enable_progress_bars = ray_data_progress_wanted()    # ours below; theirs with -v
    groups = image_groups(todo, job.batch_size)
    per_call = max(1, round(job.batch_size * len(groups) / len(todo)))   # images per call
    blocks = max(n_actors, math.ceil(len(groups) / per_call))
    ds = ray.data.from_pandas(groups).repartition(blocks)
    with warnings.catch_warnings():
        # Ray Data takes max_task_retries only as a `ray_remote_args` key, which Ray 2.60
        # calls deprecated (no named parameter exists for it yet)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            EditStage, batch_size=per_call, batch_format="pandas",
            compute=ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs=dict(
                job=job, plan=plan, cpu_threads=None if on_gpus else job.cpu_threads),
            max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES, **per_actor)
    return _collect(ds, total, len(todo), nodes, compaction, lease)


def _collect(ds, total: int, pending: int, nodes: set[str], compaction: Compaction,
             lease: Lease) -> pd.DataFrame:
    """Each row's id and status as the actors hand them back, with progress. Rows with
    status `stopped` end the job (SetupError, their message), as does the lease lost to
    another run; Ray losing actors past their retries raises WorkersLost; any other
    error is raised as it is."""
    parts = []
    with DriverProgress(total=total, before=total - pending) as progress:
        try:
            for b in ds.iter_batches(batch_format="pandas", batch_size=None):
                stopped = b[b["status"] == STOPPED]
                if len(stopped):           # an actor ended the job: stop reading, say why
                    raise SetupError(str(list(stopped["error"])[0]))
                parts.append(b[["id", "status"]])
                progress.update(b["status"])
                lease.rows_done += len(b)
                lease.check()
                compaction.rows_done(len(b))
        except SetupError:
            raise
        except Exception as e:
            lost = _lost_workers(e)
            if lost is None:
                raise
            raise WorkersLost(lost, nodes) from None
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", "status"])


def _lost_workers(error: BaseException) -> str | None:
    """What Ray says when it lost an edit actor past its retries (its node died, its
    process kept dying), or None for any other error (a bug: raised with its traceback)."""
    import ray.exceptions as rex
    lost = (rex.ActorDiedError, rex.ActorUnavailableError, rex.WorkerCrashedError,
            rex.NodeDiedError)
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, lost):
            return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    return None
