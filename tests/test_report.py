"""The report, the export and summary.json of one small real job: tiny models, a real
local Ray, its inputs and output on a real S3 server (moto on 127.0.0.1). The report
is opened in a real headless Chromium; the exports are loaded with pandas, pyarrow and
Hugging Face `datasets`. The report's figures (pipeline/results/report_data.py) are
also checked without any HTML, on small metrics frames and job.json dicts, and its
page's templates as package data."""
import ast
import importlib.resources
import io
import json
import math
import os
import re
import time
from collections import Counter
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from browser import Chromium, chromium_binary
from helpers import SHORT, drop_metrics_rows, write_photos
from PIL import Image

from jobs.cli import main
from jobs.run import run_command
from manifests.schema import read_manifest, write_manifest
from pipeline.engine.rows import passthrough_columns
from pipeline.engine.settings import EditConfig, settings_sha256
from pipeline.output.jobfile import job_record
from pipeline.output.ledger import attribute_outcomes
from pipeline.output.metrics import passthrough_schema, read_metrics, write_metrics
from pipeline.output.layout import Output
from pipeline.runner.plan import plan_job
from pipeline.runner.spec import JobSpec
from pipeline.runner.stage import EditStage
import pipeline.results.report_data as report_data
from pipeline.results.report import render_page, write_report
from pipeline.results.review import VERDICTS
from pipeline.results.status import JobFiles, compute_status

# the metrics columns models/identity.py fills, which older outputs lack
IDENTITY_COLUMNS = ["identity_distance", "same_person", "identity_status", "identity_seconds"]
# the evidence columns (entanglement, the judge, provenance), which older outputs lack too
EVIDENCE_COLUMNS = ["prob_all_input", "prob_all_result", "entanglement", "unintended_flips",
                    "judge_prob_input", "judge_prob_result", "judge_on_target", "judge_sha256",
                    "settings_sha256", "code_version"]

BUCKET = "reportjob"
OUTPUT = f"s3://{BUCKET}/out"
DEMO_PHOTO = Path(__file__).parent.parent / "jobs" / "demo" / "astronaut-64.png"
QUAD = [20.0, 10.0, 20.0, 60.0, 70.0, 60.0, 70.0, 10.0]


def job_rows() -> pd.DataFrame:
    """Four edits (one with two attributes, one aligned with a photo to paste into) and
    two rows that fail (a file that is no image, a file that is not there)."""
    return pd.DataFrame({
        "id": ["a.smiling-1", "a.black_hair-1", "p0.multi", "a.aligned", "bad.broken",
               "bad.missing"],
        "image_uri": ["in/astronaut.png", "in/astronaut.png", "in/p0.png", "in/astronaut.png",
                      "in/broken.png", "in/not-there.png"],
        "attributes": [["smiling"], ["black_hair"], ["smiling", "wearing_lipstick"],
                       ["smiling"], ["smiling"], ["black_hair"]],
        "targets": [[1.0], [1.0], [1.0, 0.0], [0.0], [1.0], [1.0]],
        "attr_smiling": np.array([0, 0, 1, 1, 0, 1], dtype=np.int8),
        "attr_black_hair": np.array([0, 0, 1, 0, 1, 0], dtype=np.int8),
        "source_uri": [None, None, None, f"s3://{BUCKET}/in/photo.png", None, None],
        "align_quad": [None, None, None, QUAD, None, None],
    })


def run(spec):
    return run_command(Namespace(spec=spec, set=[], address=None, retry_errors=False,
                                 no_report=False))


def earlier_run(rows: pd.DataFrame, spec: dict) -> None:
    """Rows done by an earlier run: EditStage called directly, as a Ray actor calls it.
    (The aligned row goes this way: Ray Data 2.60 turns a block's align_quad lists into
    a tensor column, which fails on nulls and reaches the stage as TensorArrayElement.)"""
    job = JobSpec(manifest=spec["manifest"], output=spec["output"], models=spec["models"],
                  edit=spec["edit"], storage_options=spec["storage_options"], paste_back=True)
    schema = passthrough_schema(pa.Schema.from_pandas(rows, preserve_index=False),
                                passthrough_columns(rows.columns))
    stage = EditStage(job, plan_job(rows, job, schema))
    assert (stage(rows)["status"] == "ok").all()


