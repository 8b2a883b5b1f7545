"""What an output's metrics rows say about a job's rows: each rule written once.

    complete   a row is complete once its metrics row exists, ok or error (an actor
               writes it last); a rerun skips complete rows, error rows too unless
               retry_errors
    pending    a manifest row without a metrics row
    counts     ok and error: the two statuses a metrics row has
    on target  per edited attribute, the result's probability on the target's side of 0.5
               (pipeline.engine.rows.on_target); flipped: on target now, not before;
               by the classifier the edit optimised (circular: an upper bound), and by
               the held-out judge when the models have one
    entangled  per edit, the other attributes' drift and flips (pipeline/engine/
               entanglement.py), summarised per edited attribute
    this run   summary.json describes the run job.json describes only when its
               `this_run.started_at` equals job.json's `started_at`
    busy       per actor, the engine's share of the time its rows record (TIME_COLUMNS:
               reading, engine, writing, identity and paste-back, waiting for input)

The driver (resume, summary.json), `maskface status`, the report and the export all ask
here; none of them restates a rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from pipeline.engine.rows import on_target, target_side

OK, ERROR = "ok", "error"          # a metrics row's status
HISTORY_COLUMNS = ["id", "status", "written_at"]   # what a resume reads of the metrics
# the metrics columns summary.json is made of (pipeline/output/metrics.py reads only these)
# where an actor's time went, per row (pipeline/runner/stage.py PhaseClock)
TIME_COLUMNS = ["time_read_s", "time_engine_s", "time_write_s", "time_post_s", "time_wait_s"]
SUMMARY_COLUMNS = ["id", "status", "error", "attributes", "targets", "prob_input",
                   "prob_result", "judge_prob_result", "entanglement", "unintended_flips",
                   "actor", "node", *TIME_COLUMNS]
MOST_FLIPPED = 5                   # the other attributes per_attribute names, most often first


@dataclass(frozen=True)
class Counts:
    """Ok and error rows, and against a manifest of `total` rows, the pending ones."""
    ok: int = 0
    error: int = 0
    total: int | None = None

    @classmethod
    def of(cls, statuses: Iterable[str], total: int | None = None) -> "Counts":
        series = statuses if isinstance(statuses, pd.Series) else pd.Series(list(statuses),
                                                                              dtype=object)
        counts = series.value_counts()
        return cls(ok=int(counts.get(OK, 0)), error=int(counts.get(ERROR, 0)), total=total)

    @property
    def done(self) -> int:
        return self.ok + self.error

    @property
    def pending(self) -> int | None:
        return pending(self.total, self.done)

    def as_dict(self) -> dict[str, int]:
        return {"ok": self.ok, "error": self.error}


def pending(total: int | None, done: int) -> int | None:
    """A manifest's rows without a metrics row, from its size and the rows done (None
    when the manifest's size is not known)."""
    return None if total is None else max(total - done, 0)


def complete_ids(metrics: pd.DataFrame, retry_errors: bool = False) -> set[str]:
    """The ids a run does not redo: every metrics row's, but with `retry_errors` the
    error rows'."""
    if not len(metrics):
        return set()
    done = metrics if not retry_errors else metrics[metrics["status"] != ERROR]
    return set(done["id"])


def pending_rows(rows: pd.DataFrame, metrics: pd.DataFrame, retry_errors: bool) -> pd.DataFrame:
    """The manifest rows a run still has to do."""
    return rows[~among(rows["id"], complete_ids(metrics, retry_errors))].copy()


def among(ids: pd.Series, wanted: set[str]) -> np.ndarray:
    """Which of `ids` are in `wanted`, as a boolean array. (pandas' isin is five times
    slower on Arrow-backed strings: seconds at a million rows.)"""
    return np.fromiter((i in wanted for i in ids), dtype=bool, count=len(ids))


def of_manifest(metrics: pd.DataFrame, ids: set[str] | None) -> pd.DataFrame:
    """The metrics rows of a manifest's ids (every row when the ids are not known): an
    output may hold the rows of several manifests."""
    if ids is None or not len(metrics):
        return metrics
    return metrics[among(metrics["id"], ids)]


