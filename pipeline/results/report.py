"""The job report: an output's files turned into a page a person reads at a glance.

    write_report(output_uri, dest=None)  ->  <dest>/index.html + <dest>/thumbs/*.png

It reads only what a job leaves under its output (job.json, summary.json, metrics/,
and the image, mask and pasted files the metrics rows name), on local disk or S3
alike, while the job runs or after it ended; dest defaults to `<output>/report`.
The page opens from disk with no server: thumbnails are files beside it, plots are
embedded, the mask overlay toggles with CSS alone.

Sections: the job (state, counts, time, rate, models by hash, the resolved config,
a banner for tiny weights), a table per attribute (on target by the classifier and by
the held-out judge, or a warning that there is none), entanglement, identity
preservation, plots, a before/after grid (a seeded sample of at most `grid` edits on
large jobs) with a review pass (a verdict per edit, saved to a file), the reviewer's
figures when a verdicts file is given, and the failures. The counts and rates are
`maskface status`'s (pipeline/results/status.py); the on-target rule is summary.json's
(pipeline/output/ledger.py attribute_outcomes); verdicts are pipeline/results/review.py's.
"""
from __future__ import annotations

import html
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from models import identity
from pipeline.engine.rows import on_target
from pipeline.output.figures import fmt_duration
from pipeline.output.images import png_bytes, read_pil
from pipeline.output.layout import Output
from pipeline.output.ledger import (ERROR, MOST_FLIPPED, OK, among, attribute_outcomes,
                                    of_manifest, this_runs_summary)
from pipeline.output.metrics import read_metrics
from pipeline.results.review import VERDICTS, acceptance, read_verdicts
from pipeline.results.status import (STATUS_COLUMNS, JobFiles, JobStatus, compute_status,
                                     manifest_ids, read_job_files)

from . import plots

log = logging.getLogger(__name__)

GRID = 120               # edits shown in the before/after grid at most (a sample beyond)
THUMB = 160              # thumbnail side, px
FAILURES_SHOWN = 1000    # failure rows on the page at most (failures.csv holds all)


# What the report reads of every row (its tables, plots and status), and of the rows it
# shows one by one (the grid's sample and the failures): their files.
NETWORK_COLUMNS = ["generator_sha256", "face_parser_sha256", "classifier_sha256",
                   "e4e_sha256", "lpips_trunk_sha256", "judge_sha256"]
REPORT_COLUMNS = [*STATUS_COLUMNS, "attributes", "targets", "prob_input", "prob_result",
                  "judge_prob_result", "judge_on_target", "entanglement", "unintended_flips",
                  "preservation_l1", "outside_psnr", "identity_distance", "same_person",
                  "identity_status", "identity_seconds", "steps", "mode", "tiny_models",
                  "settings_sha256", "code_version", *NETWORK_COLUMNS]
FILE_COLUMNS = ["id", "input_uri", "edited_uri", "mask_uri", "pasted_uri"]


def job_manifest_ids(files: JobFiles, storage_options: Mapping | None) -> set[str] | None:
    """The ids of the manifest job.json names, or None when it is gone or unreadable (the
    report then counts against job.json's row count)."""
    manifest = files.job_manifest
    if not manifest:
        return None
    options = storage_options or files.job_storage_options
    try:
        return manifest_ids(manifest, options)
    except Exception as e:
        log.warning("report: manifest %s not readable (%s); using job.json's row count",
                    manifest, e)
        return None


