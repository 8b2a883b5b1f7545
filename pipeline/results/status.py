"""How far a job is, from its output alone: the figures `maskface status` prints.

    read_status(output_uri, manifest_uri=...)  -> JobStatus   (another terminal, any time)
    render(status)                             -> the table `maskface status` prints

Status reads only the metrics rows, job.json, summary.json and the run's lease (its
heartbeat tells a live driver from a dead one; status never takes it), never images, so
it works on local disk and S3 alike, while the job runs or after it ended. A row counts
once its metrics row exists (the job's own rule for "complete"). Times are the rows'
`written_at`. The figures (done, pending, rates, ETA) are the driver's progress's
(pipeline/runner/progress.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.output.figures import (DEFAULT_WINDOW_S, Figures, fmt_duration, fmt_rate, per_hour,
                                     rates)
from pipeline.output.jobfile import FILE, spec_of
from pipeline.output.layout import Output
from pipeline.output.lease import LeaseRecord, read_lease
from pipeline.output.ledger import (ERROR, TIME_COLUMNS, Counts, actor_time, of_manifest,
                                    this_runs_summary)
from pipeline.output.metrics import MetricsReader, quarantined
from pipeline.store.storage import filesystem


# ---- status from the metrics -----------------------------------------------------------------
@dataclass
class JobStatus:
    output: str
    now: float
    figures: Figures
    state: str          # complete | running | ended | stopped | lost | idle | waiting | empty
    started_at: float | None = None       # this run's start (job.json)
    last_row_at: float | None = None
    manifest: str | None = None
    manifest_hint: str | None = None      # job.json's manifest, when --manifest was not given
    ended: dict | None = None             # summary.json, when this run has written it
    other_rows: int = 0                   # rows under the output that are not this manifest's
    per_node: list[dict] = field(default_factory=list)
    per_actor: list[dict] = field(default_factory=list)
    latest_errors: list[dict] = field(default_factory=list)
    driver: dict | None = None            # the lease's holder and heartbeat (`driver_of`)
    # metrics files whose rows do not count: set aside by a run (quarantined), damaged
    # and not yet set aside, or another tool's ({file, size, reason, ...})
    not_counted: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["figures"] = self.figures.as_dict()
        return out


def compute_status(metrics: pd.DataFrame, *, output: str, manifest_ids: set[str] | None = None,
                   total: int | None = None, manifest: str | None = None,
                   started_at: float | None = None, now: float | None = None,
                   window_s: float = DEFAULT_WINDOW_S, errors: int = 5,
                   summary: dict | None = None, driver: dict | None = None) -> JobStatus:
    """The figures of one output's metrics rows (one row per id, as `read_metrics` gives),
    against the manifest's ids (or, when they are not known, its `total` rows).
    `summary`: summary.json, which a run writes when it ends; it counts only when it is
    this run's (pipeline/output/ledger.py), and then the run has ended or stopped.
    `driver`: the output's lease (`driver_of`): a live heartbeat is a running job even
    while no row comes (a long batch); an expired one, a driver that died mid-run."""
    now = time.time() if now is None else now
    columns = ["id", "status", "error", "node", "actor", "written_at",
               *(c for c in TIME_COLUMNS if c in metrics.columns)]
    rows = metrics[columns].copy() if len(metrics) else pd.DataFrame(columns=columns)
    rows["written_at"] = rows["written_at"].astype(float)
    mine = of_manifest(rows, manifest_ids)
    other, rows = len(rows) - len(mine), mine
    counts = Counts.of(rows["status"], total if manifest_ids is None else len(manifest_ids))
    before = int((rows["written_at"] < started_at).sum()) if started_at is not None else 0
    last = float(rows["written_at"].max()) if len(rows) else None
    run_rows = rows if started_at is None else rows[rows["written_at"] >= started_at]
    ended = this_runs_summary(summary, started_at)
    if counts.total and not counts.pending:
        state = "complete"
    elif ended is not None:
        state = "stopped" if ended.get("stopped") else "ended"
    elif driver is not None and not driver["alive"]:
        state = "lost"
    elif not len(run_rows):
        state = "waiting" if started_at is not None else "empty"
    elif last is not None and now - last <= window_s:
        state = "running"
    else:
        state = "running" if driver is not None else "idle"
    # a job that is no longer writing: its run's rate ends with its last row, not now
    until = (last if state in ("complete", "ended", "stopped", "lost", "idle") and last is not None
             else now)
    recent = rates(rows["written_at"], now, started_at, window_s)[0]
    overall = rates(rows["written_at"], until, started_at, window_s)[1]
    figures = Figures(ok=counts.ok, error=counts.error, total=counts.total, before=before,
                      recent_rate=recent, overall_rate=overall, window_s=window_s)
    return JobStatus(
        output=output, now=now, figures=figures, state=state, started_at=started_at,
        last_row_at=last, manifest=manifest, other_rows=other, ended=ended, driver=driver,
        per_node=_throughput(rows, ["node"], now, until, started_at, window_s),
        per_actor=_with_busy(_throughput(rows, ["actor", "node"], now, until, started_at,
                                         window_s), rows),
        latest_errors=[{"id": r["id"], "error": r["error"], "node": r["node"],
                        "written_at": r["written_at"]}
                       for r in rows[rows["status"] == ERROR]
                       .sort_values("written_at", ascending=False).head(errors)
                       .to_dict("records")])


def _throughput(rows: pd.DataFrame, keys: list[str], now: float, until: float,
                started_at: float | None, window_s: float) -> list[dict]:
    out: list[dict] = []
    if not len(rows):
        return out
    for key, group in rows.fillna({k: "?" for k in keys}).groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        recent = rates(group["written_at"], now, started_at, window_s)[0]
        overall = rates(group["written_at"], until, started_at, window_s)[1]
        out.append({**dict(zip(keys, key)), "rows": len(group),
                    **Counts.of(group["status"]).as_dict(),
                    "rows_per_hour_recent": per_hour(recent),
                    "rows_per_hour_overall": per_hour(overall),
                    "last_row_at": float(group["written_at"].max())})
    return sorted(out, key=lambda r: -r["rows"])


def _with_busy(per_actor: list[dict], rows: pd.DataFrame) -> list[dict]:
    """Each actor's throughput with its engine busy share (pipeline/output/ledger.py
    `actor_time`; None for rows older than the time columns)."""
    busy = {(a["actor"], a["node"]): a["engine_busy"] for a in actor_time(rows)}
    return [{**r, "engine_busy": busy.get((r["actor"], r["node"]))} for r in per_actor]


def manifest_ids(manifest_uri: str, storage_options: Mapping | None = None) -> set[str]:
    """Only the `id` column of a manifest (a Parquet file or folder): cheap on big ones."""
    import pyarrow.dataset as pads
    fs, path = filesystem(manifest_uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {manifest_uri}")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id"])
    return set(table.column("id").to_pylist())


# what status reads of each metrics row (pipeline/output/metrics.py reads only these)
STATUS_COLUMNS = ["id", "status", "error", "node", "actor", "written_at", *TIME_COLUMNS]


@dataclass
class JobFiles:
    """What a job leaves under its output, read once: the input of status and report."""
    output: str
    record: dict | None         # job.json: the latest run's spec, edits and start
    summary: dict | None        # summary.json: written when a run ends
    metrics: pd.DataFrame       # one row per id, the columns asked (pipeline/output/metrics.py)
    lease: LeaseRecord | None = None   # lease.json: the run that holds the output, if any

    @property
    def started_at(self) -> float | None:
        return (self.record or {}).get("started_at")

    @property
    def job_manifest(self) -> str | None:
        """The manifest job.json names."""
        return spec_of(self.record).get("manifest")

    @property
    def job_storage_options(self) -> dict:
        return spec_of(self.record).get("storage_options") or {}


def read_job_files(output_uri: str, storage_options: Mapping | None = None,
                   columns: Sequence[str] | None = None,
                   reader: MetricsReader | None = None) -> JobFiles:
    """job.json, summary.json and the metrics rows (`columns` of them; a `reader` reads
    only what changed since its last read); FileNotFoundError when there is no job."""
    out = reader.out if reader is not None else Output(output_uri, storage_options)
    record = out.get_json(FILE)
    metrics = (reader or MetricsReader(out, columns)).read()
    if record is None and not len(metrics):
        raise FileNotFoundError(f"no job output at {output_uri}: neither job.json nor metrics/ "
                                "(wrong URI, or the job has not started yet)")
    return JobFiles(output_uri, record, out.get_json("summary.json"), metrics, read_lease(out))


def driver_of(lease: LeaseRecord | None, now: float | None = None) -> dict | None:
    """What the output's lease says of the run that holds it (None when no run holds
    it): who, its heartbeat's age, whether it is alive (not expired) and the rows it
    finished; the job's own heartbeat, read, never taken (pipeline/output/lease.py)."""
    if lease is None:
        return None
    owner = lease.owner
    return {"run_id": owner.run_id, "host": owner.host, "pid": owner.pid,
            "submission": owner.submission, "started_at": lease.started_at,
            "heartbeat_at": lease.heartbeat_at, "heartbeat_age_s": round(lease.age(now), 1),
            "expiry_s": lease.expiry_s, "alive": not lease.expired(now),
            "rows_done": lease.rows_done, "holder": owner.describe()}


