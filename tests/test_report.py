"""The report, the export and summary.json of one small real job: tiny models, a real
local Ray, its inputs and output on a real S3 server (moto on 127.0.0.1). The report
is opened in a real headless Chromium; the exports are loaded with pandas, pyarrow and
Hugging Face `datasets`."""
import io
import json
import os
import re
import time
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
from pipeline.output.metrics import passthrough_schema, read_metrics, write_metrics
from pipeline.output.layout import Output
from pipeline.runner.plan import plan_job
from pipeline.runner.spec import JobSpec
from pipeline.runner.stage import EditStage
from pipeline.results.report import write_report

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
