"""The export (pipeline/results/export.py): its label rule, and its streaming over a
synthetic output on local disk and on a real S3 server; the files of a real job, loaded
by pandas, pyarrow and `datasets`, are tests/test_report.py's."""
import json
import re
import uuid

import pandas as pd
import pytest

from pipeline.output.metrics import METRICS_SCHEMA, write_metrics
from pipeline.output.layout import Output
from pipeline.results import export
from pipeline.results.export import label_names, labels_after
from pipeline.results.review import ReviewError, read_verdicts


def row(**kw):
    base = {"status": "ok", "attributes": ["smiling"], "targets": [1.0], "prob_result": [0.8],
            "attr_smiling": 0, "attr_male": 1, "attr_bangs": None}
    return {**base, **kw}


def test_an_edit_on_target_sets_its_label_the_others_pass_through():
    frame = pd.DataFrame([row()])
    names = label_names(frame.columns, frame["attributes"])
    assert names == ["smiling", "male", "bangs"]
    assert labels_after(row(), names) == ({"smiling": 1, "male": 1, "bangs": None}, True)


def test_an_edit_short_of_its_target_has_no_label_and_a_failed_row_none():
    names = ["smiling", "male", "bangs"]
    labels, reached = labels_after(row(prob_result=[0.3]), names)
    assert labels == {"smiling": None, "male": 1, "bangs": None} and reached is False
    assert labels_after(row(status="error"), names) == (None, None)
    # an edit without a label column of its own still gets one
    frame = pd.DataFrame([row(attributes=["big_nose"])])
    assert label_names(frame.columns, frame["attributes"])[-1] == "big_nose"


# ---- streaming, on local disk and on a real S3 server ------------------------------------------
@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    s3 = request.getfixturevalue("s3_server")
    bucket = f"export-{uuid.uuid4().hex[:12]}"
    s3["fs"].mkdir(bucket)
    return f"s3://{bucket}/out", s3["options"]


def test_the_export_streams_shards_and_leaves_out_a_row_whose_image_is_gone(
        output_uri, tmp_path, monkeypatch):
    uri, options = output_uri
    out = Output(uri, options)
    ids = [f"r{k}" for k in range(7)]
    rows = pd.DataFrame({name: None for name in METRICS_SCHEMA.names}, index=range(7))
    rows["id"], rows["status"], rows["written_at"] = ids, "ok", 1.0
    rows["attributes"], rows["targets"] = [["smiling"]] * 7, [[1.0]] * 7
    rows["prob_result"] = [[0.9]] * 7
    rows.loc[6, "status"] = "error"                               # a failed row: no image
    rows["edited_uri"] = [out.put_row_file("images", rid, f"png {rid}".encode())
                          if rid != "r6" else None for rid in ids]
    out.fs.rm(out.path_of("images/r2.png"))                       # an image gone since
    for k in range(0, 7, 2):
        write_metrics(out, rows.iloc[k:k + 2], METRICS_SCHEMA)
    monkeypatch.setattr(export, "SHARD_ROWS", 2)
    seen = []
    result = export.export_output(uri, "hf-parquet", str(tmp_path / "hf"), storage_options=options,
                                  progress=seen.append)
    assert sum(seen) == 7 and result.selected == 7 and result.rows == 6
    assert [rid for rid, _ in result.missing] == ["r2"] and "r2.png" in result.missing[0][1]
    assert len(result.files) == 4                                 # 7 rows, 2 a shard
    table = pd.read_parquet(tmp_path / "hf" / "data")
    assert sorted(table["id"]) == ["r0", "r1", "r3", "r4", "r5", "r6"]
    images = table.set_index("id")["image"]
    assert images["r4"]["bytes"] == b"png r4" and images["r6"] is None
    result = export.export_output(uri, "imagefolder", str(tmp_path / "if"), storage_options=options)
    assert result.rows == 5 and [rid for rid, _ in result.missing] == ["r2"]
    lines = (tmp_path / "if" / "train" / "metadata.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ["r0", "r1", "r3", "r4", "r5"]
    assert (tmp_path / "if" / "train" / "r5.png").read_bytes() == b"png r5"


def test_reviewed_keeps_the_accepted_rows_and_counts_the_others(tmp_path):
    out = Output(str(tmp_path / "out"))
    ids = ["r0", "r1", "r2", "r3"]
    rows = pd.DataFrame({name: None for name in METRICS_SCHEMA.names}, index=range(4))
    rows["id"], rows["status"], rows["written_at"] = ids, "ok", 1.0
    rows["attributes"], rows["targets"], rows["prob_result"] = [["smiling"]] * 4, [[1.0]] * 4, \
        [[0.9]] * 4
    rows["edited_uri"] = [out.put_row_file("images", rid, b"png") for rid in ids]
    write_metrics(out, rows, METRICS_SCHEMA)
    (tmp_path / "v.csv").write_text("id,verdict\nr0,accept\nr1,Reject\nr2,unsure\nelse,accept\n")
    verdicts = read_verdicts(str(tmp_path / "v.csv"))
    result = export.export_output(str(tmp_path / "out"), "hf-parquet", str(tmp_path / "x"),
                                  reviewed=verdicts)
    assert result.rows == 1 and list(pd.read_parquet(tmp_path / "x" / "data")["id"]) == ["r0"]
    assert result.not_accepted == {"reject": 1, "unsure": 1, "not reviewed": 1}


def test_a_verdicts_file_is_read_strictly():
    from pipeline.results.review import acceptance, wilson
    figures = acceptance({"a": "accept", "b": "accept", "c": "reject", "d": "unsure"})
    assert (figures["decided"], figures["rate"]) == (3, pytest.approx(2 / 3))
    low, high = figures["interval"]
    assert low < 2 / 3 < high and wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)   # the textbook case


@pytest.mark.parametrize("text,problem", [
    ('{"verdicts": {"a": "maybe"}}', "entry 1 (id 'a'): verdict 'maybe' is not one of"),
    ('{"ids": []}', 'no "verdicts" object'),
    ("id,choice\na,accept\n", "needs the columns id and verdict"),
])
def test_a_bad_verdicts_file_says_what_is_wrong(tmp_path, text, problem):
    (tmp_path / "v").write_text(text)
    with pytest.raises(ReviewError, match=re.escape(problem)):
        read_verdicts(str(tmp_path / "v"))