def write_report(output_uri: str, dest: str | None = None,
                 storage_options: Mapping | None = None, grid: int = GRID,
                 now: float | None = None, reviewed: str | None = None) -> str:
    """Write the report folder; returns the URI of its index.html. Its tables and plots
    are aggregates over every row; only the grid's sample and the failures are read in
    full, so its time grows with the rows, not with their images. `reviewed`: a
    verdicts file (pipeline/results/review.py), whose figures the page shows and whose
    verdicts its review pass starts from."""
    verdicts = read_verdicts(reviewed, storage_options) if reviewed else {}
    files = read_job_files(output_uri, storage_options, REPORT_COLUMNS)
    ids = job_manifest_ids(files, storage_options)
    site = Output(dest or f"{output_uri.rstrip('/')}/report", storage_options)
    mine = of_manifest(files.metrics, ids)
    status = compute_status(files.metrics, output=output_uri, manifest_ids=ids,
                            total=(files.job or {}).get("rows"), started_at=files.started_at,
                            now=now)
    ok = mine[mine["status"] == OK].sort_values("id")
    errors = mine[mine["status"] == ERROR].sort_values("id")
    shown = ok if len(ok) <= grid else ok.sample(grid, random_state=0)
    shown = shown.assign(_first=[a[0] for a in shown["attributes"]]).sort_values(["_first", "id"])
    paths = read_metrics(Output(output_uri, storage_options), FILE_COLUMNS,
                         ids=set(shown["id"]) | set(errors["id"])).set_index("id")
    shown, errors = (df.join(paths, on="id") for df in (shown, errors))
    thumbs = _write_thumbnails(site, shown, storage_options)
    if len(errors):
        site.put("failures.csv", errors[["id", "error", "input_uri"]].to_csv(index=False).encode())
    outcomes = attribute_outcomes(mine)
    body = "\n".join([
        _job_section(files, status, mine),
        _attribute_section(ok, outcomes),
        _entanglement_section(outcomes),
        _review_section(verdicts, ok, outcomes) if reviewed else "",
        _identity_section(ok),
        _plots_section(ok, outcomes),
        _grid_section(shown, thumbs, len(ok), grid, output_uri, verdicts),
        _failures_section(errors),
        _config_section(files.job, ok),
    ])
    site.put("index.html", _page(f"maskface report: {output_uri}", body).encode())
    return f"{site.uri}/index.html"


# ---- thumbnails ------------------------------------------------------------------------------
def _square(image: Image.Image) -> Image.Image:
    """To THUMB x THUMB, stretched as the engine stretches a non-square input."""
    resample = Image.Resampling.LANCZOS if image.width > THUMB else Image.Resampling.NEAREST
    return image.resize((THUMB, THUMB), resample)


def mask_outline(mask: Image.Image) -> Image.Image:
    """The blend mask as an RGBA overlay: tinted by its weight, its 0.5 contour drawn."""
    weight = np.asarray(_square(mask.convert("L")), dtype=np.float32) / 255
    solid = Image.fromarray(((weight >= 0.5) * 255).astype(np.uint8))
    border = (np.asarray(solid.filter(ImageFilter.MaxFilter(3)))
              != np.asarray(solid.filter(ImageFilter.MinFilter(3))))
    rgba = np.zeros((THUMB, THUMB, 4), np.uint8)
    rgba[..., 1:3] = (229, 255)
    rgba[..., 3] = (weight * 150).astype(np.uint8)
    rgba[border] = (0, 229, 255, 255)
    return Image.fromarray(rgba, "RGBA")


def _thumbnails_of(row: dict, storage_options: Mapping | None) -> dict[str, bytes | str]:
    """Per kind (input, result, mask, pasted), the thumbnail's PNG bytes, or why not."""
    out: dict[str, bytes | str] = {}
    sources = {"input": "input_uri", "result": "edited_uri", "mask": "mask_uri",
               "pasted": "pasted_uri"}
    for kind, column in sources.items():
        uri = row.get(column)
        if not isinstance(uri, str) or not uri:
            continue
        try:
            image = read_pil(uri, storage_options)
        except Exception as e:      # a missing or unreadable file: said on the page
            out[kind] = f"{uri}: {type(e).__name__}: {e}"
            continue
        if kind == "mask":
            image = mask_outline(image)
        elif kind == "pasted":
            image.thumbnail((THUMB * 2, THUMB * 2))
        else:
            image = _square(image)
        out[kind] = png_bytes(image)
    return out


def _write_thumbnails(site: Output, rows: pd.DataFrame, storage_options: Mapping | None
                      ) -> dict[str, dict[str, str]]:
    """Write each shown row's thumbnails; per id and kind, the page's relative src, or
    the reason it is missing (prefixed with '!')."""
    def one(row):
        made = {}
        for kind, data in _thumbnails_of(row, storage_options).items():
            if isinstance(data, str):
                made[kind] = "!" + data
            else:
                rel = f"thumbs/{row['id']}.{kind}.png"
                site.put(rel, data)
                made[kind] = rel
        return row["id"], made
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, rows.to_dict("records")))


