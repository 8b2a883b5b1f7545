"""The job report: an output's files turned into a page a person reads at a glance.

    write_report(output_uri, dest=None)  ->  index.html and thumbs/*.png under dest

It reads only what a job leaves under its output (job.json, summary.json, metrics/,
and the image, mask and pasted files the metrics rows name), on local disk or S3
alike, while the job runs or after it ended; dest defaults to `<output>/report`.
The page opens from disk with no server: thumbnails are files beside it, plots are
embedded, the style and the review pass's script are inlined, the mask overlay
toggles with CSS alone.

Sections: the job (state, counts, time, rate, models by hash, the configuration as
job.json recorded it, a banner for tiny weights), a table per attribute (on target by
the classifier and by the held-out judge, or a warning that there is none),
entanglement, identity preservation, plots, a before/after grid (a seeded sample of at
most `grid` edits on large jobs) with a review pass (a verdict per edit, saved to a
file), the reviewer's figures when a verdicts file is given, the failures, and the
metrics files whose rows are not counted (damaged ones, set aside or not yet, and files
in metrics/ that are not the job's).

Here: the reading, the thumbnails and the rendering. The figures are
pipeline/results/report_data.py's (plain data); the page is the Jinja2 templates under
pipeline/results/templates/ (report.html.j2 and its partials, report.css, report.js),
every value escaped. The counts and rates are `maskface status`'s
(pipeline/results/status.py); the on-target rule is summary.json's
(pipeline/output/ledger.py attribute_outcomes); verdicts are pipeline/results/review.py's.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from PIL import Image, ImageFilter

from pipeline.output.figures import fmt_duration
from pipeline.output.images import png_bytes, read_pil
from pipeline.output.layout import Output
from pipeline.output.ledger import of_manifest
from pipeline.output.metrics import (NETWORK_HASH_COLUMNS, MetricsReader, quarantined,
                                     read_metrics)
from pipeline.results import report_data
from pipeline.results.report_data import ReportData
from pipeline.results.review import VERDICTS, read_verdicts
from pipeline.results.status import (STATUS_COLUMNS, JobFiles, compute_status, manifest_ids,
                                     read_job_files)

log = logging.getLogger(__name__)

GRID = 120               # edits shown in the before/after grid at most (a sample beyond)
THUMB = 160              # thumbnail side, px
TEMPLATES = "templates"  # the page's templates, package data of pipeline.results


# What the report reads of every row (its tables, plots and status), and of the rows it
# shows one by one (the grid's sample and the failures): their files.
NETWORK_COLUMNS = list(NETWORK_HASH_COLUMNS.values())
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
    out = Output(output_uri, storage_options)
    reader = MetricsReader(out, REPORT_COLUMNS)       # it names the files it did not read
    files = read_job_files(output_uri, storage_options, reader=reader)
    ids = job_manifest_ids(files, storage_options)
    site = Output(dest or f"{output_uri.rstrip('/')}/report", storage_options)
    mine = of_manifest(files.metrics, ids)
    status = compute_status(files.metrics, output=output_uri, manifest_ids=ids,
                            total=(files.record or {}).get("rows"), started_at=files.started_at,
                            now=now)
    errors = report_data.failed(mine)
    shown = report_data.grid_sample(report_data.edited(mine), grid)
    paths = read_metrics(out, FILE_COLUMNS,
                         ids=set(shown["id"]) | set(errors["id"])).set_index("id")
    shown, errors = (df.join(paths, on="id") for df in (shown, errors))
    thumbs = _write_thumbnails(site, shown, storage_options)
    if len(errors):
        site.put("failures.csv", errors[["id", "error", "input_uri"]].to_csv(index=False).encode())
    data = report_data.gather(files, status, mine, shown, errors, grid,
                              verdicts if reviewed else None,
                              report_data.files_not_counted(quarantined(out), reader.unread))
    site.put("index.html", render_page(data, thumbs).encode())
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
                      ) -> dict[str, dict[str, dict[str, str | None]]]:
    """Write each shown row's thumbnails; per id and kind, the page's relative `src`, or
    the reason it is `missing`."""
    def one(row):
        made = {}
        for kind, data in _thumbnails_of(row, storage_options).items():
            if isinstance(data, str):
                made[kind] = {"src": None, "missing": data}
            else:
                rel = f"thumbs/{row['id']}.{kind}.png"
                site.put(rel, data)
                made[kind] = {"src": rel, "missing": None}
        return row["id"], made
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, rows.to_dict("records")))


# ---- the page --------------------------------------------------------------------------------
def _num(value: Any, digits: int = 3, unit: str = "") -> str:
    """A figure as the page writes it: `digits` decimals and `unit`; a dash when missing."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "–"
    return ("∞" if math.isinf(v) else f"{v:.{digits}f}") + unit


def _pct(value: Any, digits: int = 1, unit: str = " %") -> str:
    """A fraction as a percentage (a dash when missing)."""
    try:
        return _num(float(value) * 100, digits, unit)
    except (TypeError, ValueError):
        return "–"


def _dash(value: Any) -> Any:
    return "–" if value is None else value


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The templates' environment: every value escaped, undefined names an error."""
    env = Environment(loader=PackageLoader("pipeline.results", TEMPLATES),
                      autoescape=select_autoescape(["html", "j2"], default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    env.filters.update(num=_num, pct=_pct, dash=_dash, duration=fmt_duration)
    return env


def _inlined(name: str) -> Markup:
    """A template folder's file as is (the page's style or script, inlined)."""
    return Markup((resources.files("pipeline.results") / TEMPLATES / name).read_text("utf-8"))


def render_page(data: ReportData, thumbs: Mapping[str, Mapping[str, Any]]) -> str:
    """The page of `data`, its grid's thumbnails per id and kind ({src, missing})."""
    return environment().get_template("report.html.j2").render(
        r=data, thumbs=thumbs, verdict_choices=VERDICTS, css=_inlined("report.css"),
        js=_inlined("report.js"))
