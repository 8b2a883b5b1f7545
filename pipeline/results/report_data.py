"""The job report's figures as plain data: every aggregate the page shows, and no markup.

    gather(files, status, mine, shown, errors, grid, verdicts)  ->  ReportData

report.py renders it. Each section's figures come from one function here, testable
without HTML: the job (`job_figures`, `models_table`), the per-attribute table
(`attribute_rows`), entanglement (`entanglement_rows`), the reviewer's figures
(`review_figures`), identity (`identity_figures`, `identity_counts`), the plots
(`plot_figures`, data URIs), the before/after grid (`grid_sample`, `caption`), the
failures (`failure_rows`), the configuration (`configuration`) and the metrics files
the figures do not count (`files_not_counted`: damaged, set aside, foreign). Rates are fractions
(0 to 1), missing figures None or NaN; the templates (pipeline/results/templates/)
write them out. job.json is read only through pipeline/output/jobfile.py: its spec,
edit base and edits' settings are shown as recorded, never resolved here.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from models import identity
from pipeline.engine.rows import on_target
from pipeline.output.jobfile import edit_base_of, edits_of, spec_of
from pipeline.output.ledger import (ERROR, MOST_FLIPPED, OK, actor_time, among,
                                    attribute_outcomes, this_runs_summary)
from pipeline.output.metrics import NETWORK_HASH_COLUMNS, UnreadFile
from pipeline.results.review import acceptance
from pipeline.results.status import JobFiles, JobStatus

from . import plots

FAILURES_SHOWN = 1000    # failure rows on the page at most (failures.csv holds all)


@dataclass
class ReportData:
    """Every figure of the page, section by section (see each function below)."""
    output: str
    job: dict[str, Any]
    models: dict[str, Any]
    judged: bool
    attributes: list[dict[str, Any]]
    entanglement: list[dict[str, Any]]
    identity: dict[str, Any]
    plots: list[dict[str, Any]]
    grid: dict[str, Any]
    failures: dict[str, Any]
    configuration: dict[str, Any] | None
    review: dict[str, Any] | None = None
    verdicts: dict[str, str] = field(default_factory=dict)
    not_counted: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: files_not_counted([], []))
    actors: list[dict[str, Any]] = field(default_factory=list)   # ledger.actor_time


def mean(values: pd.Series) -> float:
    """The mean of the finite numbers among `values` (NaN when there are none)."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _share(values: pd.Series) -> float | None:
    """The share of true values, None when there are none."""
    return float(values.astype(bool).mean()) if len(values) else None


def edited(mine: pd.DataFrame) -> pd.DataFrame:
    """The ok rows, by id."""
    return mine[mine["status"] == OK].sort_values("id") if len(mine) else mine


def failed(mine: pd.DataFrame) -> pd.DataFrame:
    """The error rows, by id."""
    return mine[mine["status"] == ERROR].sort_values("id") if len(mine) else mine


# ---- the job ---------------------------------------------------------------------------------
def run_figures(files: JobFiles, status: JobStatus) -> dict[str, Any]:
    """This run's wall time, rows per hour and counts: summary.json's when the run
    ended, else from the metrics rows so far."""
    started = files.started_at
    summary = this_runs_summary(files.summary, started)
    if summary is not None:
        run = summary["this_run"]
        return {"finished": True, "seconds": run.get("seconds"), "ok": run.get("ok"),
                "error": run.get("error"), "skipped": run.get("skipped_already_done"),
                "per_hour": run.get("images_per_hour")}
    end = status.now if status.state == "running" else (status.last_row_at or status.now)
    f = status.figures
    return {"finished": False, "seconds": None if started is None else max(end - started, 0.0),
            "ok": None, "error": None, "skipped": f.before,
            "per_hour": None if f.overall_rate is None else f.overall_rate * 3600}


def state_of(status: JobStatus) -> dict[str, Any]:
    """Whether every manifest row has a result, and if not, how far and whether it runs."""
    f = status.figures
    return {"complete": f.pending == 0, "total": f.total, "done": f.ok + f.error,
            "running": status.state in ("running", "waiting"),
            "last_row_ago": (None if status.last_row_at is None
                             else status.now - status.last_row_at)}


def provenance(mine: pd.DataFrame) -> list[dict[str, Any]]:
    """How many edit settings and code versions made the ok rows (each row records both),
    and how many ok rows predate the record."""
    ok = mine[mine["status"] == OK] if len(mine) else mine
    out = []
    for column, what in (("settings_sha256", "edit settings"), ("code_version", "code versions")):
        values = ok[column].dropna() if column in ok.columns else pd.Series([], dtype=object)
        out.append({"what": what, "column": column, "count": int(values.nunique()),
                    "missing": len(ok) - len(values)})
    return out