@pytest.fixture(scope="module")
def job(s3_server, tiny_dir, tmp_path_factory):
    """The job: one aligned row done by an earlier run, then `maskface run` (a real local
    Ray) over the whole manifest, which skips it."""
    import ray
    fs, local = s3_server["fs"], tmp_path_factory.mktemp("report-job")
    opts = {"client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    fs.mkdir(BUCKET)
    photos = write_photos(local, 1)
    Image.fromarray((np.random.default_rng(1).random((80, 100, 3)) * 255).astype("uint8")).save(
        local / "photo.png")
    for src, name in [(DEMO_PHOTO, "astronaut.png"), (photos / "p0.png", "p0.png"),
                      (photos / "broken.png", "broken.png"), (local / "photo.png", "photo.png")]:
        fs.put_file(str(src), f"{BUCKET}/in/{name}")
    write_manifest(job_rows(), f"s3://{BUCKET}/manifest.parquet",
                   {**opts, "key": "testing", "secret": "testing"})
    spec = {"manifest": f"s3://{BUCKET}/manifest.parquet", "output": OUTPUT,
            "models": str(tiny_dir / "models.yaml"), "edit": SHORT, "batch_size": 3,
            "actors": 1, "paste_back": True, "storage_options": opts}
    (local / "job.yaml").write_text(yaml.safe_dump(spec))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rows = read_manifest(spec["manifest"], opts).rows
        earlier_run(rows[rows["id"] == "a.aligned"].reset_index(drop=True), spec)
        code = run(str(local / "job.yaml"))
        metrics = read_metrics(Output(OUTPUT, opts)).set_index("id")
        yield {"code": code, "fs": fs, "opts": opts, "spec": local / "job.yaml",
               "metrics": metrics}
    finally:
        ray.shutdown()


def read_json(fs, path):
    return json.loads(fs.cat(path))


# ---- the job and summary.json ---------------------------------------------------------------
def test_the_job_ran_and_summary_counts_are_json_integers(job):
    assert job["code"] == 1                                      # two rows failed
    m = job["metrics"]
    assert sorted(m.index[m["status"] == "ok"]) == ["a.aligned", "a.black_hair-1",
                                                    "a.smiling-1", "p0.multi"]
    assert m.loc["a.aligned", "pasted_uri"].endswith("pasted/a.aligned.png")
    # dlib finds no face in a 64 px image: every edit says so instead of a number
    assert (m.loc[m["status"] == "ok", "identity_status"] == "no face in the input").all()
    assert m["identity_distance"].isna().all()

    summary = read_json(job["fs"], f"{BUCKET}/out/summary.json")
    counts = [*summary["this_run"].values(), *summary["manifest"].values(),
              *summary["whole_output"].values()]
    for s in summary["per_attribute"].values():
        counts += [s["rows"], s["on_target"], s["flipped"]]
        assert isinstance(s["on_target_rate"], float) and isinstance(s["flipped_rate"], float)
    ints = [v for v in counts if not isinstance(v, float)]
    assert ints and all(type(v) is int for v in ints), counts   # not str, not bool
    assert summary["manifest"] == {"rows": 6, "ok": 4, "error": 2, "pending": 0}
    assert summary["this_run"]["skipped_already_done"] == 1 and summary["this_run"]["ok"] == 3
    assert {a: s["rows"] for a, s in summary["per_attribute"].items()} == {
        "smiling": 3, "black_hair": 1, "wearing_lipstick": 1}
    smiling = m.loc[["a.smiling-1", "p0.multi", "a.aligned"]]
    hits = [(p[0] >= 0.5) == (t[0] >= 0.5) for p, t in zip(smiling["prob_result"],
                                                            smiling["targets"])]
    assert summary["per_attribute"]["smiling"]["on_target"] == sum(hits)
    # the tiny judge measured every edit, beside the classifier
    judged = [(p[0] >= 0.5) == (t[0] >= 0.5) for p, t in zip(smiling["judge_prob_result"],
                                                              smiling["targets"])]
    assert summary["per_attribute"]["smiling"]["judge_rows"] == 3
    assert summary["per_attribute"]["smiling"]["judge_on_target"] == sum(judged)
    # where each actor's time went: the engine's share, in summary.json and on the page
    actors = summary["per_actor"]
    assert actors and sum(a["rows"] for a in actors) == 6
    assert all(0 < a["engine_busy"] < 1 for a in actors), actors
    page = job["fs"].cat_file(f"{BUCKET}/out/report/index.html").decode()
    assert 'id="actor-time"' in page and "engine busy" in page


def test_every_edit_carries_its_evidence_and_provenance(job):
    """Entanglement, the judge and provenance, for every ok row of a tiny-weights job
    whose models spec names a tiny judge (`maskface weights make-tiny` writes one)."""
    m = job["metrics"]
    ok = m[m["status"] == "ok"]
    for rid, row in ok.iterrows():
        assert len(row["prob_all_input"]) == len(row["prob_all_result"]) == 40, rid
        assert 0 <= row["entanglement"] <= 1 and row["unintended_flips"] is not None
        assert len(row["judge_prob_result"]) == len(row["attributes"])
        assert row["judge_on_target"] in (True, False)
        assert len(row["settings_sha256"]) == 64 and row["code_version"]
        assert row["judge_sha256"] == ok["judge_sha256"].iloc[0] != row["classifier_sha256"]
    config = EditConfig.from_overrides(SHORT)              # the job's edit settings, resolved
    for rid, row in ok.iterrows():
        assert row["settings_sha256"] == settings_sha256(config.resolve(row["attributes"])), rid
    assert m.loc[m["status"] == "error", "settings_sha256"].isna().all()


# ---- the report ----------------------------------------------------------------------------
def test_maskface_run_writes_the_report_next_to_the_output_on_s3(job):
    fs, m = job["fs"], job["metrics"]
    page = fs.cat(f"{BUCKET}/out/report/index.html").decode()
    sources = re.findall(r'src="([^"]+)"', page)
    files = [s for s in sources if not s.startswith("data:")]
    assert len(files) >= 4 * 3 + 1                               # input, result, mask; pasted
    for rel in files:
        assert fs.exists(f"{BUCKET}/out/report/{rel}"), rel      # relative, beside the page
    assert "TINY RANDOM WEIGHTS" in page and "Complete: all 6 rows" in page
    assert "Failures (2)" in page and "4 edit(s): no face in the input" in page
    assert m["generator_sha256"].iloc[0] in page                 # models by hash
    assert m["judge_sha256"].dropna().iloc[0] in page and "on target (judge)" in page
    assert 'id="upper-bound"' not in page                        # a judge ran: no warning
    assert 'id="entanglement"' in page and "Entanglement, per edited attribute" in page
    assert page.count('name="v-') == 4 * 3 and "Save verdicts" in page   # the review pass
    assert "steps.latent" in page and "paste_back" in page       # the resolved config
    assert "testing" not in page                                 # no credentials


def test_the_report_shows_the_settings_job_json_recorded_for_each_edit(job):
    """The configuration is job.json's as the run recorded it: the edit base (what the
    spec set, marked) and one entry per distinct edit the rows ran."""
    config = report_data.configuration(read_json(job["fs"], f"{BUCKET}/out/job.json"))
    assert config is not None and config["recorded"]
    base = {s["setting"]: s for s in config["base"]}
    for key, value in SHORT.items():
        assert base[key]["value"] == value and base[key]["by_spec"], key
    assert not any(s["by_spec"] for k, s in base.items() if k not in SHORT)
    ok = job["metrics"][job["metrics"]["status"] == "ok"]
    assert sorted(e["attributes"] for e in config["edits"]) == sorted(
        {tuple(a): list(a) for a in ok["attributes"]}.values())
    page = job["fs"].cat(f"{BUCKET}/out/report/index.html").decode()
    assert "Edit settings (resolved)" in page and "predates recorded settings" not in page


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install "
                    "chromium); the browser check needs it")
    browser = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.close()


