"""The figures of a job's progress, and the progress the driver reports while it runs.

The figures: done (ok + error) against the manifest's rows, pending, the rate over the
last few minutes and since the run started, and an ETA from them. The driver shows
them while `maskface run` runs (`DriverProgress`); `maskface status` computes the same
figures from an output's metrics rows (pipeline/results/status.py).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .ledger import Counts, pending

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
        return pending(self.total, self.done)

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
    at = np.sort(np.asarray(list(times) if not hasattr(times, "__len__") else times,
                            dtype=float))
    if started_at is not None:
        at = at[at >= started_at]
    if not len(at):
        return (0.0 if started_at is not None else None), (0.0 if started_at is not None else None)
    first, last = float(at[0]), float(at[-1])
    begin = started_at if started_at is not None else first
    since_start = max(now - begin, 1e-9)
    span = min(window_s, since_start)
    recent = int(np.count_nonzero(at > now - span)) / span if span > 0 else None
    overall: float | None
    if started_at is not None:
        overall = len(at) / since_start
    else:
        overall = (len(at) - 1) / (last - first) if last > first else None
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
        counts = Counts.of(statuses)
        now = time.time()
        with self._lock:
            self.ok += counts.ok
            self.error += counts.error
            self._times.extend([now] * counts.done)
        if self._bar is not None:
            self._bar.update(counts.done)
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
