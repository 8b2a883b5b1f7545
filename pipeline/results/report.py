"""The job report: an output's files turned into a page a person reads at a glance.

    write_report(output_uri, dest=None)  ->  <dest>/index.html + <dest>/thumbs/*.png

It reads only what a job leaves under its output (job.json, summary.json, metrics/,
and the image, mask and pasted files the metrics rows name), on local disk or S3
alike, while the job runs or after it ended; dest defaults to `<output>/report`.
The page opens from disk with no server: thumbnails are files beside it, plots are
embedded, the mask overlay toggles with CSS alone.

Sections: the job (state, counts, time, rate, models by hash, the resolved config,
a banner for tiny weights), a table per attribute, identity preservation, plots, a
before/after grid (a sample of at most `grid` edits on large jobs) and the failures.
The counts and rates are `maskface status`'s (pipeline/results/status.py); the on-target
rule is summary.json's (outputs.attribute_outcomes).
"""
from __future__ import annotations

import html
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from pipeline.engine.rows import on_target
from pipeline.job import identity
from pipeline.job.images import png_bytes, read_pil
from pipeline.job.ledger import ERROR, OK, attribute_outcomes, of_manifest, this_runs_summary
from pipeline.job.outputs import Output
from pipeline.job.progress import fmt_duration
from pipeline.job.metrics import read_metrics
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
                   "e4e_sha256", "lpips_trunk_sha256"]
REPORT_COLUMNS = [*STATUS_COLUMNS, "attributes", "targets", "prob_input", "prob_result",
                  "preservation_l1", "outside_psnr", "identity_distance", "same_person",
                  "identity_status", "identity_seconds", "steps", "mode", "tiny_models",
                  *NETWORK_COLUMNS]
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
                 now: float | None = None) -> str:
    """Write the report folder; returns the URI of its index.html. Its tables and plots
    are aggregates over every row; only the grid's sample and the failures are read in
    full, so its time grows with the rows, not with their images."""
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
        _identity_section(ok),
        _plots_section(ok, outcomes),
        _grid_section(shown, thumbs, len(ok), grid),
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
            ["code version", _e((files.job or {}).get("code_version", "–"))]]
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


def _models_table(job: dict | None, mine: pd.DataFrame) -> str:
    spec = ((job or {}).get("settings") or {}).get("models", "–")
    rows = []
    for col in [c for c in mine.columns if c.endswith("_sha256")]:
        for sha, n in mine[col].dropna().value_counts().items():
            rows.append([_e(col.removesuffix("_sha256")), f"<code>{_e(sha)}</code>", str(n)])
    table = (_table(["network", "sha256", "rows"], rows) if rows
             else "<p>No rows yet: the hashes appear with the first results.</p>")
    return f"<h3>Models</h3><p>spec <code>{_e(spec)}</code></p>{table}"


def _attribute_section(ok: pd.DataFrame, outcomes: pd.DataFrame) -> str:
    if not len(outcomes):
        return "<h2>Per attribute</h2><p>No edited rows yet.</p>"
    rows = []
    for attr, g in outcomes.groupby("attribute", sort=True):
        edits = ok[ok["id"].isin(g["id"])]
        rows.append([_e(attr), str(len(g)), _num(g["on_target"].mean() * 100, 1, " %"),
                     _num(g["flipped"].mean() * 100, 1, " %"),
                     _num(_mean(g["p_target_before"])), _num(_mean(g["p_target_after"])),
                     _num(_mean(edits["preservation_l1"]), 4),
                     _num(_mean(edits["outside_psnr"]), 1, " dB"),
                     _num(_mean(edits["identity_distance"]))])
    head = ["attribute", "rows", "on target", "flipped", "mean P(target) before",
            "mean P(target) after", "mean preservation_l1", "mean outside_psnr",
            "mean identity distance"]
    return ("<h2>Per attribute</h2>" + _table(head, rows) +
            "<p class=note>On target: the classifier's probability ends on the target's side "
            "of 0.5; flipped: on target now and not before. P(target): the probability of the "
            "target's side. Preservation and identity are per edit, over the edits that "
            "include the attribute.</p>")


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
                     " (identity: no distance measured; steps: every edit ran the same "
                     "number of steps).</p>")
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


def _caption(row: dict) -> str:
    lines = [f"<b>{_e(row['id'])}</b>"]
    for a, t, p0, p1 in zip(row["attributes"], row["targets"], row["prob_input"],
                            row["prob_result"]):
        hit = on_target(p1, t)
        lines.append(f"{_e(a)} → {_num(t, 2)}: p {_num(p0, 2)} → {_num(p1, 2)} "
                     f"<span class={'hit' if hit else 'miss'}>{'✓' if hit else '✗'}</span>")
    status = row.get("identity_status")
    if status == identity.OK:
        same = "same person" if row.get("same_person") else "DIFFERENT person"
        lines.append(f"identity {_num(row['identity_distance'])} ({same})")
    elif isinstance(status, str):
        lines.append(f"identity: {_e(status)}")
    lines.append(f"L1 {_num(row.get('preservation_l1'), 4)}, "
                 f"PSNR out {_num(row.get('outside_psnr'), 1, ' dB')}")
    return "<br>".join(lines)


def _grid_section(shown: pd.DataFrame, thumbs: dict, total: int, grid: int) -> str:
    if not total:
        return "<h2>Before and after</h2><p>No edited rows yet.</p>"
    how = (f"all {total} edited rows" if len(shown) == total else
           f"{len(shown)} of {total} edited rows, a random sample (seed 0); "
           f"<code>maskface report --grid N</code> shows more")
    cells = []
    for row in shown.to_dict("records"):
        t = thumbs.get(row["id"], {})
        cells.append("<figure class=edit><div class=pair>"
                     + _thumb(t.get("input"), "input", t.get("mask"))
                     + _thumb(t.get("result"), "result", t.get("mask"))
                     + _thumb(t.get("pasted"), "pasted back")
                     + f"</div><figcaption>{_caption(row)}</figcaption></figure>")
    return ("<h2>Before and after</h2>"
            f'<p>Showing {how}.</p><input type="checkbox" id="masks" checked>'
            '<label for="masks"> show the blend mask outline</label>'
            f'<div class="grid" id="grid">{"".join(cells)}</div>')


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
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