def test_the_report_opens_from_disk_in_a_browser(job, chromium, tmp_path):
    dest = tmp_path / "report"
    assert main(["report", OUTPUT, "--dest", str(dest),
                 "--storage-options", json.dumps(job["opts"])]) == 0
    chromium.open((dest / "index.html").resolve().as_uri())
    images = chromium.evaluate("Array.from(document.images).map(i => [i.getAttribute('src')"
                               ".slice(0, 60), i.naturalWidth])")
    assert len(images) >= 4 * 3 + 1 + 1                          # thumbnails, pasted, a plot
    assert [src for src, width in images if width == 0] == []    # every image loaded
    assert chromium.evaluate("document.querySelectorAll('img[alt=\"pasted back\"]').length") == 1
    errors = int((job["metrics"]["status"] == "error").sum())
    assert chromium.evaluate("document.querySelectorAll('#failures tbody tr').length") == errors
    shown = "getComputedStyle(document.querySelector('img.mask')).display"
    assert chromium.evaluate(shown) != "none"
    chromium.evaluate("document.getElementById('masks').click()")   # the toggle hides them
    assert chromium.evaluate(shown) == "none"
    shot = chromium.screenshot()
    (tmp_path / "report.png").write_bytes(shot)
    assert Image.open(io.BytesIO(shot)).size[0] == 1200


def press(chromium, key: str) -> None:
    for kind in ("keyDown", "keyUp"):
        chromium.page("Input.dispatchKeyEvent", {"type": kind, "key": key, "text": key})


def test_a_review_pass_marks_edits_saves_them_and_export_keeps_the_accepted(
        job, chromium, tmp_path):
    """In a real browser: accept the first edit and reject the second by keyboard, save,
    then `maskface export --reviewed` keeps only the accepted one and `maskface report
    --reviewed` shows the reviewer's rate."""
    dest, downloads = tmp_path / "report", tmp_path / "downloads"
    downloads.mkdir()
    assert main(["report", OUTPUT, "--dest", str(dest),
                 "--storage-options", json.dumps(job["opts"])]) == 0
    chromium.open((dest / "index.html").resolve().as_uri())
    chromium.evaluate(f"localStorage.removeItem('maskface-review:{OUTPUT}')")
    chromium.open((dest / "index.html").resolve().as_uri())
    ids = chromium.evaluate("Array.from(document.querySelectorAll('figure.edit'))"
                            ".map(f => f.dataset.id)")
    chromium.evaluate("document.querySelector('figure.edit').focus()")
    press(chromium, "a")                                 # accept; the next edit gets the focus
    assert chromium.evaluate("document.activeElement.dataset.id") == ids[1]
    press(chromium, "r")
    assert chromium.evaluate("document.getElementById('review-count').textContent") \
        .startswith(f"2 of {len(ids)} reviewed: 1 accepted, 1 rejected")
    checked = "document.querySelector('figure.edit input[value=accept]').checked"
    assert chromium.evaluate(checked) is True
    chromium.open((dest / "index.html").resolve().as_uri())           # kept while working
    assert chromium.evaluate(checked) is True
    chromium.send("Browser.setDownloadBehavior", {"behavior": "allow",
                                                  "downloadPath": str(downloads)})
    chromium.evaluate("document.getElementById('save-verdicts').click()")
    saved = downloads / "review.json"
    deadline = time.time() + 30
    while not saved.is_file() and time.time() < deadline:
        time.sleep(0.1)
    verdicts = json.loads(saved.read_text())
    assert verdicts == {"output": OUTPUT, "verdicts": {ids[0]: "accept", ids[1]: "reject"}}

    assert export(job, "hf-parquet", tmp_path / "reviewed", "--reviewed", str(saved)) == 0
    assert list(pd.read_parquet(tmp_path / "reviewed" / "data")["id"]) == [ids[0]]
    assert main(["report", OUTPUT, "--dest", str(tmp_path / "again"), "--reviewed", str(saved),
                 "--storage-options", json.dumps(job["opts"])]) == 0
    page = (tmp_path / "again" / "index.html").read_text()
    review = page[page.index('id="review"'):]
    assert "2 edits: 1 accepted, 1 rejected, 0 unsure" in review
    assert "50.0 % of 2 decided" in review


