"""An output is a folder that can move: its metrics rows record their files relative to
it, so an output written with a relative path, then moved to another folder and copied
to a real S3 server (moto on 127.0.0.1), reports and exports from both places with every
row's files found."""
import shutil
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from helpers import SHORT, write_photos
from PIL import Image

from manifests.schema import validate
from pipeline.engine.rows import passthrough_columns
from pipeline.output.layout import Output
from pipeline.output.metrics import passthrough_schema, read_metrics
from pipeline.results.export import export_output
from pipeline.results.report import write_report
from pipeline.runner.plan import plan_job
from pipeline.runner.spec import JobSpec
from pipeline.runner.stage import EditStage
from pipeline.store.storage import filesystem

FILE_COLUMNS = ("edited_uri", "latent_uri", "mask_uri", "pasted_uri")


@pytest.fixture(scope="module")
def moved(tmp_path_factory, tiny32, s3_server):
    """One small output written from a job folder as `out` (a relative path), moved to
    another folder, and copied to S3: ({place: (uri, storage options)}, the ok ids)."""
    root = tmp_path_factory.mktemp("moved")
    (root / "photos").mkdir()
    photos = write_photos(root / "photos", 2)
    big = root / "photos" / "source.png"
    Image.fromarray((np.random.default_rng(3).random((70, 90, 3)) * 255).astype("uint8")).save(big)
    quad = [15.0, 10.0, 15.0, 55.0, 60.0, 55.0, 60.0, 10.0]
    todo = validate(pd.DataFrame({
        "id": ["a", "b", "c"], "attributes": [["smiling"], ["black_hair"], ["smiling"]],
        "image_uri": [str(photos / "p0.png"), str(photos / "p1.png"), str(photos / "broken.png")],
        "targets": [[1.0]] * 3, "source_uri": [str(big), None, None],
        "align_quad": [quad, None, None]}))
    job_dir = root / "job"
    job_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(job_dir)                                    # `output: out`, as make demo's
        job = JobSpec(manifest="m.parquet", output="out", models=str(tiny32 / "models.yaml"),
                      edit=SHORT, paste_back=True)
        schema = passthrough_schema(pa.Schema.from_pandas(todo, preserve_index=False),
                                    passthrough_columns(todo.columns))
        rows = EditStage(job, plan_job(todo, job, schema))(todo)
    assert rows.set_index("id")["status"].to_dict() == {"a": "ok", "b": "ok", "c": "error"}
    assert rows.set_index("id").loc["a", "edited_uri"] == "images/a.png"   # as recorded
    local = root / "elsewhere" / "moved-out"
    local.parent.mkdir()
    shutil.move(str(job_dir / "out"), str(local))
    bucket = f"moved-{uuid.uuid4().hex[:10]}"
    s3_server["fs"].mkdir(bucket)
    s3_server["fs"].put(str(local), f"{bucket}/copy", recursive=True)
    return {"local": (str(local), None), "s3": (f"s3://{bucket}/copy", s3_server["options"])}, \
        ["a", "b"], root


@pytest.mark.parametrize("place", ["local", "s3"])
def test_a_moved_output_finds_every_rows_files_reports_and_exports(moved, place):
    places, ok, root = moved
    uri, options = places[place]
    metrics = read_metrics(Output(uri, options)).set_index("id")
    for rid in ok:
        for column in FILE_COLUMNS:
            located = metrics.loc[rid, column]
            if column == "pasted_uri" and rid != "a":
                assert pd.isna(located)                  # only the aligned row is pasted
                continue
            assert located.startswith(uri + "/"), located
            fs, path = filesystem(located, options)
            assert fs.exists(path), located
    report = f"{root}/report-{place}"
    write_report(uri, dest=report, storage_options=options)
    thumbs = {p.name for p in (root / f"report-{place}" / "thumbs").iterdir()}
    assert {"a.result.png", "a.mask.png", "a.pasted.png", "b.result.png",
            "b.mask.png"} <= thumbs
    result = export_output(uri, "imagefolder", f"{root}/export-{place}",
                           storage_options=options)
    assert result.missing == [] and result.selected == len(ok)
    exported = sorted(p.name for p in (root / f"export-{place}").rglob("*.png"))
    assert exported == [f"{rid}.png" for rid in ok]
