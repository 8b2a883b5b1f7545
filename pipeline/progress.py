"""How far a job is: the figures `maskface status` prints from the metrics under an
output, and the progress the driver reports while it runs.

Both speak the same figures: done (ok + error) against the manifest's rows, pending,
the rate over the last few minutes and since the run started, and an ETA from them.

    read_status(output_uri, manifest_uri=...)  -> JobStatus   (another terminal, any time)
    DriverProgress(total, before)                              (inside `maskface run`)

Status reads only the metrics rows, job.json and summary.json, never images, so it
works on local disk and S3 alike, while the job runs or after it ended. A row counts
once its metrics row exists (the job's own rule for "complete"). Times are the rows'
`written_at`.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 600.0          # "recent" rate: the last 10 minutes
DEFAULT_INTERVAL_S = 60.0         # a progress line every minute when not in a terminal
INTERVAL_ENV = "MASKFACE_PROGRESS_INTERVAL_S"


# ---- figures ---------------------------------------------------------------------------------
@dataclass
class Figures:
    """Counts and rates of one job at one moment. Rates are rows per second."""
    ok: int
    error: int
    total: int | None = None            # the manifest's rows; None: not known
    skipped: int = 0                    # complete rows whose ok/error split is not known here
                                        # (the driver's rows done by an earlier run)
    before: int = 0                     # of the done rows, how many an earlier run completed
    recent_rate: float | None = None    # over the last `window_s`
    overall_rate: float | None = None   # since this run started
    window_s: float = DEFAULT_WINDOW_S

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(self.total - self.done, 0)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent rate (the overall rate when nothing is recent)."""
        if self.pending is None:
            return None
        if self.pending == 0:
            return 0.0
        rate = self.recent_rate or self.overall_rate
        return self.pending / rate if rate else None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "skipped": self.skipped, "done": self.done,
                "total": self.total, "pending": self.pending,
                "done_before_this_run": self.before,
                "window_s": self.window_s,
                "rows_per_hour_recent": per_hour(self.recent_rate),
                "rows_per_hour_overall": per_hour(self.overall_rate),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}

    def line(self) -> str:
        """One line for logs: `12/40 done (11 ok, 1 error), 28 pending | ... | ETA 7m 50s`."""
        of = f"/{self.total}" if self.total is not None else ""
        split = f"{self.ok} ok, {self.error} error"
        if self.skipped:
            split += f", {self.skipped} done before this run"
        parts = [f"{self.done}{of} done ({split})"]
        if self.pending is not None:
            parts[0] += f", {self.pending} pending"
        parts.append(f"{fmt_rate(self.recent_rate)} last {fmt_duration(self.window_s)}, "
                     f"{fmt_rate(self.overall_rate)} overall")
        if self.pending is not None:
            parts.append(f"ETA {fmt_duration(self.eta_s)}")
        return " | ".join(parts)