def test_a_partial_output_with_old_metrics_reports_exports_and_resumes(job, tmp_path):
    """A copy of the output with two rows' metrics gone (the job was killed before their
    batches finished) and the others written before the identity and evidence columns
    existed."""
    out = tmp_path / "out"
    job["fs"].get(f"{BUCKET}/out/", str(out) + "/", recursive=True)
    gone_ids = {"a.smiling-1", "bad.missing"}
    drop_metrics_rows(Output(str(out)), gone_ids)
    for f in sorted((out / "metrics").glob("*.parquet")):
        t = pq.read_table(f)
        pq.write_table(t.drop_columns(IDENTITY_COLUMNS + EVIDENCE_COLUMNS), f)
    before = read_metrics(Output(str(out))).set_index("id")["written_at"]

    opts = job["opts"]                          # the images the rows name are still on S3
    page = Path(write_report(str(out), storage_options=opts, now=time.time() + 3600)).read_text()
    assert f"PARTIAL REPORT: {6 - len(gone_ids)} of 6 rows done" in page
    assert "the job is not running" in page
    ok_left = int((job["metrics"].drop(index=list(gone_ids))["status"] == "ok").sum())
    assert f"{ok_left} edit(s): not recorded" in page
    assert 'id="upper-bound"' in page                             # no judge's figures: said
    assert "No edit with entanglement figures yet" in page
    assert export(job, "hf-parquet", tmp_path / "x", output=str(out)) == 0
    exported = pd.read_parquet(tmp_path / "x" / "data")
    assert len(exported) == 6 - len(gone_ids) and exported["identity_status"].isna().all()
    assert exported["judge_on_target"].isna().all() and exported["entanglement"].isna().all()

    spec = yaml.safe_load(job["spec"].read_text())
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**spec, "output": str(out)}))
    assert run(str(tmp_path / "job.yaml")) == 1                 # the two failed rows stay
    after = read_metrics(Output(str(out))).set_index("id")
    assert sorted(after.index) == sorted(job["metrics"].index)
    assert all(after.loc[rid, "written_at"] == at for rid, at in before.items())   # not redone
    redone = after.loc[sorted(gone_ids)]
    assert (redone.loc[redone["status"] == "ok", "identity_status"] == "no face in the input").all()
    assert "Complete: all 6 rows" in (out / "report" / "index.html").read_text()


# ---- the export ------------------------------------------------------------------------------
def expected_labels(row) -> dict | None:
    """labels_after by the documented rule, written out independently."""
    if row["status"] != "ok":
        return None
    labels = {"smiling": int(row["attr_smiling"]), "black_hair": int(row["attr_black_hair"]),
              "wearing_lipstick": None}
    for a, t, p in zip(row["attributes"], row["targets"], row["prob_result"]):
        labels[a] = int(t >= 0.5) if (p >= 0.5) == (t >= 0.5) else None
    return labels


def export(job, fmt, dest, *flags, output=OUTPUT) -> int:
    """`maskface export`, its exit code."""
    return main(["export", output, "--format", fmt, "--dest", str(dest), *flags,
                 "--storage-options", json.dumps(job["opts"])])


