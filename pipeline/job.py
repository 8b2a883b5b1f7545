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

import logging
import math
import os
import pickle
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa

from models.loaders import check_spec_names
from models.spec import ModelsSpec, read_spec

from .access import InputPolicy
from .config import EditConfig, Settings, apply_mean_latent, required_networks, settings_key
from .errors import STOPPED, SetupError, StorageError
from .outputs import Output, attribute_outcomes, passthrough_schema
from .progress import DriverProgress, describe_cluster, ray_data_progress_wanted
from .rows import passthrough_columns

log = logging.getLogger(__name__)


@dataclass
class JobSettings:
    manifest: str
    output: str
    models: str
    edit: dict = field(default_factory=dict)
    batch_size: int = 4
    actors: int | None = None         # default: one per GPU; 1 CPU actor on a machine without
    cpu_threads: int = 2              # torch threads of a CPU actor
    actor_cpus: float = 0.25          # CPUs reserved per GPU actor (leave room for reads)
    storage_options: dict = field(default_factory=dict)
    save_noises: bool = False
    paste_back: bool = False          # write pasted/<id>.png for rows with source_uri + align_quad
    no_progress_timeout_s: float = 7200.0
    retry_errors: bool = False
    inputs: dict = field(default_factory=dict)   # allow-list and image limits (pipeline/access.py)
    stop_after_failed_batches: int = 3          # K whole batches in a row failing alike stop the job
    runtime: dict = field(default_factory=dict)  # how the engine runs (pipeline/runtime.py)
    auto_batch: bool = True           # GPU actors probe the largest batch up to batch_size
    share_prefix: bool = True         # each image's shared inversion prefix runs once


# How often Ray runs a batch again on a restarted actor after its actor died (a killed
# process, a lost node) before the job stops: finite, so an input that crashes the process
# every time cannot keep a job running forever.
ACTOR_TASK_RETRIES = 4
# How often a job runs the rows left again after Ray lost workers past those retries, and
# how long it waits for the cluster to declare a lost node dead before each such run.
RESUMES_AFTER_LOSS = 3
NODE_LOSS_WAIT_S = 60.0


def code_version() -> str:
    try:
        here = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class JobPlan:
    """What the driver decides once, before Ray starts: each distinct edit's settings,
    the networks they need, and the models spec the actors load."""
    settings: dict[tuple, Settings]      # by settings_key(attributes, mode)
    networks: tuple[str, ...]
    spec: ModelsSpec
    parser_size: int


def plan_job(todo: pd.DataFrame, settings: JobSettings) -> JobPlan:
    """Resolve each distinct edit once; a network the edits need that the spec lacks is
    an error here, before any row runs."""
    config = EditConfig.from_overrides(settings.edit)
    keys = {settings_key(a, m) for a, m in zip(todo["attributes"], todo["mode"])}
    by_key = {key: config.resolve(*key) for key in keys}
    networks = required_networks(by_key.values())
    spec = apply_mean_latent(read_spec(settings.models, settings.storage_options), config.base)
    check_spec_names(spec, networks, settings.models)
    return JobPlan(by_key, networks, spec, config.base.parser_size)


def _schedule_order(todo: pd.DataFrame, plan: JobPlan) -> pd.DataFrame:
    """Rows that share a schedule go together into batches: sorted by group, then id."""
    group = [plan.settings[settings_key(a, m)] for a, m in zip(todo["attributes"], todo["mode"])]
    order = {k: i for i, k in enumerate(sorted({(s.mode, repr(s.group_key())) for s in group}))}
    todo = todo.assign(_group=[order[(s.mode, repr(s.group_key()))] for s in group])
    return todo.sort_values(["_group", "id"]).drop(columns="_group").reset_index(drop=True)


def image_groups(todo: pd.DataFrame, most: int) -> pd.DataFrame:
    """One dataset row per input image, holding up to `most` of its edit rows (in
    schedule order), pickled: an image's edits reach an actor call together, so its
    shared inversion prefix runs once there (an image with more rows than `most` is
    split, so that it cannot hold one actor while others idle; its later parts find the
    prefix in the actor's memory or the output). Every manifest value (a passthrough
    timestamp, an align_quad list or null) reaches the actor as pandas gave it, untouched
    by Ray Data's column conversions. The bytes go from this driver to its actors only."""
    groups: dict[str, list[dict]] = {}
    for row in todo.to_dict("records"):
        groups.setdefault(row["image_uri"], []).append(row)
    parts = [(uri, rows[k:k + most]) for uri, rows in groups.items()
             for k in range(0, len(rows), most)]
    return pd.DataFrame({"image_uri": [uri for uri, _ in parts],
                         "rows": [pickle.dumps(rows) for _, rows in parts]})