def rates(times: Iterable[float], now: float, started_at: float | None,
          window_s: float = DEFAULT_WINDOW_S) -> tuple[float | None, float | None]:
    """(recent, overall) rows per second from the times rows completed.

    recent: rows in the last `window_s`, over that window (or over the time since the
    start, when the run is younger than the window). overall: rows since `started_at`
    over the time since then; without a start, between the first and last row."""
    times = sorted(float(t) for t in times)
    if started_at is not None:
        times = [t for t in times if t >= started_at]
    if not times:
        return (0.0 if started_at is not None else None), (0.0 if started_at is not None else None)
    begin = started_at if started_at is not None else times[0]
    since_start = max(now - begin, 1e-9)
    span = min(window_s, since_start)
    recent = sum(t > now - span for t in times) / span if span > 0 else None
    overall: float | None
    if started_at is not None:
        overall = len(times) / since_start
    else:
        overall = (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None
    return recent, overall


def per_hour(rate: float | None) -> float | None:
    return None if rate is None else round(rate * 3600, 1)


def fmt_rate(rate: float | None) -> str:
    return "- rows/h" if rate is None else f"{rate * 3600:.1f} rows/h"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s" if secs else f"{minutes} min"
    return f"{secs}s"


# ---- status from the metrics -----------------------------------------------------------------
@dataclass
class JobStatus:
    output: str
    now: float
    figures: Figures
    state: str                            # complete | running | ended | stopped | idle | waiting | empty
    started_at: float | None = None       # this run's start (job.json)
    last_row_at: float | None = None
    manifest: str | None = None
    manifest_hint: str | None = None      # job.json's manifest, when --manifest was not given
    ended: dict | None = None             # summary.json, when this run has written it
    other_rows: int = 0                   # rows under the output that are not this manifest's
    per_node: list[dict] = field(default_factory=list)
    per_actor: list[dict] = field(default_factory=list)
    latest_errors: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["figures"] = self.figures.as_dict()
        return out


def compute_status(metrics: pd.DataFrame, *, output: str, manifest_ids: set[str] | None = None,
                   manifest: str | None = None, started_at: float | None = None,
                   now: float | None = None, window_s: float = DEFAULT_WINDOW_S,
                   errors: int = 5, summary: dict | None = None) -> JobStatus:
    """The figures of one output's metrics rows (one row per id, as `read_metrics` gives).
    `summary`: summary.json, which a run writes when it ends; it counts only when it is
    this run's (its start matches `started_at`), and then the run has ended or stopped."""
    now = time.time() if now is None else now
    rows = metrics[["id", "status", "error", "node", "actor", "written_at"]].copy() \
        if len(metrics) else pd.DataFrame(columns=["id", "status", "error", "node", "actor",
                                                    "written_at"])
    rows["written_at"] = rows["written_at"].astype(float)
    other = 0
    if manifest_ids is not None:
        mine = rows["id"].isin(manifest_ids)
        other = int((~mine).sum())
        rows = rows[mine]
    ok = int((rows["status"] == "ok").sum())
    error = int((rows["status"] == "error").sum())
    before = int((rows["written_at"] < started_at).sum()) if started_at is not None else 0
    total = None if manifest_ids is None else len(manifest_ids)
    last = float(rows["written_at"].max()) if len(rows) else None
    run_rows = rows if started_at is None else rows[rows["written_at"] >= started_at]
    ended = summary if (summary and started_at is not None and
                        (summary.get("this_run") or {}).get("started_at") == started_at) else None
    if total and ok + error >= total:
        state = "complete"
    elif ended is not None:
        state = "stopped" if ended.get("stopped") else "ended"
    elif not len(run_rows):
        state = "waiting" if started_at is not None else "empty"
    elif last is not None and now - last <= window_s:
        state = "running"
    else:
        state = "idle"
    # a job that is no longer writing: its run's rate ends with its last row, not now
    until = last if state in ("complete", "ended", "stopped", "idle") and last is not None else now
    recent = rates(rows["written_at"], now, started_at, window_s)[0]
    overall = rates(rows["written_at"], until, started_at, window_s)[1]
    figures = Figures(ok=ok, error=error, total=total, before=before, recent_rate=recent,
                      overall_rate=overall, window_s=window_s)
    return JobStatus(
        output=output, now=now, figures=figures, state=state, started_at=started_at,
        last_row_at=last, manifest=manifest, other_rows=other, ended=ended,
        per_node=_throughput(rows, ["node"], now, until, started_at, window_s),
        per_actor=_throughput(rows, ["actor", "node"], now, until, started_at, window_s),
        latest_errors=[{"id": r["id"], "error": r["error"], "node": r["node"],
                        "written_at": r["written_at"]}
                       for r in rows[rows["status"] == "error"]
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
                    "ok": int((group["status"] == "ok").sum()),
                    "error": int((group["status"] == "error").sum()),
                    "rows_per_hour_recent": per_hour(recent),
                    "rows_per_hour_overall": per_hour(overall),
                    "last_row_at": float(group["written_at"].max())})
    return sorted(out, key=lambda r: -r["rows"])


def manifest_ids(manifest_uri: str, storage_options: Mapping | None = None) -> set[str]:
    """Only the `id` column of a manifest (a Parquet file or folder): cheap on big ones."""
    import fsspec
    import pyarrow.dataset as pads
    fs, path = fsspec.core.url_to_fs(manifest_uri, **dict(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {manifest_uri}")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id"])
    return set(table.column("id").to_pylist())


def read_status(output_uri: str, storage_options: Mapping | None = None,
                manifest_uri: str | None = None, window_s: float = DEFAULT_WINDOW_S,
                errors: int = 5, now: float | None = None) -> JobStatus:
    """The status of the job writing to `output_uri`, from its metrics and job.json."""
    from .outputs import Output
    out = Output(output_uri, storage_options)
    job = out.get_json("job.json")
    files = out.metrics_files()
    if job is None and not files:
        raise FileNotFoundError(f"no job output at {output_uri}: neither job.json nor metrics/ "
                                "(wrong URI, or the job has not started yet)")
    metrics = out.read_metrics()
    ids = manifest_ids(manifest_uri, storage_options) if manifest_uri else None
    status = compute_status(metrics, output=output_uri, manifest_ids=ids, manifest=manifest_uri,
                            started_at=(job or {}).get("started_at"), now=now,
                            window_s=window_s, errors=errors,
                            summary=out.get_json("summary.json"))
    if manifest_uri is None and job:
        status.manifest_hint = (job.get("settings") or {}).get("manifest")
    return status


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
             "empty": "no rows yet"}[status.state]
    lines.append(f"state     {state}")
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
        lines.append(f"note      job.json names manifest {status.manifest_hint}: add --manifest "
                     "for pending rows and an ETA")
    for title, rows, keys in (("node", status.per_node, ["node"]),
                              ("actor", status.per_actor, ["actor", "node"])):
        if not rows:
            continue
        lines += ["", _table(title, rows, keys, status.now)]
    if status.latest_errors:
        lines += ["", "latest errors"]
        for e in status.latest_errors:
            when = time.strftime("%H:%M:%S", time.localtime(e["written_at"]))
            text = " ".join(str(e["error"]).split())
            lines.append(_clip(f"  {when}  {e['id']}  {text}", width))
    return "\n".join(lines)