def edited_pixels(fs, row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fs.cat(row["edited_uri"]))).convert("RGB"))


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory):
    """The real `datasets`, offline, with its own HF_HOME."""
    home = tmp_path_factory.mktemp("hf-home")
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    datasets = pytest.importorskip("datasets")
    yield datasets, str(home / "cache")
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_hf_parquet_export_loads_in_pandas_pyarrow_and_datasets(job, hf_datasets, tmp_path):
    datasets, cache = hf_datasets
    fs, m = job["fs"], job["metrics"]
    dest = tmp_path / "hf"
    assert export(job, "hf-parquet", dest) == 0
    files = sorted((dest / "data").glob("train-*.parquet"))
    schema = pq.read_schema(files[0])
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["image"] == {
        "_type": "Image"}
    df = pd.read_parquet(dest / "data").set_index("id")
    assert sorted(df.index) == sorted(m.index)                  # every row, failed ones too
    for rid, row in m.iterrows():
        labels = df.loc[rid, "labels_after"]
        assert labels == expected_labels(row), rid
        if row["status"] == "ok":
            image = Image.open(io.BytesIO(df.loc[rid, "image"]["bytes"]))
            assert (np.asarray(image.convert("RGB")) == edited_pixels(fs, row)).all()
        else:
            assert df.loc[rid, "image"] is None
    assert list(df.loc["p0.multi", "prob_result"]) == list(m.loc["p0.multi", "prob_result"])

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                               cache_dir=cache)
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == len(m)
    for item in ds:
        row = m.loc[item["id"]]
        assert item["labels_after"] == expected_labels(row)
        if row["status"] == "ok":
            assert (np.asarray(item["image"].convert("RGB")) == edited_pixels(fs, row)).all()

    only = tmp_path / "hf-ok"
    assert export(job, "hf-parquet", only, "--only-successful") == 0
    kept = pd.read_parquet(only / "data")
    assert kept["reached_target"].all() and (kept["status"] == "ok").all()
    reached = [rid for rid, row in m.iterrows() if row["status"] == "ok"
               and all(expected_labels(row)[a] is not None for a in row["attributes"])]
    assert sorted(kept["id"]) == sorted(reached)


def test_imagefolder_export_loads_in_datasets(job, hf_datasets, tmp_path):
    datasets, cache = hf_datasets
    fs, m = job["fs"], job["metrics"]
    dest = tmp_path / "folder"
    assert export(job, "imagefolder", dest) == 0
    lines = [json.loads(x) for x in (dest / "train" / "metadata.jsonl").read_text().splitlines()]
    ok = m[m["status"] == "ok"]
    assert sorted(r["id"] for r in lines) == sorted(ok.index)    # only rows with an image
    for r in lines:
        assert (dest / "train" / r["file_name"]).is_file()
    ds = datasets.load_dataset("imagefolder", data_dir=str(dest), split="train", cache_dir=cache)
    assert len(ds) == len(ok)
    for item in ds:
        row = m.loc[item["id"]]
        assert item["labels_after"] == expected_labels(row)
        assert (np.asarray(item["image"].convert("RGB")) == edited_pixels(fs, row)).all()
        assert item["attr_smiling"] == row["attr_smiling"]


def test_export_refuses_a_passthrough_column_it_would_overwrite(tmp_path, capsys):
    schema = passthrough_schema(None, ["image"])
    row = pd.DataFrame({name: [None] for name in schema.names}).assign(
        id="x", status="error", error="unreadable", image="the manifest's own", written_at=1.0)
    write_metrics(Output(str(tmp_path / "out")), row, schema)
    assert main(["export", str(tmp_path / "out"), "--format", "hf-parquet",
                 "--dest", str(tmp_path / "x")]) == 1
    assert "column(s) ['image']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- the report's figures, without HTML (pipeline/results/report_data.py) --------------------
def small_metrics() -> pd.DataFrame:
    """Three edits and a failure: one fully measured, one without an identity distance
    (no face), one from before the evidence and identity columns existed."""
    return pd.DataFrame({
        "id": ["r1", "r2", "r3", "e1"],
        "status": ["ok", "ok", "ok", "error"],
        "error": [None, None, None, "boom:\n   a bad  file"],
        "node": ["n"] * 4, "actor": ["a"] * 4, "written_at": [1.0, 2.0, 3.0, 4.0],
        "attributes": [["smiling"], ["smiling", "bangs"], ["bangs"], ["smiling"]],
        "targets": [[1.0], [1.0, 0.0], [1.0], [1.0]],
        "prob_input": [[0.2], [0.6, 0.9], [0.1], None],
        "prob_result": [[0.8], [0.4, 0.1], [0.9], None],
        "judge_prob_result": [[0.7], [0.6, 0.8], None, None],
        "entanglement": [0.1, 0.3, None, None],
        "unintended_flips": [["male"], [], None, None],
        "preservation_l1": [0.01, 0.03, 0.02, None],
        "outside_psnr": [30.0, 20.0, 25.0, None],
        "identity_distance": [0.3, None, None, None],
        "same_person": [True, None, None, None],
        "identity_status": ["ok", "no face in the input", None, None],
        "identity_seconds": [0.02, 0.01, None, None],
        "settings_sha256": ["s1", "s2", None, None], "code_version": ["v1", "v1", None, None],
        "steps": [3, 3, 3, None], "mode": ["local", "local", "local", None],
        "tiny_models": [False, False, False, None],
        "generator_sha256": ["g"] * 3 + [None], "input_uri": ["in/r1.png", "in/r2.png",
                                                              "in/r3.png", "in/<e1>.png"],
    })


