"""The Ray stage called directly, without Ray, and the driver's plan it is built from:
settings resolved once per job, networks loaded by need, the column contract."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray
import yaml
from helpers import SHORT, write_photos
from PIL import Image

from manifests.schema import validate
from models.spec import REQUIRED, SpecError
from pipeline.errors import STOPPED, JobStopped, StorageError
from pipeline.output.images import ImageError
from pipeline.output.metrics import passthrough_schema, read_metrics
from pipeline.output.layout import Output
from pipeline.runner.plan import image_groups, plan_job
from pipeline.runner.spec import JobSpec
from pipeline.runner.stage import EditStage, FailureStreak


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"), 2, size=40)


def partial_spec(tiny_dir, tmp_path, *drop):
    """The tiny spec without some networks (paths made absolute)."""
    spec = yaml.safe_load((tiny_dir / "models.yaml").read_text())
    for name in ("generator", "face_parser", "classifier", "e4e", "lpips_trunk", "judge"):
        spec[name]["uri"] = str(tiny_dir / spec[name]["uri"])
    for name in drop:
        del spec[name]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def rows(photos, attrs, ids=None, **extra):
    n = len(attrs)
    return validate(pd.DataFrame({
        "id": ids or [f"r{k}" for k in range(n)],
        "image_uri": [str(photos / f"p{k % 2}.png") for k in range(n)],
        "attributes": [[a] for a in attrs], "targets": [[1.0]] * n, **extra}))


def job_for(models, out, edit=SHORT, **keys):
    return JobSpec(manifest="m", output=str(out), models=models, edit=edit, **keys)


def plan_for(todo, job, passthrough=("label",)):
    return plan_job(todo, job, passthrough_schema(pa.Schema.from_pandas(todo), passthrough))


def stage_for(todo, models, tmp_path, edit=SHORT, output="out", **keys):
    """A stage as a job's actor builds it (`keys`: job spec keys)."""
    job = job_for(models, tmp_path / output, edit, **keys)
    plan = plan_for(todo, job)
    return EditStage(job, plan), plan


def test_the_stage_edits_writes_and_records_each_row(tiny_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))        # no VGG16 to fall back on
    todo = rows(photos, ["smiling", "black_hair", "smiling"], label=[7, 8, 9])
    todo.loc[2, "image_uri"] = str(photos / "broken.png")
    stage, plan = stage_for(todo, partial_spec(tiny_dir, tmp_path, "e4e", "lpips_trunk"), tmp_path)
    assert plan.networks == REQUIRED + ("judge",)    # local edits: no e4e, no LPIPS trunk;
    assert stage.models.e4e is None and stage.models.lpips is None     # a judge when named
    assert stage.models.judge is not None
    out = stage(todo).set_index("id")
    assert out.loc["r0", "status"] == "ok" and out.loc["r1", "status"] == "ok"
    assert out.loc["r2", "status"] == "error" and "broken.png: not a readable image" in out.loc["r2", "error"]
    assert out.loc["r2", "input_uri"] == str(photos / "broken.png") and pd.isna(out.loc["r2", "edited_uri"])
    assert out.loc["r0", "input_uri"] == str(photos / "p0.png")
    assert out.loc["r1", "edited_uri"] == "images/r1.png"      # relative to the output
    assert Image.open(tmp_path / "out" / "images" / "r1.png").size == (64, 64)
    assert out["label"].tolist() == [7, 8, 9] and (out["actor_model_loads"] == 1).all()
    assert not ray.is_initialized()          # a stage used directly starts no Ray instance
    assert out.loc["r1", "steps"] == 3 + 2 and out.loc["r0", "mode"] == "local"
    written = read_metrics(Output(str(tmp_path / "out"))).set_index("id")
    assert sorted(written.index) == ["r0", "r1", "r2"]                # the metrics file is there
    assert written.loc["r0", "judge_sha256"] == stage.models.hashes["judge"]
    assert len(written.loc["r0", "judge_prob_result"]) == 1 and written.loc["r0", "code_version"]