def job_figures(files: JobFiles, status: JobStatus, mine: pd.DataFrame) -> dict[str, Any]:
    """The job section: the counts, this run, the state, provenance and warnings."""
    f, job = status.figures, files.record or {}
    outside = job.get("reads_outside_manifest_folder") or {}    # older outputs' key
    tiny = bool(len(mine) and "tiny_models" in mine.columns
                and mine["tiny_models"].fillna(False).astype(bool).any())
    return {"output": files.output,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.now)),
            "tiny": tiny, "state": state_of(status), "run": run_figures(files, status),
            "total": f.total, "ok": f.ok, "error": f.error, "pending": f.pending,
            "code_version": job.get("code_version"), "provenance": provenance(mine),
            "outside": outside if outside.get("rows") else None,
            "inputs_anywhere": inputs_from_anywhere(job),
            "other_rows": status.other_rows}


def inputs_from_anywhere(job: Mapping[str, Any] | None) -> bool:
    """Whether the job opted out of the input rule (`inputs.allow: [any]` in job.json's
    spec): it read inputs from wherever its manifest named, which a reader of its results
    should be told plainly."""
    allow = (spec_of(job).get("inputs") or {}).get("allow")
    if isinstance(allow, str):
        allow = [allow]
    return isinstance(allow, (list, tuple)) and "any" in allow


def files_not_counted(quarantined: Sequence[Mapping[str, Any]],
                      unread: Sequence[UnreadFile]) -> dict[str, list[dict[str, Any]]]:
    """The files under metrics/ whose rows the figures do not count: `quarantined`, the
    damaged ones a run set aside (metrics.quarantined's records: their rows are edited
    again); `damaged`, those not set aside yet (the next run will); `foreign`, files that
    are not the job's (never read). Each with its file, size and reason."""
    def when(at: Any) -> str:
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(at)))
        except (TypeError, ValueError, OverflowError):
            return "–"
    return {"quarantined": [{"file": str(q.get("file")), "size": q.get("size"),
                             "reason": str(q.get("reason")), "when": when(q.get("at")),
                             "moved_to": str(q.get("moved_to"))} for q in quarantined],
            "damaged": [u.as_dict() for u in unread if u.damaged],
            "foreign": [u.as_dict() for u in unread if not u.damaged]}


def models_table(job: Mapping[str, Any] | None, mine: pd.DataFrame) -> dict[str, Any]:
    """The models spec the job names, and per network and sha256 the rows it made (the
    networks' hash columns only: not the settings hash)."""
    rows = []
    for network, column in NETWORK_HASH_COLUMNS.items():
        if column not in mine.columns:
            continue
        for sha, n in mine[column].dropna().value_counts().items():
            rows.append({"network": network, "sha256": str(sha), "rows": int(n)})
    return {"spec": spec_of(job).get("models"), "rows": rows}


# ---- per attribute, entanglement -------------------------------------------------------------
def attribute_rows(ok: pd.DataFrame, outcomes: pd.DataFrame) -> list[dict[str, Any]]:
    """Per edited attribute: rows, on-target and flipped rates (by the classifier; by the
    judge over the edits it judged, None without any), the mean P(target) before and
    after, entanglement, and the mean preservation and identity of its edits."""
    rows = []
    for attribute, g in outcomes.groupby("attribute", sort=True):
        edits = ok[among(ok["id"], set(g["id"]))]
        rows.append({"attribute": str(attribute), "rows": len(g),
                     "on_target": float(g["on_target"].mean()),
                     "judge_on_target": _share(g["judge_on_target"].dropna()),
                     "flipped": float(g["flipped"].mean()),
                     "p_target_before": mean(g["p_target_before"]),
                     "p_target_after": mean(g["p_target_after"]),
                     "entanglement": mean(g["entanglement"]),
                     "preservation_l1": mean(edits["preservation_l1"]),
                     "outside_psnr": mean(edits["outside_psnr"]),
                     "identity_distance": mean(edits["identity_distance"])})
    return rows


def judged(outcomes: pd.DataFrame) -> bool:
    """Whether a held-out judge measured any edit."""
    return bool(len(outcomes) and outcomes["judge_on_target"].notna().any())