class StatusReader:
    """A job's status, read as often as asked (`maskface status --watch`): the manifest's
    ids once, and each time only the metrics files that changed since the last read.
    Without `manifest_uri`, the manifest job.json names."""

    def __init__(self, output_uri: str, storage_options: Mapping | None = None,
                 manifest_uri: str | None = None):
        self.output_uri, self.storage_options = output_uri, storage_options
        self.manifest_uri = manifest_uri
        self.metrics = MetricsReader(Output(output_uri, storage_options), STATUS_COLUMNS)
        self._ids: set[str] | None = None
        self._hint: str | None = None

    def read(self, window_s: float = DEFAULT_WINDOW_S, errors: int = 5,
             now: float | None = None) -> JobStatus:
        files = read_job_files(self.output_uri, reader=self.metrics)
        manifest = self.manifest_uri or files.job_manifest
        if self._ids is None and manifest:
            try:
                self._ids = manifest_ids(manifest, self.storage_options or
                                         files.job_storage_options)
            except Exception as e:
                if self.manifest_uri:               # the user named it: say it is wrong
                    raise
                self._hint = f"{manifest} (not readable: {type(e).__name__}: {e})"
        status = compute_status(files.metrics, output=self.output_uri, manifest_ids=self._ids,
                                manifest=manifest if self._ids is not None else None,
                                started_at=files.started_at, now=now, window_s=window_s,
                                errors=errors, summary=files.summary,
                                driver=driver_of(files.lease, now))
        status.manifest_hint = self._hint if self._ids is None else None
        status.not_counted = ([{**q, "why": "set aside"} for q in quarantined(self.metrics.out)]
                              + [{**u.as_dict(), "why": "damaged" if u.damaged else "foreign"}
                                 for u in self.metrics.unread])
        return status


