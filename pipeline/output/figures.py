"""The figures of a job's progress: done (ok + error) against the manifest's rows,
pending, the rate over the last few minutes and since the run started, an ETA from
them, and how each is written. The driver shows them while `maskface run` runs
(pipeline/runner/progress.py); `maskface status` computes the same figures from an
output's metrics rows (pipeline/results/status.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .ledger import pending

DEFAULT_WINDOW_S = 600.0          # "recent" rate: the last 10 minutes


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
