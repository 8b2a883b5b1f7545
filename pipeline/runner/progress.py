"""The progress the driver reports while `maskface run` runs: a bar in a terminal, a log
line every interval otherwise, with the figures of pipeline/output/figures.py."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Iterable

from pipeline.output.figures import DEFAULT_WINDOW_S, Figures, fmt_duration, rates
from pipeline.output.ledger import Counts

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0         # a progress line every minute when not in a terminal
INTERVAL_ENV = "MASKFACE_PROGRESS_INTERVAL_S"


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