def attribute_outcomes(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (ok row, edited attribute): id, attribute, target, prob_input,
    prob_result, p_target_before/after (the probability of the target's side),
    on_target and flipped (on target now, not before); judge_on_target (the judge's
    probability on the target's side; null where the row has no judge's); and the
    row's entanglement and unintended_flips (null in outputs older than them)."""
    columns = ["id", "attribute", "target", "prob_input", "prob_result", "p_target_before",
               "p_target_after", "on_target", "flipped", "judge_on_target", "entanglement",
               "unintended_flips"]
    ok = metrics[metrics["status"] == OK] if len(metrics) else metrics
    if not len(ok):
        return pd.DataFrame(columns=columns)
    ok = ok.copy()
    for name in ("judge_prob_result", "entanglement", "unintended_flips"):
        if name not in ok.columns:                  # an output older than the column
            ok[name] = None
    ok["_judge"] = [list(j) if isinstance(j, (list, tuple, np.ndarray)) else [None] * len(a)
                    for j, a in zip(ok["judge_prob_result"], ok["attributes"])]
    long = ok[["id", "attributes", "targets", "prob_input", "prob_result", "_judge",
               "entanglement", "unintended_flips"]].explode(
        ["attributes", "targets", "prob_input", "prob_result", "_judge"], ignore_index=True)
    long = long.rename(columns={"attributes": "attribute", "targets": "target"})
    for col in ("target", "prob_input", "prob_result", "_judge", "entanglement"):
        long[col] = pd.to_numeric(long[col], errors="coerce").astype(float)
    side = target_side(long["target"])
    before = on_target(long["prob_input"], long["target"])
    after = on_target(long["prob_result"], long["target"])
    long["p_target_before"] = long["prob_input"].where(side, 1 - long["prob_input"])
    long["p_target_after"] = long["prob_result"].where(side, 1 - long["prob_result"])
    long["on_target"], long["flipped"] = after, after & ~before
    judge = on_target(long["_judge"], long["target"]).astype(object)
    long["judge_on_target"] = judge.where(long["_judge"].notna(), None)
    return long[columns]


def per_attribute(metrics: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per edited attribute: rows, on target and flipped, as counts and rates, by the
    classifier and (over the rows it judged) by the judge; the mean entanglement, the
    share of edits with an unintended flip and the other attributes flipped most."""
    out: dict[str, dict[str, Any]] = {}
    for attr, g in attribute_outcomes(metrics).groupby("attribute", sort=True):
        rows, hit, flipped = len(g), int(g["on_target"].sum()), int(g["flipped"].sum())
        judged = g["judge_on_target"].dropna()
        measured = g[g["entanglement"].notna()]
        flips = pd.Series([f for fl in measured["unintended_flips"] if fl is not None
                           for f in fl], dtype=object)
        out[str(attr)] = {
            "rows": rows, "on_target": hit, "flipped": flipped,
            "on_target_rate": hit / rows, "flipped_rate": flipped / rows,
            "judge_rows": len(judged), "judge_on_target": int(judged.sum()),
            "judge_on_target_rate": float(judged.mean()) if len(judged) else None,
            "entanglement_rows": len(measured),
            "entanglement_mean": (float(measured["entanglement"].mean()) if len(measured)
                                  else None),
            "unintended_flip_rate": (float(measured["unintended_flips"].map(
                lambda f: f is not None and len(f) > 0).mean()) if len(measured) else None),
            "most_flipped": {str(k): int(v) for k, v in
                             flips.value_counts().head(MOST_FLIPPED).items()},
        }
    return out


def actor_time(metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """Per actor (and its node): the seconds its rows record in each phase, and the
    engine's share of them (`engine_busy`), most rows first. Rows written before the
    time columns existed count for nothing here; none at all: []."""
    if not len(metrics) or not set(TIME_COLUMNS) <= set(metrics.columns):
        return []
    timed = metrics.dropna(subset=TIME_COLUMNS, how="all")
    if not len(timed):
        return []
    out = []
    keys = timed[["actor", "node"]].fillna("?")
    for (actor, node), g in timed.groupby([keys["actor"], keys["node"]], sort=True):
        seconds = {c[len("time_"):-len("_s")]: float(g[c].astype(float).sum())
                   for c in TIME_COLUMNS}
        total = sum(seconds.values())
        out.append({"actor": str(actor), "node": str(node), "rows": len(g),
                    "seconds": {k: round(v, 3) for k, v in seconds.items()},
                    "engine_busy": seconds["engine"] / total if total else None})
    return sorted(out, key=lambda r: -r["rows"])


def this_runs_summary(summary: dict | None, started_at: float | None) -> dict | None:
    """summary.json when it is the run's that started at `started_at` (job.json's), else
    None: an earlier run's summary says nothing about this one."""
    if not summary or started_at is None:
        return None
    return summary if (summary.get("this_run") or {}).get("started_at") == started_at else None


def summarize(metrics: pd.DataFrame, manifest_ids: set[str], this_run: pd.DataFrame,
              skipped: int, seconds: float, output: str) -> dict[str, Any]:
    """summary.json: counts for this run, for this manifest's rows (the job's state) and
    for everything under the output (other manifests may share it); per-attribute rates
    and errors are over this manifest's rows."""
    mine = of_manifest(metrics, manifest_ids)
    run = Counts.of(this_run["status"])
    manifest = Counts.of(mine["status"], total=len(manifest_ids))
    errors = mine[mine["status"] == ERROR].head(20) if len(mine) else mine
    return {
        "output": output,
        "this_run": {**run.as_dict(), "skipped_already_done": skipped,
                     "seconds": round(seconds, 2),
                     "images_per_hour": round(run.ok / seconds * 3600, 1) if seconds else None},
        "manifest": {"rows": len(manifest_ids), **manifest.as_dict(), "pending": manifest.pending},
        "whole_output": Counts.of(metrics["status"]).as_dict(),
        "per_attribute": per_attribute(mine),
        "per_actor": actor_time(mine),
        "errors": [{"id": r["id"], "error": r["error"]} for r in errors.to_dict("records")],
    }