def entanglement_rows(outcomes: pd.DataFrame) -> list[dict[str, Any]]:
    """Per edited attribute, over the edits with entanglement figures: their count, the
    mean and max entanglement, the share with an unintended flip, and the attributes
    flipped most often ([name, edits], at most MOST_FLIPPED)."""
    measured = outcomes[outcomes["entanglement"].notna()] if len(outcomes) else outcomes
    rows = []
    for attribute, g in measured.groupby("attribute", sort=True):
        flips = pd.Series([f for fl in g["unintended_flips"] if fl is not None for f in fl],
                          dtype=object)
        any_flip = g["unintended_flips"].map(lambda f: f is not None and len(f) > 0)
        rows.append({"attribute": str(attribute), "edits": len(g),
                     "mean": mean(g["entanglement"]),
                     "max": float(g["entanglement"].astype(float).max()),
                     "with_flip": float(any_flip.mean()),
                     "most_flipped": [[str(name), int(n)] for name, n in
                                      flips.value_counts().head(MOST_FLIPPED).items()]})
    return rows


# ---- review, identity, plots -----------------------------------------------------------------
def review_figures(verdicts: Mapping[str, str], ok: pd.DataFrame,
                   outcomes: pd.DataFrame) -> dict[str, Any]:
    """The reviewer's acceptance (review.py) beside the classifier's and the judge's
    on-target rates over the same decided edits; `left_out`: verdicts naming ids that
    are not edited rows of this output."""
    mine = {rid: v for rid, v in verdicts.items() if rid in set(ok["id"])}
    figures = acceptance(mine)
    decided = outcomes[among(outcomes["id"], {rid for rid, v in mine.items()
                                              if v in ("accept", "reject")})]
    classifier = decided.groupby("id")["on_target"].all()
    judge = decided.dropna(subset=["judge_on_target"]).groupby("id")["judge_on_target"].all()
    low, high = figures["interval"] or (None, None)
    return {"verdicts": len(mine), "accept": figures["accept"], "reject": figures["reject"],
            "unsure": figures["unsure"], "decided": figures["decided"], "rate": figures["rate"],
            "low": low, "high": high, "classifier": _share(classifier),
            "judge": _share(judge), "left_out": len(verdicts) - len(mine)}


def identity_counts(ok: pd.DataFrame) -> dict[str, int]:
    """How the identity metric ended on the ok rows: 'ok', 'no face in the input', ...,
    and 'not recorded' for rows written before the metric existed."""
    status = ok["identity_status"].fillna("not recorded") if len(ok) else pd.Series([], dtype=str)
    return {str(k): int(v) for k, v in status.value_counts().items()}


def _identity_reason(status: str) -> str:
    """Why an identity status has no distance: no_face, unavailable, not_recorded, failed."""
    if status.startswith(identity.NO_FACE):
        return "no_face"
    if status.startswith("unavailable"):
        return "unavailable"
    return "not_recorded" if status == "not recorded" else "failed"


def identity_figures(ok: pd.DataFrame) -> dict[str, Any]:
    """The edits with a distance (their mean, the same-person share, the metric's time
    per image) and, per other status, its count and reason."""
    counts = identity_counts(ok)
    measured = (pd.to_numeric(ok["identity_distance"], errors="coerce").dropna()
                if len(ok) else pd.Series([], dtype=float))
    same = ok["same_person"].dropna() if len(measured) else pd.Series([], dtype=bool)
    return {"threshold": identity.SAME_PERSON_THRESHOLD, "counts": counts,
            "measured": len(measured),
            "mean_distance": float(measured.mean()) if len(measured) else None,
            "same_person": _share(same),
            "ms_per_image": mean(ok["identity_seconds"]) * 1000 if len(measured) else None,
            "other": [{"status": s, "edits": n, "reason": _identity_reason(s)}
                      for s, n in counts.items() if s != identity.OK]}


def plot_figures(ok: pd.DataFrame, outcomes: pd.DataFrame) -> list[dict[str, Any]]:
    """The plots, each a title and a data URI (None: not drawn, for want of data)."""
    return [{"title": "P(target) after the edit, per attribute",
             "uri": plots.target_probability_histograms(outcomes)},
            {"title": "Entanglement, per edited attribute",
             "uri": plots.entanglement_histograms(outcomes)},
            {"title": "Identity distance",
             "uri": plots.identity_histogram(ok["identity_distance"])},
            {"title": "Preservation against steps (early stopping)",
             "uri": plots.preservation_against_steps(ok)}]


# ---- the grid, the failures ------------------------------------------------------------------
def grid_sample(ok: pd.DataFrame, grid: int) -> pd.DataFrame:
    """The edits the grid shows: all of them, or a seeded random `grid` of them; by their
    first attribute, then id."""
    shown = ok if len(ok) <= grid else ok.sample(grid, random_state=0)
    first = [a[0] for a in shown["attributes"]]
    return shown.assign(_first=first).sort_values(["_first", "id"]).drop(columns="_first")