# ---- sections --------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3, unit: str = "") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "–"
    return ("∞" if math.isinf(v) else f"{v:.{digits}f}") + unit


def _mean(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _table(head: list[str], rows: list[list[str]], cls: str = "", tid: str = "") -> str:
    """An HTML table; cells are HTML already (escape with _e)."""
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{tid}"' if tid else "")
    thead = ("<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>"
             if any(head) else "")
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{attrs}>{thead}<tbody>{body}</tbody></table>"


def _run_figures(files: JobFiles, status: JobStatus) -> dict[str, Any]:
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


def _state_banner(status: JobStatus) -> str:
    f, total = status.figures, status.figures.total
    done = f.ok + f.error
    if f.pending == 0:
        return f'<p class="state done">Complete: all {total} rows of the manifest have a result.</p>'
    if status.state in ("running", "waiting"):
        how = "the job is still running"
    else:
        how = "the job is not running (stopped or killed); `maskface run` again resumes it"
    last = ("" if status.last_row_at is None else
            f", last row written {fmt_duration(status.now - status.last_row_at)} ago")
    of = f" of {total}" if total is not None else " (the manifest's size is unknown)"
    return (f'<p class="state partial">PARTIAL REPORT: {done}{of} rows done, '
            f"{_e(how)}{_e(last)}. Figures below cover the rows done so far.</p>")


def _job_section(files: JobFiles, status: JobStatus, mine: pd.DataFrame) -> str:
    f, run = status.figures, _run_figures(files, status)
    parts = [f"<h1>maskface report</h1><p class=sub>output <code>{_e(files.output)}</code>; "
             f"generated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.now))}</p>"]
    if len(mine) and mine["tiny_models"].fillna(False).astype(bool).any():
        parts.append('<div class="tiny">TINY RANDOM WEIGHTS: these results come from tiny '
                     'random-weight test models (<code>maskface weights make-tiny</code>). They '
                     'are NOT face edits; the figures only show the pipeline ran.</div>')
    parts.append(_state_banner(status))
    total = f.total
    pending = "–" if f.pending is None else str(f.pending)
    rows = [["manifest rows", _e("unknown" if total is None else total)],
            ["ok", str(f.ok)], ["error", str(f.error)], ["pending", pending],
            ["this run", f"{_e('–' if run['ok'] is None else run['ok'])} ok, "
                         f"{_e('–' if run['error'] is None else run['error'])} error, "
                         f"{_e(run['skipped'])} skipped (done by an earlier run)"
             if run["finished"] else f"{_e(run['skipped'])} rows were done before it started "
                                     "(skipped); it has not ended"],
            ["wall time" + ("" if run["finished"] else " so far"),
             _e(fmt_duration(run["seconds"]))],
            ["images per hour", _num(run["per_hour"], 1)],
            ["code version", _e((files.job or {}).get("code_version", "–"))],
            ["provenance", _provenance(mine)]]
    outside = (files.job or {}).get("reads_outside_manifest_folder") or {}
    if outside.get("rows"):
        rows.append(["inputs", f'<span class="warn">{outside["rows"]} row(s) read inputs '
                               f"outside the manifest's folder <code>{_e(outside['folder'])}"
                               "</code>: no <code>inputs.allow</code>, so the default rule "
                               "let them (list it to restrict what a job may read)</span>"])
    if status.other_rows:
        rows.append(["other rows", f"{status.other_rows} rows under this output belong to "
                                   "other manifests (not counted here)"])
    parts.append("<h2>The job</h2>" + _table(["", ""], rows, "kv"))
    parts.append(_models_table(files.job, mine))
    return "\n".join(parts)


def _provenance(mine: pd.DataFrame) -> str:
    """How many edit settings and code versions made the rows (each row records both)."""
    ok = mine[mine["status"] == OK] if len(mine) else mine
    parts = []
    for col, what in (("settings_sha256", "edit settings"), ("code_version", "code versions")):
        values = ok[col].dropna() if col in ok.columns else pd.Series([], dtype=object)
        missing = len(ok) - len(values)
        parts.append(f"{values.nunique()} {what}" + (f" ({missing} rows from before it was "
                                                     "recorded)" if missing else ""))
    return _e(", ".join(parts) + " among the edited rows (settings_sha256, code_version)")


def _models_table(job: dict | None, mine: pd.DataFrame) -> str:
    spec = ((job or {}).get("settings") or {}).get("models", "–")
    rows = []
    for col in [c for c in mine.columns if c.endswith("_sha256")]:
        for sha, n in mine[col].dropna().value_counts().items():
            rows.append([_e(col.removesuffix("_sha256")), f"<code>{_e(sha)}</code>", str(n)])
    table = (_table(["network", "sha256", "rows"], rows) if rows
             else "<p>No rows yet: the hashes appear with the first results.</p>")
    return f"<h3>Models</h3><p>spec <code>{_e(spec)}</code></p>{table}"


CIRCULAR = ("On target is judged by the attribute classifier the edit optimised: the edit "
            "was steered until that network said yes, so its verdict is an upper bound, and "
            "an edit that fools the network (a few pixels, not a smile) scores as well as a "
            "real one. Name a held-out judge in the models spec "
            "(<code>judge:</code>, docs/weights.md) for a second opinion.")


def _attribute_section(ok: pd.DataFrame, outcomes: pd.DataFrame) -> str:
    if not len(outcomes):
        return "<h2>Per attribute</h2><p>No edited rows yet.</p>"
    judged = outcomes["judge_on_target"].notna().any()
    rows = []
    for attr, g in outcomes.groupby("attribute", sort=True):
        edits = ok[among(ok["id"], set(g["id"]))]
        judge = g["judge_on_target"].dropna().astype(bool)
        rows.append([_e(attr), str(len(g)), _num(g["on_target"].mean() * 100, 1, " %"),
                     _num(judge.mean() * 100, 1, " %") if len(judge) else "–",
                     _num(g["flipped"].mean() * 100, 1, " %"),
                     _num(_mean(g["p_target_before"])), _num(_mean(g["p_target_after"])),
                     _num(_mean(g["entanglement"])),
                     _num(_mean(edits["preservation_l1"]), 4),
                     _num(_mean(edits["outside_psnr"]), 1, " dB"),
                     _num(_mean(edits["identity_distance"]))])
    head = ["attribute", "rows", "on target (classifier)", "on target (judge)", "flipped",
            "mean P(target) before", "mean P(target) after", "mean entanglement",
            "mean preservation_l1", "mean outside_psnr", "mean identity distance"]
    warning = ("" if judged else
               f'<p class="warn" id="upper-bound"><b>No judge:</b> {CIRCULAR}</p>')
    return ("<h2>Per attribute</h2>" + warning + _table(head, rows) +
            "<p class=note>On target: the probability ends on the target's side of 0.5, by "
            "the classifier the edit optimised (circular: an upper bound) and by the "
            "held-out judge, a network no loss used (over the edits it judged). Flipped: on "
            "target now and not before (classifier). P(target): the classifier's probability "
            "of the target's side. Entanglement: the mean change of the other attributes' "
            "probabilities. Preservation and identity are per edit, over the edits that "
            "include the attribute.</p>")


def _entanglement_section(outcomes: pd.DataFrame) -> str:
    measured = outcomes[outcomes["entanglement"].notna()] if len(outcomes) else outcomes
    parts = ["<h2>Entanglement</h2>",
             "<p class=note>What each edit did to the attributes it did not target: the mean "
             "absolute change of their probabilities (0: none moved), and the attributes "
             "whose probability crossed 0.5 (unintended flips), by the classifier on the "
             "input and on the result. Left out besides the targets: the attributes a "
             "target implies by definition (another hair colour for a hair colour, "
             "straight and wavy hair, hair for bald, a beard for no_beard).</p>"]
    if not len(measured):
        parts.append("<p>No edit with entanglement figures yet (rows written before they "
                     "existed have none).</p>")
        return "\n".join(parts)
    rows = []
    for attr, g in measured.groupby("attribute", sort=True):
        flips = pd.Series([f for fl in g["unintended_flips"] if fl is not None for f in fl],
                          dtype=object)
        any_flip = g["unintended_flips"].map(lambda f: f is not None and len(f) > 0)
        top = ", ".join(f"{_e(name)} ({n})" for name, n in
                        flips.value_counts().head(MOST_FLIPPED).items()) or "none"
        rows.append([_e(attr), str(len(g)), _num(_mean(g["entanglement"])),
                     _num(g["entanglement"].astype(float).max()),
                     _num(any_flip.mean() * 100, 1, " %"), top])
    parts.append(_table(["edited attribute", "edits", "mean entanglement", "max",
                         "edits with an unintended flip", "flipped most often (edits)"],
                        rows, tid="entanglement"))
    return "\n".join(parts)


def _review_section(verdicts: Mapping[str, str], ok: pd.DataFrame,
                    outcomes: pd.DataFrame) -> str:
    """The reviewer's acceptance beside the classifier's and the judge's, over the same
    edits."""
    mine = {rid: v for rid, v in verdicts.items() if rid in set(ok["id"])}
    figures = acceptance(mine)
    decided = outcomes[among(outcomes["id"], {rid for rid, v in mine.items()
                                              if v in ("accept", "reject")})]
    classifier = decided.groupby("id")["on_target"].all()
    judge = decided.dropna(subset=["judge_on_target"]).groupby("id")["judge_on_target"].all()
    low, high = figures["interval"] or (float("nan"), float("nan"))
    rows = [["verdicts", f"{len(mine)} edits: {figures['accept']} accepted, "
                         f"{figures['reject']} rejected, {figures['unsure']} unsure"],
            ["accepted by the reviewer",
             f"{_num(figures['rate'] * 100 if figures['rate'] is not None else None, 1, ' %')}"
             f" of {figures['decided']} decided (95% interval {_num(low * 100, 1)}–"
             f"{_num(high * 100, 1, ' %')})"],
            ["on target, classifier (same edits)",
             _num(classifier.mean() * 100 if len(classifier) else None, 1, " %")],
            ["on target, judge (same edits)",
             _num(judge.astype(bool).mean() * 100 if len(judge) else None, 1, " %")]]
    left = len(verdicts) - len(mine)
    note = (f"<p class=note>{left} verdict(s) name ids that are not edited rows of this "
            "output; they are left out.</p>" if left else "")
    return ("<h2>Review</h2>" + _table(["", ""], rows, "kv", tid="review") + note +
            "<p class=note>The grid is a seeded random sample of the edited rows (all of them "
            "on a small job), so the reviewer's acceptance rate estimates the whole job's; "
            "the interval says how far, for this many verdicts.</p>")


def identity_counts(ok: pd.DataFrame) -> dict[str, int]:
    """How the identity metric ended on the ok rows: 'ok', 'no face in the input', ...,
    and 'not recorded' for rows written before the metric existed."""
    status = ok["identity_status"].fillna("not recorded") if len(ok) else pd.Series([], dtype=str)
    return {str(k): int(v) for k, v in status.value_counts().items()}


def _identity_section(ok: pd.DataFrame) -> str:
    counts = identity_counts(ok)
    measured = pd.to_numeric(ok["identity_distance"], errors="coerce").dropna()
    parts = ["<h2>Identity preservation</h2>",
             "<p class=note>dlib's face descriptor distance between input and result "
             "(<code>dlib_face_recognition_resnet_model_v1</code>); below "
             f"{identity.SAME_PERSON_THRESHOLD} "
             "counts as the same person.</p>"]
    if len(measured):
        same = ok["same_person"].dropna().astype(bool)
        parts.append(f"<p>{len(measured)} edits measured: mean distance {_num(measured.mean())}, "
                     f"same person in {_num(same.mean() * 100, 1, ' %')}; the metric took "
                     f"{_num(_mean(ok['identity_seconds']) * 1000, 0, ' ms')} per image.</p>")
    for status, n in counts.items():
        if status == identity.OK:
            continue
        if status.startswith(identity.NO_FACE):
            why = ("dlib found no face there, so there is no distance to show (its detector "
                   "needs a face of about 80 px or more: tiny 64 px models never have one)")
        elif status.startswith("unavailable"):
            why = "the identity metric could not run in the job's actors"
        elif status == "not recorded":
            why = "these rows were written before the identity metric existed"
        else:
            why = "the metric failed on these rows"
        parts.append(f'<p class="warn"><b>{n} edit(s): {_e(status)}</b>: {_e(why)}.</p>')
    if not counts:
        parts.append("<p>No edited rows yet.</p>")
    return "\n".join(parts)


def _plots_section(ok: pd.DataFrame, outcomes: pd.DataFrame) -> str:
    figures = [("P(target) after the edit, per attribute",
                plots.target_probability_histograms(outcomes)),
               ("Entanglement, per edited attribute",
                plots.entanglement_histograms(outcomes)),
               ("Identity distance", plots.identity_histogram(ok["identity_distance"])),
               ("Preservation against steps (early stopping)",
                plots.preservation_against_steps(ok))]
    parts = ["<h2>Plots</h2>"]
    for title, uri in figures:
        if uri is not None:
            parts.append(f'<figure class=plot><img src="{uri}" alt="{_e(title)}">'
                         f"<figcaption>{_e(title)}</figcaption></figure>")
    missing = [t for t, uri in figures if uri is None]
    if missing:
        parts.append("<p class=note>Not drawn, for want of data: " + _e("; ".join(missing)) +
                     " (entanglement: rows written before it was measured; identity: no "
                     "distance measured; steps: every edit ran the same number of steps).</p>")
    return "\n".join(parts)


def _thumb(src: str | None, alt: str, overlay: str | None = None) -> str:
    if src is None:
        return ""
    if src.startswith("!"):
        return f'<div class="thumb missing" title="{_e(src[1:])}">{_e(alt)}: missing</div>'
    mask = ("" if overlay is None or overlay.startswith("!")
            else f'<img class="mask" src="{_e(overlay)}" alt="mask outline">')
    return (f'<div class="thumb"><img src="{_e(src)}" alt="{_e(alt)}">{mask}'
            f"<span>{_e(alt)}</span></div>")


def _given(value: Any) -> bool:
    """A metrics value that is there: not None, NaN or NA (lists count as given)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return True
    return value is not None and not pd.isna(value)


def _caption(row: dict) -> str:
    lines = [f"<b>{_e(row['id'])}</b>"]
    for a, t, p0, p1 in zip(row["attributes"], row["targets"], row["prob_input"],
                            row["prob_result"]):
        hit = on_target(p1, t)
        lines.append(f"{_e(a)} → {_num(t, 2)}: p {_num(p0, 2)} → {_num(p1, 2)} "
                     f"<span class={'hit' if hit else 'miss'}>{'✓' if hit else '✗'}</span>")
    judge = row.get("judge_on_target")
    if _given(judge):
        lines.append(f"judge: {'on target' if judge else 'NOT on target'} "
                     f"<span class={'hit' if judge else 'miss'}>{'✓' if judge else '✗'}</span>")
    if _given(row.get("entanglement")):
        given = row.get("unintended_flips")
        flips: list = list(given) if given is not None and _given(given) else []
        lines.append(f"entanglement {_num(row['entanglement'])}" +
                     (f", flipped {_e(', '.join(flips))}" if flips else ""))
    status = row.get("identity_status")
    if status == identity.OK:
        same = "same person" if row.get("same_person") else "DIFFERENT person"
        lines.append(f"identity {_num(row['identity_distance'])} ({same})")
    elif isinstance(status, str):
        lines.append(f"identity: {_e(status)}")
    lines.append(f"L1 {_num(row.get('preservation_l1'), 4)}, "
                 f"PSNR out {_num(row.get('outside_psnr'), 1, ' dB')}")
    return "<br>".join(lines)


def _grid_section(shown: pd.DataFrame, thumbs: dict, total: int, grid: int, output: str,
                  verdicts: Mapping[str, str]) -> str:
    if not total:
        return "<h2>Before and after</h2><p>No edited rows yet.</p>"
    how = (f"all {total} edited rows" if len(shown) == total else
           f"{len(shown)} of {total} edited rows, a random sample (seed 0); "
           f"<code>maskface report --grid N</code> shows more")
    cells = []
    for row in shown.to_dict("records"):
        t = thumbs.get(row["id"], {})
        choices = "".join(
            f'<label><input type=radio name="v-{_e(row["id"])}" value="{v}"> {v} '
            f"<kbd>{v[0]}</kbd></label>" for v in VERDICTS)
        cells.append(f'<figure class=edit tabindex=0 data-id="{_e(row["id"])}">'
                     "<div class=pair>"
                     + _thumb(t.get("input"), "input", t.get("mask"))
                     + _thumb(t.get("result"), "result", t.get("mask"))
                     + _thumb(t.get("pasted"), "pasted back")
                     + f"</div><figcaption>{_caption(row)}</figcaption>"
                     f"<div class=verdict>{choices}</div></figure>")
    data = json.dumps({"output": output, "verdicts": dict(verdicts)}).replace("</", "<\\/")
    return ("<h2>Before and after</h2>"
            f'<p>Showing {how}.</p><input type="checkbox" id="masks" checked>'
            '<label for="masks"> show the blend mask outline</label>'
            '<div class=review><b>Review pass:</b> give each edit a verdict: click, or focus an '
            "edit (Tab, or <kbd>j</kbd>/<kbd>k</kbd> for the next and previous) and press "
            "<kbd>a</kbd> accept, <kbd>r</kbd> reject, <kbd>u</kbd> unsure (the next edit "
            "gets the focus). Verdicts stay in this browser while you work; "
            '<button id="save-verdicts" type=button>Save verdicts</button> writes them to a '
            "file for <code>maskface export --reviewed FILE</code> (only accepted rows) and "
            '<code>maskface report --reviewed FILE</code>. <span id="review-count"></span>'
            "<br><span class=note>The sample is seeded and random, so the share you accept "
            "estimates the share of the whole job you would accept.</span></div>"
            f'<div class="grid" id="grid">{"".join(cells)}</div>'
            f'<script type="application/json" id="review-data">{data}</script>'
            f"<script>{REVIEW_JS}</script>")


# The review pass: verdicts in memory and localStorage (keyed by the output), radio
# buttons and keys to set them, a button that saves them as the JSON review.py reads.
REVIEW_JS = """
(function () {
  const data = JSON.parse(document.getElementById('review-data').textContent);
  const key = 'maskface-review:' + data.output;
  let verdicts = Object.assign({}, data.verdicts);
  try { Object.assign(verdicts, JSON.parse(localStorage.getItem(key) || '{}')); } catch (e) {}
  const edits = Array.from(document.querySelectorAll('figure.edit'));
  const letters = {a: 'accept', r: 'reject', u: 'unsure'};
  function show() {
    const counts = {accept: 0, reject: 0, unsure: 0};
    for (const f of edits) {
      const v = verdicts[f.dataset.id];
      f.dataset.verdict = v || '';
      for (const r of f.querySelectorAll('input[type=radio]')) r.checked = (r.value === v);
      if (v) counts[v] += 1;
    }
    document.getElementById('review-count').textContent =
      `${counts.accept + counts.reject + counts.unsure} of ${edits.length} reviewed: ` +
      `${counts.accept} accepted, ${counts.reject} rejected, ${counts.unsure} unsure.`;
  }
  function set(id, v) {
    verdicts[id] = v;
    try { localStorage.setItem(key, JSON.stringify(verdicts)); } catch (e) {}
    show();
  }
  document.addEventListener('change', e => {
    const f = e.target.closest('figure.edit');
    if (f && e.target.type === 'radio') set(f.dataset.id, e.target.value);
  });
  document.addEventListener('keydown', e => {
    const f = document.activeElement && document.activeElement.closest('figure.edit');
    if (!f || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase(), i = edits.indexOf(f);
    if (letters[k]) { set(f.dataset.id, letters[k]); (edits[i + 1] || f).focus(); }
    else if (k === 'j' || k === 'arrowright') (edits[i + 1] || f).focus();
    else if (k === 'k' || k === 'arrowleft') (edits[i - 1] || f).focus();
    else return;
    e.preventDefault();
  });
  document.getElementById('save-verdicts').addEventListener('click', () => {
    const body = JSON.stringify({output: data.output, verdicts: verdicts}, null, 1);
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([body], {type: 'application/json'}));
    a.download = 'review.json';
    document.body.appendChild(a);
    a.click();
    a.remove();
  });
  show();
})();
"""


def _failures_section(errors: pd.DataFrame) -> str:
    if not len(errors):
        return "<h2>Failures</h2><p>None.</p>"
    rows = [[f"<code>{_e(r['id'])}</code>", _e(" ".join(str(r["error"]).split())),
             f"<code>{_e(r['input_uri'])}</code>"]
            for r in errors.head(FAILURES_SHOWN).to_dict("records")]
    more = (f"<p>And {len(errors) - FAILURES_SHOWN} more; failures.csv lists all.</p>"
            if len(errors) > FAILURES_SHOWN else "")
    return (f"<h2>Failures ({len(errors)})</h2>" +
            _table(["id", "reason", "input URI"], rows, tid="failures") + more +
            '<p class=note>Also in <a href="failures.csv">failures.csv</a>; '
            "<code>maskface run --retry-errors</code> recomputes them.</p>")


def _config_section(job: dict | None, ok: pd.DataFrame) -> str:
    if job is None:
        return "<h2>Configuration</h2><p>No job.json under this output.</p>"
    from pipeline.engine.settings import ConfigError, EditConfig
    settings = dict(job.get("settings") or {})
    edit = settings.pop("edit", {}) or {}
    spec = _table(["key", "value"], [[_e(k), f"<code>{_e(json.dumps(v))}</code>"]
                                     for k, v in settings.items()], "kv")
    try:
        config = EditConfig.from_overrides(edit)
    except ConfigError as e:
        return f"<h2>Configuration</h2>{spec}<p class=warn>edit settings: {_e(e)}</p>"
    base = config.base.as_dict()
    rows = [[_e(k), f"<code>{_e(v)}</code>", "yes" if k in edit else ""] for k, v in base.items()]
    groups = []
    for attrs, mode in sorted({(tuple(a), m) for a, m in zip(ok["attributes"], ok["mode"])
                               if isinstance(m, str)}):
        differs = {k: v for k, v in config.resolve(attrs, mode).as_dict().items() if base[k] != v}
        groups.append(f"<li><b>{_e(', '.join(attrs))}</b> ({_e(mode)}): " +
                      (_e(", ".join(f"{k}={v}" for k, v in differs.items())) or "as above") +
                      "</li>")
    derived = (f"<p>Resolved per edit (what the attributes derive):</p><ul>{''.join(groups)}</ul>"
               if groups else "")
    return ("<h2>Configuration</h2><h3>Job spec</h3>" + spec +
            "<h3>Edit settings (resolved)</h3>" +
            _table(["setting", "value", "set by the spec"], rows, "kv") + derived)


# ---- the page --------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
 max-width:1400px}
h1{margin-bottom:0} .sub{color:#666;margin-top:4px} code{font-size:90%}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ddd;padding:4px 8px;
 text-align:left;vertical-align:top;font-size:14px} th{background:#f4f4f4}
table.kv td:first-child{font-weight:600;white-space:nowrap}
.tiny{background:#c0392b;color:#fff;font-size:20px;font-weight:700;padding:14px 18px;
 border-radius:6px;margin:12px 0}
.state{padding:8px 12px;border-radius:6px;font-weight:600}
.state.done{background:#e8f6ec;color:#1e7a3a} .state.partial{background:#fff4d6;color:#8a5a00}
.warn{color:#8a5a00} .note{color:#666;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure.edit{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;width:min-content}
.pair{display:flex;gap:6px} .thumb{position:relative;width:160px}
.thumb img{width:160px;display:block;image-rendering:pixelated}
.thumb img.mask{position:absolute;left:0;top:0}
.thumb span{font-size:11px;color:#666} .thumb.missing{height:160px;background:#eee;font-size:12px}
#masks:not(:checked) ~ .grid img.mask{display:none}
figcaption{font-size:12px;line-height:1.5;margin-top:4px;min-width:320px}
.hit{color:#1e7a3a;font-weight:700} .miss{color:#c0392b;font-weight:700}
figure.plot{display:inline-block;margin:0 16px 16px 0} figure.plot img{max-width:100%}
.review{background:#f4f8ff;border:1px solid #cfe0ff;border-radius:6px;padding:8px 12px;
 margin:10px 0}
.verdict{font-size:12px;margin-top:4px} .verdict label{margin-right:8px}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 3px;font-size:11px}
figure.edit:focus{outline:3px solid #3b7dd8}
figure.edit[data-verdict=accept]{border-color:#1e7a3a;background:#f1fbf4}
figure.edit[data-verdict=reject]{border-color:#c0392b;background:#fdf2f1}
figure.edit[data-verdict=unsure]{border-color:#b7950b;background:#fdfaee}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