def read_status(output_uri: str, storage_options: Mapping | None = None,
                manifest_uri: str | None = None, window_s: float = DEFAULT_WINDOW_S,
                errors: int = 5, now: float | None = None) -> JobStatus:
    """The status of the job writing to `output_uri`, from its metrics, job.json and
    summary.json; against `manifest_uri`, else the manifest job.json names."""
    return StatusReader(output_uri, storage_options, manifest_uri).read(window_s, errors, now)


def render(status: JobStatus, width: int = 100) -> str:
    """The status as a readable table."""
    f = status.figures
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.now))
    lines = [f"output    {status.output}", f"as of     {clock}"]
    if status.started_at is not None:
        lines.append(f"started   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.started_at))}"
                     f" ({fmt_duration(status.now - status.started_at)} ago)")
    state = {"complete": "complete: every manifest row has a metrics row",
             "running": "running",
             "ended": "ended: the run finished" + _pending_at_end(status.ended),
             "stopped": "stopped: " + str((status.ended or {}).get("stopped")),
             "idle": f"idle: no new row in the last {fmt_duration(f.window_s)} "
                     "(the job stopped, or a batch takes longer than that)",
             "waiting": "started, no row written yet (loading models, first batch)",
             "lost": "lost: the driver stopped without ending the run (no heartbeat for "
                     f"{fmt_duration((status.driver or {}).get('heartbeat_age_s'))}); rerun "
                     "to resume: the next run takes the output over",
             "empty": "no rows yet"}[status.state]
    lines.append(f"state     {state}")
    if status.driver is not None:
        d = status.driver
        lines.append(f"driver    {d['holder']}: heartbeat {fmt_duration(d['heartbeat_age_s'])} "
                     f"ago, {d['rows_done']} row(s) done this run")
    if status.manifest:
        lines.append(f"manifest  {status.manifest} ({f.total} rows)")
    lines.append("")
    if f.total is not None:
        pct = 100.0 * f.done / f.total if f.total else 100.0
        lines.append(f"rows      {f.done} done of {f.total} ({pct:.1f}%): {f.ok} ok, {f.error} error, "
                     f"{f.pending} pending")
    else:
        lines.append(f"rows      {f.done} done: {f.ok} ok, {f.error} error (pending needs --manifest)")
    if f.before:
        lines.append(f"          {f.before} of them were complete before this run started")
    if status.other_rows:
        lines.append(f"          {status.other_rows} more row(s) under this output belong to "
                     "other manifests")
    lines.append(f"rate      {fmt_rate(f.recent_rate)} over the last {fmt_duration(f.window_s)}, "
                 f"{fmt_rate(f.overall_rate)} since the run started")
    if f.total is not None:
        lines.append(f"ETA       {fmt_duration(f.eta_s)}")
    if status.manifest_hint:
        lines.append(f"note      job.json names manifest {status.manifest_hint}: give "
                     "--manifest for pending rows and an ETA")
    for title, rows, keys in (("node", status.per_node, ["node"]),
                              ("actor", status.per_actor, ["actor", "node"])):
        if not rows:
            continue
        lines += ["", _table(title, rows, keys, status.now)]
    lines += _not_counted(status.not_counted, width)
    if status.latest_errors:
        lines += ["", "latest errors"]
        for e in status.latest_errors:
            when = time.strftime("%H:%M:%S", time.localtime(e["written_at"]))
            text = " ".join(str(e["error"]).split())
            lines.append(_clip(f"  {when}  {e['id']}  {text}", width))
    return "\n".join(lines)