def per_edit_outcomes(rows: pd.DataFrame) -> dict[str, list[dict]]:
    """Per attribute, each edit's figures, by the rule written out independently: on the
    target's side of 0.5 (the judge's when it has one)."""
    out: dict[str, list[dict]] = {}
    for _, row in rows[rows["status"] == "ok"].iterrows():
        judge = row["judge_prob_result"] or [None] * len(row["attributes"])
        for a, t, p0, p1, j in zip(row["attributes"], row["targets"], row["prob_input"],
                                   row["prob_result"], judge):
            side = t >= 0.5
            out.setdefault(a, []).append({
                "hit": (p1 >= 0.5) == side, "before": (p0 >= 0.5) == side,
                "judge": None if j is None else (j >= 0.5) == side,
                "p_after": p1 if side else 1 - p1, "l1": row["preservation_l1"],
                "entanglement": row["entanglement"]})
    return out


def close(a, b) -> bool:
    return (a is None and b is None) or math.isclose(a, b) or (math.isnan(a) and math.isnan(b))


def test_report_data_attribute_rows_match_the_on_target_rule(tmp_path):
    rows = small_metrics()
    ok = report_data.edited(rows)
    outcomes = attribute_outcomes(rows)
    got = {r["attribute"]: r for r in report_data.attribute_rows(ok, outcomes)}
    expected = per_edit_outcomes(rows)
    assert sorted(got) == sorted(expected)
    for attr, edits in expected.items():
        row, n = got[attr], len(edits)
        assert row["rows"] == n
        assert close(row["on_target"], sum(e["hit"] for e in edits) / n)
        assert close(row["flipped"], sum(e["hit"] and not e["before"] for e in edits) / n)
        judged = [e["judge"] for e in edits if e["judge"] is not None]
        assert close(row["judge_on_target"], sum(judged) / len(judged) if judged else None)
        assert close(row["p_target_after"], float(np.mean([e["p_after"] for e in edits])))
        assert close(row["preservation_l1"], float(np.mean([e["l1"] for e in edits])))
        measured = [e["entanglement"] for e in edits if pd.notna(e["entanglement"])]
        assert close(row["entanglement"], float(np.mean(measured)) if measured else math.nan)
    assert report_data.judged(outcomes)
    assert not report_data.judged(attribute_outcomes(
        rows.assign(judge_prob_result=[None] * len(rows))))


def test_report_data_entanglement_counts_the_flips_of_measured_edits_only():
    rows = small_metrics()
    got = {r["attribute"]: r for r in
           report_data.entanglement_rows(attribute_outcomes(rows))}
    ok = rows[(rows["status"] == "ok") & rows["entanglement"].notna()]
    for attr in {a for attrs in rows["attributes"] for a in attrs}:
        edits = ok[[attr in a for a in ok["attributes"]]]
        if not len(edits):
            assert attr not in got
            continue
        flips = Counter(f for fl in edits["unintended_flips"] for f in fl)
        assert got[attr]["edits"] == len(edits)
        assert close(got[attr]["max"], float(edits["entanglement"].max()))
        assert close(got[attr]["with_flip"],
                     sum(len(f) > 0 for f in edits["unintended_flips"]) / len(edits))
        assert dict(map(tuple, got[attr]["most_flipped"])) == dict(flips)


def test_report_data_identity_counts_every_status_and_measures_the_rest():
    rows = small_metrics()
    ok = report_data.edited(rows)
    expected = Counter("not recorded" if pd.isna(s) else s for s in ok["identity_status"])
    assert report_data.identity_counts(ok) == dict(expected)
    figures = report_data.identity_figures(ok)
    distances = ok["identity_distance"].dropna()
    assert figures["measured"] == len(distances)
    assert close(figures["mean_distance"], float(distances.mean()))
    others = {o["status"]: o for o in figures["other"]}
    assert set(others) == set(expected) - {"ok"}
    assert {o["status"]: o["edits"] for o in others.values()} == {
        s: n for s, n in expected.items() if s != "ok"}
    assert others["not recorded"]["reason"] == "not_recorded"
    assert others["no face in the input"]["reason"] == "no_face"
    assert report_data.identity_counts(ok.iloc[:0]) == {}


def spec_and_edits() -> tuple[dict, dict, list[dict]]:
    """A job spec, the edit base its overrides make, and two edits' resolved settings."""
    spec = {"manifest": "m.parquet", "output": "out", "models": "weights/models.yaml",
            "edit": {"steps.latent": 7}, "batch_size": 4, "paste_back": True}
    base = {"steps.latent": 7, "steps.noise": 10, "loss.weights.seg": 0.5, "mode": "auto"}
    edits = [{"attributes": ["smiling"], "mode": "local",
              "settings": {**base, "loss.weights.seg": 0.0, "mode": "local"}},
             {"attributes": ["black_hair"], "mode": "local", "settings": dict(base)}]
    return spec, base, edits


def test_report_data_configuration_of_a_job_json_with_recorded_settings():
    spec, base, edits = spec_and_edits()
    config = report_data.configuration(job_record(spec, base, edits, code_version="v"))
    assert config is not None and config["recorded"]
    assert dict(config["spec"]) == {k: json.dumps(v) for k, v in spec.items() if k != "edit"}
    assert [(s["setting"], s["value"], s["by_spec"]) for s in config["base"]] == [
        (k, v, k in spec["edit"]) for k, v in base.items()]
    by_edit = {tuple(e["attributes"]): dict(e["differs"]) for e in config["edits"]}
    for edit in edits:
        assert by_edit[tuple(edit["attributes"])] == {
            k: v for k, v in edit["settings"].items() if base[k] != v}
    assert report_data.models_table({"spec": spec}, small_metrics())["spec"] == spec["models"]