def test_e4e_init_loads_e4e_but_not_the_lpips_trunk(tiny_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    todo = rows(photos, ["smiling"])
    stage, plan = stage_for(todo, partial_spec(tiny_dir, tmp_path, "lpips_trunk", "judge"),
                            tmp_path, edit={**SHORT, "e4e_init": True})
    assert plan.networks == REQUIRED + ("e4e",) and stage.models.lpips is None
    assert stage.models.judge is None                                 # none named, none run
    out = stage(todo)
    assert out["status"].tolist() == ["ok"], out["error"].tolist()
    assert out["judge_on_target"].isna().all() and out["judge_sha256"].isna().all()


def test_a_network_the_spec_lacks_is_a_setup_error_before_any_row(tiny_dir, photos, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = partial_spec(tiny_dir, tmp_path, "e4e", "lpips_trunk")
    todo = rows(photos, ["smiling", "male"])
    with pytest.raises(SpecError, match=r"models.yaml names no e4e and lpips_trunk.*"
                                        r"maskface weights fetch --only e4e --only lpips_trunk"):
        plan_for(todo, job_for(spec, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_actor_whose_setup_fails_stops_the_job_instead_of_dying(tiny_dir, photos, tmp_path):
    """A checkpoint cut short after the driver's check (or a setup failure of any kind in
    the actor): the constructor does not raise, which Ray would take for a lost worker and
    retry; the actor hands every row back `stopped` with the file's own message, and
    nothing is written."""
    spec = partial_spec(tiny_dir, tmp_path)
    generator = yaml.safe_load(open(spec))["generator"]["uri"]
    cut = tmp_path / "cut_generator.pt"
    cut.write_bytes(open(generator, "rb").read()[:1000])
    data = yaml.safe_load(open(spec))
    data["generator"]["uri"] = str(cut)
    data["generator"].pop("sha256", None)
    open(spec, "w").write(yaml.safe_dump(data))
    todo = rows(photos, ["smiling", "smiling"])
    stage, _ = stage_for(todo, spec, tmp_path)
    assert stage.setup_error is not None
    back = stage(image_groups(todo, 2))
    assert list(back["status"]) == [STOPPED, STOPPED]
    message = back["error"].iloc[0]
    assert "cut_generator.pt" in message and "\n" not in message and len(message) < 2048
    assert not (tmp_path / "out" / "metrics").exists()


def test_each_distinct_edit_is_resolved_once(tiny_dir, photos, tmp_path):
    todo = rows(photos, ["smiling", "smiling", "male", "black_hair"],
                mode=["auto", "auto", "local", "auto"])
    plan = plan_for(todo, job_for(str(tiny_dir / "models.yaml"), "o"))
    assert sorted(plan.resolved) == [(("black_hair",), "auto"), (("male",), "local"),
                                     (("smiling",), "auto")]
    assert plan.settings_of(("male",), "local").local and plan.networks == REQUIRED + ("judge",)
    assert plan.settings_of(("black_hair",), "auto").loss.weights.seg == 0.5


# ---- failures: a write that fails mid-row, an output that takes nothing, the streak ---
def test_a_write_failing_mid_row_fails_that_row_alone(tiny_dir, photos, tmp_path):
    """r1's latent cannot be written (its path is a folder): its image is there, but the
    row ends in error, not ok; a paste-back source outside inputs.allow is refused; and
    when no metrics can be written at all, the stage tells the driver to stop."""
    todo = rows(photos, ["smiling"] * 3, source_uri=[None, None, "/etc/hostname"],
                align_quad=[None, None, [0.0, 0, 0, 40, 40, 40, 40, 0]])
    (tmp_path / "out" / "latents" / "r1.npy").mkdir(parents=True)
    job = job_for(str(tiny_dir / "models.yaml"), tmp_path / "out", paste_back=True,
                  inputs={"allow": [str(photos)]})
    stage = EditStage(job, plan_for(todo, job, ["align_quad"]))
    out = stage(todo).set_index("id")
    assert out.loc["r0", "status"] == "ok"
    assert out.loc["r1", "status"] == "error"
    assert out.loc["r1", "error"].startswith("writing outputs: ")
    assert "latents/r1.npy" in out.loc["r1", "error"]
    assert (tmp_path / "out" / "images" / "r1.png").is_file()       # written before it failed
    assert out.loc["r2", "status"] == "error"
    assert "/etc/hostname: refused: not under any inputs.allow" in out.loc["r2", "error"]
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    written = read_metrics(Output(str(tmp_path / "out"))).set_index("id")["status"]
    assert written.to_dict() == {"r0": "ok", "r1": "error", "r2": "error"}

    # metrics that cannot be written: the rows come back `stopped`, recorded nowhere
    (tmp_path / "out" / "metrics").rename(tmp_path / "kept")
    (tmp_path / "out" / "metrics").write_text("a file where the metrics folder goes")
    again = stage(todo.iloc[:1].assign(id=["r9"]))
    assert again["status"].tolist() == [STOPPED]
    assert "cannot write the metrics of 1 row(s)" in again["error"].iloc[0]
    assert "Nothing can be recorded, so the job stops" in again["error"].iloc[0]
    assert (tmp_path / "out" / "metrics").read_text().startswith("a file")


def test_the_failure_streak_counts_whole_batches_failing_alike():
    engine = RuntimeError("CUDA error: device-side assert triggered")
    outage = StorageError("s3://b/x.png: storage error while reading (...)",
                          "ConnectionClosedError")
    bad_input, missing = ImageError("x.png: not a readable image"), StorageError("gone",
                                                                                 "FileNotFoundError")
    streak = FailureStreak(3, "node-1")
    streak.record([engine, engine])
    streak.record([engine, None])                     # a row succeeded: the streak ends
    streak.record([bad_input, bad_input])             # bad inputs never count
    streak.record([missing, missing])                 # nor a missing object
    streak.record([engine, engine])
    streak.record([outage, outage])                   # another kind: starts again
    streak.record([outage, outage])
    with pytest.raises(JobStopped, match=r"3 batches in a row failed with a storage error "
                                         r"\(ConnectionClosedError\) on node-1") as err:
        streak.record([outage, outage, outage])
    assert "the earlier 4 row(s) of this streak were recorded as errors" in str(err.value)
    never = FailureStreak(0, "node-1")
    for _ in range(10):
        never.record([engine])


PREFIX = {**SHORT, "steps.latent": 4, "loss.start_steps.classf": 2, "loss.start_steps.seg": 2}


def edits(photos, pairs):
    """Rows (photo k, attribute) with ids that say which."""
    return validate(pd.DataFrame({
        "id": [f"p{k}.{a}" for k, a in pairs], "image_uri": [str(photos / f"p{k}.png") for k, _ in pairs],
        "attributes": [[a] for _, a in pairs], "targets": [[1.0]] * len(pairs)}))


def test_an_images_local_edits_branch_from_one_prefix_kept_in_the_output(tiny_dir, photos,
                                                                         tmp_path):
    """Two recon masks per photo (the hair-shape edit adds the ears): one prefix each,
    computed once, stored under the output, used by a later call with other attributes
    and not by one whose prefix settings differ. Edits branched from it agree with edits
    run from scratch (float32; another batch composition)."""
    todo = edits(photos, [(0, "smiling"), (0, "big_nose"), (0, "wavy_hair"), (1, "smiling"),
                          (1, "straight_hair"), (0, "male")])
    stage, _ = stage_for(todo, str(tiny_dir / "models.yaml"), tmp_path, edit=PREFIX, batch_size=3)
    out = stage(image_groups(todo, 3)).set_index("id")
    assert (out["status"] == "ok").all(), out["error"].tolist()
    assert out["prefix"].fillna("none").to_dict() == {
        "p0.smiling": "computed", "p0.big_nose": "computed", "p0.wavy_hair": "computed",
        "p1.smiling": "computed", "p1.straight_hair": "computed", "p0.male": "none"}
    prefixes = sorted((tmp_path / "out" / "prefixes").iterdir())
    assert len(prefixes) == 4                                  # 2 photos x (skin, skin + ears)
    assert out.loc["p0.smiling", "steps"] == 4 + 2             # the prefix's steps count
    scratch, _ = stage_for(todo, str(tiny_dir / "models.yaml"), tmp_path, edit=PREFIX,
                           output="scratch", share_prefix=False)
    alone = scratch(todo).set_index("id")
    assert alone["prefix"].isna().all()
    # float32 rounding of another batch can tip an Adam step (lr 0.001); a wrong prefix is
    # off by far more (exact in float64: tests/test_engine.py)
    for rid in out.index:
        a = np.load(stage.output.locate(out.loc[rid, "latent_uri"]))
        b = np.load(scratch.output.locate(alone.loc[rid, "latent_uri"]))
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-3)

    more = edits(photos, [(0, "bushy_eyebrows"), (1, "wavy_hair")])      # same recon masks
    later, _ = stage_for(more, str(tiny_dir / "models.yaml"), tmp_path, edit=PREFIX)  # a later job
    again = later(image_groups(more, 4)).set_index("id")
    assert again["prefix"].tolist() == ["cached", "cached"]
    assert sorted((tmp_path / "out" / "prefixes").iterdir()) == prefixes
    changed, _ = stage_for(more, str(tiny_dir / "models.yaml"), tmp_path,
                           edit={**PREFIX, "optimizer.lr_latent": 0.002})
    assert changed(image_groups(more, 4))["prefix"].tolist() == ["computed", "computed"]
    assert len(list((tmp_path / "out" / "prefixes").iterdir())) == 6


def test_each_image_is_described_once_and_each_row_records_where_the_time_went(
        tiny_dir, photos, tmp_path, monkeypatch):
    """Four edit rows of two images: the identity metric describes each input once (a
    count), and every row carries its share of the actor's time per phase, from which
    the ledger reads the engine's share (engine busy)."""
    from pipeline.output.ledger import TIME_COLUMNS, actor_time
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    todo = rows(photos, ["smiling", "black_hair", "smiling", "black_hair"])
    stage, _ = stage_for(todo, partial_spec(tiny_dir, tmp_path, "e4e", "lpips_trunk"), tmp_path)
    out = stage(image_groups(todo, 4))
    assert (out["status"] == "ok").all(), out["error"].tolist()
    if stage.face_identity.unavailable is None:
        assert stage.face_identity.inputs_described == 2      # p0 and p1, once each
    times = out[TIME_COLUMNS].astype(float)
    assert (times >= 0).all().all() and (times["time_engine_s"] > 0).all()
    assert (times["time_write_s"] > 0).all() and (times["time_read_s"] > 0).any()
    busy = actor_time(read_metrics(Output(str(tmp_path / "out"))))
    assert len(busy) == 1 and busy[0]["rows"] == 4
    assert 0 < busy[0]["engine_busy"] < 1
    engine = float(times["time_engine_s"].sum())
    assert busy[0]["seconds"]["engine"] == pytest.approx(engine, abs=1e-3)


def test_the_png_compression_level_is_a_job_setting_that_keeps_the_pixels(
        tiny_dir, photos, tmp_path, monkeypatch):
    """`png_compress_level`: 0 stores the mask's bytes raw, the default (1) compresses
    them; the decoded pixels are the same."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = partial_spec(tiny_dir, tmp_path, "e4e", "lpips_trunk")
    todo = rows(photos, ["smiling"])
    masks = {}
    for level in (0, 1):
        stage, _ = stage_for(todo, spec, tmp_path, output=f"out{level}", png_compress_level=level)
        assert stage(todo)["status"].tolist() == ["ok"]
        masks[level] = tmp_path / f"out{level}" / "masks" / "r0.png"
    assert masks[0].stat().st_size > 64 * 64 > masks[1].stat().st_size
    assert np.array_equal(np.asarray(Image.open(masks[0])), np.asarray(Image.open(masks[1])))
    with pytest.raises(ValueError, match="png_compress_level must be 0 to 9"):
        JobSpec.from_dict({"manifest": "m", "output": "o", "models": "x",
                           "png_compress_level": 10})