def _not_counted(files: list[dict], width: int) -> list[str]:
    """The metrics files whose rows do not count, one line each (none: no lines)."""
    if not files:
        return []
    return ["", "metrics files whose rows do not count (a damaged file's rows are redone by "
                "the next run)",
            *(_clip(f"  {n['why']}: {n['file']} ({n.get('size')} bytes): {n['reason']}", width)
              for n in files)]


def _pending_at_end(summary: dict | None) -> str:
    manifest = (summary or {}).get("manifest") or {}
    if "pending" not in manifest:
        return " (summary.json)"
    return f" (summary.json: {manifest['pending']} of its manifest's {manifest['rows']} rows pending)"


def _table(title: str, rows: list[dict], keys: list[str], now: float) -> str:
    busy = "engine_busy" in rows[0]
    head = [*keys, "rows", "ok", "error", "rows/h recent", "rows/h run", "last row",
            *(["engine busy"] if busy else [])]
    body = [[str(r[k]) for k in keys] + [str(r["rows"]), str(r["ok"]), str(r["error"]),
                                         _num(r["rows_per_hour_recent"]),
                                         _num(r["rows_per_hour_overall"]),
                                         f"{fmt_duration(now - r['last_row_at'])} ago"]
            + ([_share(r["engine_busy"])] if busy else []) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < len(keys) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