def test_report_data_configuration_of_an_older_job_json_has_the_overrides_only():
    spec, _, _ = spec_and_edits()
    config = report_data.configuration({"settings": spec, "code_version": "v"})
    assert config is not None and not config["recorded"]
    assert config["base"] == [] and config["edits"] == []
    assert dict(config["overrides"]) == spec["edit"]
    assert [k for k, _ in config["spec"]] == [k for k in spec if k != "edit"]
    assert report_data.models_table({"settings": spec}, small_metrics())["spec"] == spec["models"]
    assert report_data.configuration(None) is None


def test_report_data_models_table_lists_the_networks_hashes_not_the_settings_hash():
    metrics = pd.DataFrame({"generator_sha256": ["g1", "g1", "g2"], "judge_sha256": [None] * 3,
                            "settings_sha256": ["s1", "s2", "s3"]})
    rows = report_data.models_table(None, metrics)["rows"]
    assert sorted((r["network"], r["sha256"], r["rows"]) for r in rows) == [
        ("generator", "g1", 2), ("generator", "g2", 1)]


def test_report_data_grid_sample_failures_and_provenance():
    rows = small_metrics()
    ok = report_data.edited(rows)
    sample = report_data.grid_sample(ok, 2)
    assert len(sample) == 2 and set(sample["id"]) <= set(ok["id"])
    assert list(sample["id"]) == list(report_data.grid_sample(ok, 2)["id"])    # seeded
    assert [a[0] for a in sample["attributes"]] == sorted(a[0] for a in sample["attributes"])
    assert sorted(report_data.grid_sample(ok, 10)["id"]) == sorted(ok["id"])
    captions = {c["id"]: c for c in report_data.grid_figures(ok, len(ok), 10)["edits"]}
    for _, row in ok.iterrows():
        hits = [(p >= 0.5) == (t >= 0.5) for p, t in zip(row["prob_result"], row["targets"])]
        assert [a["hit"] for a in captions[row["id"]]["attributes"]] == hits
    assert captions["r3"]["judge"] is None and captions["r3"]["entanglement"] is None
    errors = report_data.failed(rows)
    failures = report_data.failure_rows(errors, shown=0)
    assert failures["total"] == failures["more"] == len(errors) and failures["rows"] == []
    reasons = [r["reason"] for r in report_data.failure_rows(errors)["rows"]]
    assert reasons == [" ".join(e.split()) for e in errors["error"]]
    made = {p["column"]: p for p in report_data.provenance(rows)}
    for column in ("settings_sha256", "code_version"):
        assert made[column]["count"] == ok[column].dropna().nunique()
        assert made[column]["missing"] == int(ok[column].isna().sum())


def test_report_data_review_figures_compare_the_reviewer_with_the_classifier():
    rows = small_metrics()
    ok, outcomes = report_data.edited(rows), attribute_outcomes(rows)
    verdicts = {"r1": "accept", "r2": "reject", "r3": "unsure", "gone": "accept"}
    figures = report_data.review_figures(verdicts, ok, outcomes)
    mine = {k: v for k, v in verdicts.items() if k in set(ok["id"])}
    decided = [k for k, v in mine.items() if v in ("accept", "reject")]
    assert figures["verdicts"] == len(mine) and figures["left_out"] == len(verdicts) - len(mine)
    assert figures["decided"] == len(decided)
    assert close(figures["rate"], sum(mine[k] == "accept" for k in decided) / len(decided))
    expected = per_edit_outcomes(rows[rows["id"].isin(decided)])
    all_hit = {rid: all(hit) for rid, hit in [
        (r["id"], [(p >= 0.5) == (t >= 0.5) for p, t in zip(r["prob_result"], r["targets"])])
        for _, r in rows[rows["id"].isin(decided)].iterrows()]}
    assert expected and close(figures["classifier"], sum(all_hit.values()) / len(all_hit))
    assert figures["low"] <= figures["rate"] <= figures["high"]


# ---- the page: templates as package data, every value escaped --------------------------------
def test_the_templates_ship_as_package_data():
    templates = importlib.resources.files("pipeline.results") / "templates"
    for name in ("report.html.j2", "report.js", "report.css"):
        assert (templates / name).is_file(), name
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'pipeline = ["results/templates/*"]' in pyproject


MARKUP = ("<script", "<style", "<div", "<table", "</")