def _given(value: Any) -> bool:
    """A metrics value that is there: not None, NaN or NA (lists count as given)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return True
    return value is not None and not pd.isna(value)


def caption(row: Mapping[str, Any]) -> dict[str, Any]:
    """What the grid says under one edit: per attribute the target, P before and after
    and whether it is on target; the judge's verdict, entanglement and flips, identity,
    and preservation (None where the row has no such figure)."""
    judge, flips = row.get("judge_on_target"), row.get("unintended_flips")
    status = row.get("identity_status")
    return {"id": str(row["id"]),
            "attributes": [{"attribute": str(a), "target": t, "p_input": p0, "p_result": p1,
                            "hit": bool(on_target(p1, t))}
                           for a, t, p0, p1 in zip(row["attributes"], row["targets"],
                                                   row["prob_input"], row["prob_result"])],
            "judge": bool(judge) if _given(judge) else None,
            "entanglement": row["entanglement"] if _given(row.get("entanglement")) else None,
            "flips": [str(f) for f in flips] if flips is not None and _given(flips) else [],
            "identity_status": status if isinstance(status, str) else None,
            "identity_ok": status == identity.OK,
            "identity_distance": row.get("identity_distance"),
            "same_person": bool(row.get("same_person")),
            "preservation_l1": row.get("preservation_l1"),
            "outside_psnr": row.get("outside_psnr")}


def grid_figures(shown: pd.DataFrame, total: int, grid: int) -> dict[str, Any]:
    """The grid: how many edits it shows of how many, and each one's caption."""
    return {"total": total, "shown": len(shown), "grid": grid,
            "sampled": len(shown) < total,
            "edits": [caption(row) for row in shown.to_dict("records")]}


def failure_rows(errors: pd.DataFrame, shown: int = FAILURES_SHOWN) -> dict[str, Any]:
    """The failed rows (at most `shown` of them): id, reason (on one line), input URI."""
    rows = [{"id": str(r["id"]), "reason": " ".join(str(r["error"]).split()),
             "input_uri": r.get("input_uri")}
            for r in errors.head(shown).to_dict("records")]
    return {"total": len(errors), "rows": rows, "more": max(len(errors) - shown, 0)}


# ---- the configuration -----------------------------------------------------------------------
def configuration(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """job.json's configuration (None without one): the spec's keys and values (JSON)
    but its edit; the edit settings before derivation, each with whether the spec set it;
    and per recorded edit the settings that differ from them. An output older than the
    recorded settings (`recorded` False) has only the spec's edit overrides."""
    if job is None:
        return None
    spec = spec_of(job)
    overrides = dict(spec.pop("edit", None) or {})
    out: dict[str, Any] = {"spec": [[k, json.dumps(v)] for k, v in spec.items()],
                           "overrides": [[k, v] for k, v in overrides.items()]}
    base, edits = edit_base_of(job), edits_of(job)
    if base is None or edits is None:
        return {**out, "recorded": False, "base": [], "edits": []}
    derived = []
    for edit in sorted(edits, key=lambda e: (list(e.get("attributes") or []),
                                             str(e.get("mode")))):
        settings = edit.get("settings") or {}
        derived.append({"attributes": [str(a) for a in edit.get("attributes") or []],
                        "mode": edit.get("mode"),
                        "differs": [[k, v] for k, v in settings.items()
                                    if k not in base or base[k] != v]})
    return {**out, "recorded": True,
            "base": [{"setting": k, "value": v, "by_spec": k in overrides}
                     for k, v in base.items()],
            "edits": derived}


# ---- all of it -------------------------------------------------------------------------------
def gather(files: JobFiles, status: JobStatus, mine: pd.DataFrame, shown: pd.DataFrame,
           errors: pd.DataFrame, grid: int, verdicts: Mapping[str, str] | None = None,
           not_counted: Mapping[str, list[dict[str, Any]]] | None = None) -> ReportData:
    """Every section's figures. `mine`: the manifest's metrics rows; `shown`: the grid's
    sample (grid_sample) and `errors` the failed rows, each with their files' columns;
    `verdicts`: a reviewer's (None: no review section); `not_counted`: the metrics
    files the rows were not read from (`files_not_counted`; None: none)."""
    ok = edited(mine)
    outcomes = attribute_outcomes(mine)
    return ReportData(
        output=files.output, job=job_figures(files, status, mine),
        models=models_table(files.record, mine), judged=judged(outcomes),
        attributes=attribute_rows(ok, outcomes), entanglement=entanglement_rows(outcomes),
        identity=identity_figures(ok), plots=plot_figures(ok, outcomes),
        grid=grid_figures(shown, len(ok), grid), failures=failure_rows(errors),
        configuration=configuration(files.record),
        review=None if verdicts is None else review_figures(verdicts, ok, outcomes),
        verdicts=dict(verdicts or {}),
        not_counted=dict(not_counted or files_not_counted([], [])),
        actors=actor_time(mine))