def pending_rows(rows: pd.DataFrame, out: Output, retry_errors: bool) -> pd.DataFrame:
    """The rows with no metrics row under the output yet (with retry_errors, error rows
    too): a rerun does only these."""
    done = out.read_metrics()
    complete = set(done["id"]) if len(done) else set()
    if retry_errors and len(done):
        complete -= set(done.loc[done["status"] == "error", "id"])
    return rows[~rows["id"].isin(complete)].copy()


def run_job(rows: pd.DataFrame, settings: JobSettings, manifest_schema: pa.Schema | None = None,
            address: str | None = None, ray_init_kwargs: Mapping | None = None) -> dict:
    """Run (or resume) a job over validated manifest rows. Returns the summary dict."""
    started = time.time()
    out = Output(settings.output, settings.storage_options)
    schema = passthrough_schema(manifest_schema, passthrough_columns(rows.columns))
    todo = pending_rows(rows, out, settings.retry_errors)
    skipped = len(rows) - len(todo)
    plan = plan_job(todo, settings) if len(todo) else None
    try:
        out.put_json("job.json", {"settings": asdict(settings), "code_version": code_version(),
                                  "started_at": started, "rows": len(rows)})
    except StorageError as e:
        raise SetupError(f"the output cannot be written ({e}); nothing was run") from None
    log.info("%d rows: %d already complete, %d to edit", len(rows), skipped, len(todo))
    this_run = pd.DataFrame(columns=["id", "status"])
    stopped = None
    if plan is not None:
        try:
            this_run = _run_with_resumes(todo, len(rows), out, settings, plan, schema,
                                         address, ray_init_kwargs)
        except SetupError as e:
            stopped = e
    if settings.retry_errors and stopped is None:
        out.drop_stale_rows()
    summary = summarize(out.read_metrics(), set(rows["id"]), this_run, skipped,
                        time.time() - started, settings)
    summary["this_run"]["started_at"] = started      # the report matches it to job.json's
    if stopped is not None:
        summary["stopped"] = str(stopped)
    out.put_json("summary.json", summary)
    if stopped is not None:
        raise stopped
    return summary


class WorkersLost(Exception):
    """Ray lost edit actors mid-run past their retries (a node gone, a process that keeps
    dying); `nodes`: the nodes alive when that run started."""

    def __init__(self, message: str, nodes: set[str]):
        super().__init__(message)
        self.nodes = nodes


def _run_with_resumes(todo: pd.DataFrame, total: int, out: Output, settings: JobSettings,
                      plan: JobPlan, schema: pa.Schema, address: str | None,
                      ray_init_kwargs: Mapping | None) -> pd.DataFrame:
    """`_run_on_ray`, run again over the rows still to do when Ray lost workers (a
    preempted node), at most RESUMES_AFTER_LOSS times, once the cluster knows which
    nodes are gone. Rows whose metrics row appeared meanwhile are not run again."""
    before = _written(out)
    for attempt in range(RESUMES_AFTER_LOSS + 1):
        try:
            this_run = _run_on_ray(_schedule_order(todo, plan), total, settings, plan, schema,
                                   address, ray_init_kwargs)
            if attempt == 0:
                return this_run
            break
        except WorkersLost as e:
            if attempt == RESUMES_AFTER_LOSS:
                raise SetupError(f"Ray lost edit workers {attempt + 1} times ({e}); the job "
                                 "stops. Complete rows stay complete: rerun to resume") from None
            todo = todo[~todo["id"].isin(_changed(before, out))]
            log.warning("lost edit workers (%s); %d row(s) left: resuming on the nodes still "
                        "alive", e, len(todo))
            _wait_for_lost_nodes(e.nodes)
            if not len(todo):
                break
    done = out.read_metrics()               # after a loss: what this run wrote, returned or not
    return done.loc[done["id"].isin(_changed(before, out, done)), ["id", "status"]]


def _changed(before: dict[str, float], out: Output, done: pd.DataFrame | None = None) -> set:
    """Ids whose metrics row appeared or was replaced since `before` (no clocks compared)."""
    return {i for i, at in _written(out, done).items() if before.get(i) != at}


def _written(out: Output, done: pd.DataFrame | None = None) -> dict[str, float]:
    done = out.read_metrics() if done is None else done
    return dict(zip(done["id"], done["written_at"])) if len(done) else {}


def _alive_nodes() -> set[str]:
    import ray
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _wait_for_lost_nodes(nodes: set[str], timeout_s: float = NODE_LOSS_WAIT_S) -> None:
    """Until the cluster reports one of `nodes` dead (or `timeout_s`: an actor lost on a
    node that lives): resources counted then are the ones left, so the next run does not
    wait for an actor on a node that is gone."""
    started = time.time()
    while time.time() < started + timeout_s and not nodes - _alive_nodes():
        time.sleep(2)
    gone = nodes - _alive_nodes()
    log.info("%s after %.0f s", f"{len(gone)} node(s) gone" if gone else "no node gone",
             time.time() - started)