def test_no_html_css_or_javascript_in_the_results_rooms_python_strings():
    room = Path(__file__).parent.parent / "pipeline" / "results"
    found = []
    for path in sorted(room.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [(path.name, node.lineno, m) for m in MARKUP
                          if m in node.value.lower()]
    assert len(list(room.rglob("*.py"))) >= 6 and found == []


def small_report(job: dict | None, grid: int = 10, verdicts: dict | None = None) -> str:
    """The page of small_metrics() and `job` (a job.json), with no thumbnails."""
    rows = small_metrics()
    status = compute_status(rows, output="out", total=len(rows) + 1, now=100.0)
    files = JobFiles("out", job, None, rows)
    shown = report_data.grid_sample(report_data.edited(rows), grid)
    data = report_data.gather(files, status, rows, shown, report_data.failed(rows), grid,
                              verdicts)
    return render_page(data, {})


def test_the_page_escapes_every_value_and_says_what_an_older_output_lacks():
    spec, base, edits = spec_and_edits()
    hostile = "<img src=x onerror=alert(1)>"
    spec = {**spec, "models": hostile, "edit": {"steps.latent": hostile}}
    page = small_report({"settings": spec, "code_version": hostile})
    assert hostile not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "in/&lt;e1&gt;.png" in page and "in/<e1>.png" not in page
    assert "predates recorded settings" in page and "Edit settings (resolved)" not in page
    assert f"PARTIAL REPORT: {len(small_metrics())} of {len(small_metrics()) + 1}" in page
    assert "Failures (1)" in page and 'id="review"' not in page
    recorded = small_report(job_record(spec_and_edits()[0], base, edits), grid=1,
                            verdicts={"r1": "accept"})
    assert "Edit settings (resolved)" in recorded and "predates" not in recorded
    assert "loss.weights.seg=0.0" in recorded and 'id="review"' in recorded
    assert recorded.count('name="v-') == len(VERDICTS)   # a grid of one
    data = json.loads(re.search(r'id="review-data">(.*?)</script>', recorded).group(1))
    assert data == {"output": "out", "verdicts": {"r1": "accept"}}


# ---- metrics files not counted, and inputs read from anywhere ------------------------------
def test_report_data_says_a_job_opted_out_of_the_input_rule():
    spec, base, edits = spec_and_edits()
    anywhere = job_record({**spec, "inputs": {"allow": ["any"], "max_bytes": 1}}, base, edits)
    listed = job_record({**spec, "inputs": {"allow": ["/data/"]}}, base, edits)
    default = job_record({**spec, "inputs": {"allow": None}}, base, edits)
    assert report_data.inputs_from_anywhere(anywhere)
    assert not any(report_data.inputs_from_anywhere(j) for j in (listed, default, None))
    said = "opted out of the input rule"
    assert said in small_report(anywhere) and "read inputs from anywhere" in small_report(anywhere)
    assert said not in small_report(listed) and said not in small_report(default)
    older = {**default, "reads_outside_manifest_folder": {"rows": 2, "folder": "/m"}}
    assert "2 row(s) read inputs outside the manifest's folder" in small_report(older)


def test_the_report_names_quarantined_damaged_and_foreign_metrics_files(tmp_path):
    """A real output: one metrics file cut and set aside by a compaction, a second cut
    since (not set aside yet), and two files that are not the job's. The report counts
    none of their rows and shows each file with its size and reason."""
    from pipeline.output.metrics import METRICS_SCHEMA, compact, quarantined
    out = Output(str(tmp_path / "out"))
    rows = small_metrics()
    for name in METRICS_SCHEMA.names:
        if name not in rows.columns:
            rows[name] = None
    out.put_json("job.json", job_record({**spec_and_edits()[0], "inputs": {"allow": ["any"]}},
                                        {}, [], rows=len(rows)))
    (tmp_path / "out" / "metrics").mkdir(parents=True)
    (tmp_path / "out" / "metrics" / "by_attribute.parquet").write_bytes(b"PAR1 not ours")
    (tmp_path / "out" / "metrics" / "notes.txt").write_text("mine\n")
    by_id = {}
    for k, rid in enumerate(rows["id"]):             # one batch file per row
        by_id[rid] = Path(out.path_of(write_metrics(out, rows.iloc[[k]], METRICS_SCHEMA)))
        if rid == "r1":
            first = by_id["r1"].read_bytes()[:100]
            by_id["r1"].write_bytes(first)
            compact(out, batch_files_only=True)      # r1's file set aside, r0's left
    second = by_id["r2"].read_bytes()[:50]
    by_id["r2"].write_bytes(second)                  # r2's: cut since the compaction

    page = Path(write_report(out.uri)).read_text()
    assert f"PARTIAL REPORT: {len(rows) - 2} of {len(rows)}" in page        # r1, r2: not done
    assert "opted out of the input rule" in page
    [record] = quarantined(out)
    section = page[page.index('id="quarantined"'):page.index('id="damaged"')]
    assert f"<code>metrics/{by_id['r1'].name}</code>" in section and "<td>100</td>" in section
    assert "not readable as Parquet" in section and record["moved_to"] in section
    section = page[page.index('id="damaged"'):page.index('id="foreign"')]
    assert f"<code>metrics/{by_id['r2'].name}</code>" in section and "<td>50</td>" in section
    section = page[page.index('id="foreign"'):]
    assert "metrics/by_attribute.parquet" in section and "metrics/notes.txt" in section
    assert "<td>13</td>" in section and "not a name the job writes" in section
    assert by_id["r2"].read_bytes() == second                # the report moved nothing
    assert (tmp_path / "out" / "metrics" / "notes.txt").read_text() == "mine\n"
    clean = small_report(None)
    assert 'id="metrics-files"' not in clean and "opted out" not in clean