def _pending_at_end(summary: dict | None) -> str:
    manifest = (summary or {}).get("manifest") or {}
    if "pending" not in manifest:
        return " (summary.json)"
    return f" (summary.json: {manifest['pending']} of its manifest's {manifest['rows']} rows pending)"


def _table(title: str, rows: list[dict], keys: list[str], now: float) -> str:
    head = [*keys, "rows", "ok", "error", "rows/h recent", "rows/h run", "last row"]
    body = [[str(r[k]) for k in keys] + [str(r["rows"]), str(r["ok"]), str(r["error"]),
                                         _num(r["rows_per_hour_recent"]),
                                         _num(r["rows_per_hour_overall"]),
                                         f"{fmt_duration(now - r['last_row_at'])} ago"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < len(keys) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- the driver's progress ----------------------------------------------------------------------
def describe_cluster(address: str | None) -> str:
    """Which Ray this driver runs on: a job's log then says whether it attached to the
    cluster (RAY_ADDRESS inside `ray job submit`, or --address) or started its own."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    how = ("attached to the Ray cluster at" if address and address != "local"
           else "running on a local Ray at")
    return (f"{how} {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s), "
            f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")


def ray_data_progress_wanted() -> bool:
    """Ray Data's own progress bars only with `maskface -v` (debug logging)."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{INTERVAL_ENV} must be > 0, got {raw!r}")
    return value


class DriverProgress:
    """Progress over a manifest's rows as the driver receives the actors' results.

    In a terminal: one tqdm bar (done of total, rate, ETA, ok/error). Otherwise (CI, a
    Ray job's logs): one log line every `interval_s` seconds with the same figures, from
    a timer, so a slow batch still shows the job is alive; and one when it ends."""

    def __init__(self, total: int, before: int = 0, *, interval_s: float | None = None,
                 tty: bool | None = None, stream=None, window_s: float = DEFAULT_WINDOW_S):
        self.total, self.before, self.window_s = total, before, window_s
        self.started = time.time()
        self.ok = self.error = 0
        self._times: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        stream = stream or sys.stderr
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self._bar = None
        self._thread = None
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=before, unit="row", desc="edits", file=stream,
                             dynamic_ncols=True)
        else:
            self._thread = threading.Thread(target=self._tick, name="maskface-progress",
                                            daemon=True)
            self._thread.start()

    def figures(self, now: float | None = None) -> Figures:
        now = time.time() if now is None else now
        with self._lock:
            ok, error, times = self.ok, self.error, list(self._times)
        recent, overall = rates(times, now, self.started, self.window_s)
        # rows an earlier run completed count as done; their ok/error split is in the
        # metrics (maskface status), the driver only knows how many it skipped
        return Figures(ok=ok, error=error, total=self.total, skipped=self.before,
                       before=self.before, recent_rate=recent, overall_rate=overall,
                       window_s=self.window_s)

    def update(self, statuses: Iterable[str]) -> None:
        statuses = list(statuses)
        now = time.time()
        with self._lock:
            for s in statuses:
                if s == "ok":
                    self.ok += 1
                else:
                    self.error += 1
            self._times.extend([now] * len(statuses))
        if self._bar is not None:
            self._bar.update(len(statuses))
            self._bar.set_postfix_str(f"{self.ok} ok, {self.error} error", refresh=False)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info("progress: %s", self.figures().line())

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
        else:
            if self._thread is not None:
                self._thread.join(timeout=5)
            log.info("progress: %s (%s)", self.figures().line(),
                     f"finished in {fmt_duration(time.time() - self.started)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