def _actor_resources(settings: JobSettings) -> tuple[int, dict, bool]:
    """(actors, resources per actor, on GPUs). An actor must never hold every CPU: the
    read and repartition tasks would then wait forever (a GPU actor takes 1 CPU by
    default; a CPU actor its threads)."""
    import ray
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n_actors = settings.actors or max(gpus, 1)
    cpu_room = max(resources.get("CPU", 1) - 1, 0.5) / n_actors
    per_actor = ({"num_gpus": 1, "num_cpus": min(settings.actor_cpus, cpu_room)} if gpus
                 else {"num_gpus": 0, "num_cpus": min(settings.cpu_threads, cpu_room)})
    return n_actors, per_actor, bool(gpus)


def _run_on_ray(todo: pd.DataFrame, total: int, settings: JobSettings, plan: JobPlan,
                schema: pa.Schema, address: str | None, ray_init_kwargs: Mapping | None
                ) -> pd.DataFrame:
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
    n_actors, per_actor, on_gpus = _actor_resources(settings)
    log.info("%d %s actor(s), batch size %d", n_actors, "GPU" if on_gpus else "CPU",
             settings.batch_size)
    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = settings.no_progress_timeout_s
    ctx.enable_progress_bars = ray_data_progress_wanted()    # ours below; theirs with -v
    groups = image_groups(todo, settings.batch_size)
    per_call = max(1, round(settings.batch_size * len(groups) / len(todo)))   # images per call
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
                spec=plan.spec, networks=plan.networks, settings=plan.settings,
                parser_size=plan.parser_size, output_uri=settings.output,
                storage_options=settings.storage_options, schema=schema,
                save_noises=settings.save_noises, paste_back=settings.paste_back,
                cpu_threads=None if on_gpus else settings.cpu_threads,
                inputs=InputPolicy.from_spec(settings.inputs),
                stop_after=settings.stop_after_failed_batches, runtime=settings.runtime,
                batch_size=settings.batch_size, auto_batch=settings.auto_batch,
                share_prefix=settings.share_prefix),
            max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES, **per_actor)
    return _collect(ds, total, len(todo), nodes)


def _collect(ds, total: int, pending: int, nodes: set[str]) -> pd.DataFrame:
    """Each row's id and status as the actors hand them back, with progress. Rows with
    status `stopped` end the job (SetupError, their message); Ray losing actors past
    their retries raises WorkersLost; any other error is raised as it is."""
    parts = []
    with DriverProgress(total=total, before=total - pending) as progress:
        try:
            for b in ds.iter_batches(batch_format="pandas", batch_size=None):
                stopped = b[b["status"] == STOPPED]
                if len(stopped):           # an actor ended the job: stop reading, say why
                    raise SetupError(str(list(stopped["error"])[0]))
                parts.append(b[["id", "status"]])
                progress.update(b["status"])
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


def summarize(all_rows: pd.DataFrame, manifest_ids: set[str], this_run: pd.DataFrame,
              skipped: int, seconds: float, settings: JobSettings) -> dict[str, Any]:
    """Counts for this run, for this manifest's rows (the job's state) and for everything
    under the output (other manifests may share it); per-attribute rates and errors are
    over this manifest's rows."""
    def counts(df):
        return {"ok": int((df["status"] == "ok").sum()), "error": int((df["status"] == "error").sum())}

    mine = all_rows[all_rows["id"].isin(manifest_ids)] if len(all_rows) else all_rows
    per_attr: dict[str, dict[str, Any]] = {}
    for attr, g in attribute_outcomes(mine).groupby("attribute", sort=True):
        rows, on_target, flipped = len(g), int(g["on_target"].sum()), int(g["flipped"].sum())
        per_attr[str(attr)] = {"rows": rows, "on_target": on_target, "flipped": flipped,
                               "on_target_rate": on_target / rows, "flipped_rate": flipped / rows}
    run_counts = counts(this_run)
    manifest_counts = counts(mine) if len(mine) else {"ok": 0, "error": 0}
    return {
        "output": settings.output,
        "this_run": {**run_counts, "skipped_already_done": skipped, "seconds": round(seconds, 2),
                     "images_per_hour": round(run_counts["ok"] / seconds * 3600, 1) if seconds else None},
        "manifest": {"rows": len(manifest_ids), **manifest_counts,
                     "pending": len(manifest_ids) - len(mine)},
        "whole_output": counts(all_rows) if len(all_rows) else {"ok": 0, "error": 0},
        "per_attribute": per_attr,
        "errors": ([{"id": r["id"], "error": r["error"]} for r in
                    mine[mine["status"] == "error"].head(20).to_dict("records")]
                   if len(mine) else []),
    }
