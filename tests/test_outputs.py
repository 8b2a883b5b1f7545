"""The output layout and its metrics dataset: one row per id, atomic writes, old columns."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output.jobfile import edits_of, merge_edits, spec_of
from pipeline.output.ledger import pending_rows
from pipeline.output.metrics import (METRICS_SCHEMA, drop_stale_rows, metrics_paths,
                                  passthrough_schema, read_metrics, write_metrics)
from pipeline.output.layout import Output


def rows(ids, status="ok", at=1.0, **extra):
    df = pd.DataFrame({"id": ids, "status": status, "written_at": at, **extra})
    for name in METRICS_SCHEMA.names:
        if name not in df.columns:
            df[name] = None
    return df


def test_metrics_round_trip_and_a_retried_batch_replaces_its_own_file(tmp_path):
    out = Output(str(tmp_path / "o"))
    first = write_metrics(out, rows(["b", "a"], status="error", at=1.0), METRICS_SCHEMA)
    again = write_metrics(out, rows(["a", "b"], at=2.0), METRICS_SCHEMA)
    assert first == again and len(metrics_paths(out)) == 1        # named by its ids
    write_metrics(out, rows(["c"], at=3.0), METRICS_SCHEMA)
    read = read_metrics(out).set_index("id")
    assert sorted(read.index) == ["a", "b", "c"] and (read["status"] == "ok").all()
    assert not [p for p in (tmp_path / "o" / "metrics").iterdir() if p.name.startswith(".")]


def test_the_newest_row_per_id_wins_and_stale_rows_are_dropped(tmp_path):
    out = Output(str(tmp_path / "o"))
    write_metrics(out, rows(["a", "b"], status="error", at=1.0), METRICS_SCHEMA)
    write_metrics(out, rows(["a"], at=2.0), METRICS_SCHEMA)
    assert read_metrics(out).set_index("id")["status"].to_dict() == {"a": "ok", "b": "error"}
    assert drop_stale_rows(out) == 1
    every = pd.concat([pq.read_table(f).to_pandas() for f in metrics_paths(out)])
    assert sorted(every["id"]) == ["a", "b"]


def test_outputs_written_before_the_rename_are_read_and_resumed(tmp_path):
    """Old metrics called the result `image_uri` and held the input's URI there on error
    rows: read as `edited_uri`, null on error rows, and their ids count as complete."""
    old = pd.DataFrame({"id": ["a", "b"], "status": ["ok", "error"],
                        "image_uri": ["o/images/a.png", "in/b.png"], "written_at": [1.0, 1.0]})
    (tmp_path / "o" / "metrics").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(old), tmp_path / "o" / "metrics" / "part-0123456789abcdef01234567.parquet")
    out = Output(str(tmp_path / "o"))
    read = read_metrics(out).set_index("id")
    assert "image_uri" not in read.columns
    located = f"{tmp_path}/o/images/a.png"        # where the output is now, as every reader
    assert read.loc["a", "edited_uri"] == located and pd.isna(read.loc["b", "edited_uri"])
    manifest = pd.DataFrame({"id": ["a", "b", "c"]})
    assert pending_rows(manifest, read_metrics(out), retry_errors=False)["id"].tolist() == ["c"]
    assert pending_rows(manifest, read_metrics(out), retry_errors=True)["id"].tolist() == ["b", "c"]


def test_atomic_writes_leave_no_partial_file(tmp_path):
    out = Output(str(tmp_path / "o"))
    out.put_json("summary.json", {"rows": 3})
    out.put_npy("latents/a.npy", __import__("numpy").zeros((2, 3), "float32"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["latents", "summary.json"]


def test_job_json_keeps_the_edits_of_earlier_runs_then_adds_this_runs_new_ones():
    smile = {"attributes": ["smiling"], "mode": "local", "settings": {"steps.latent": 3}}
    hair = {"attributes": ["black_hair"], "mode": "local", "settings": {"steps.latent": 3}}
    longer = {**smile, "settings": {"steps.latent": 9}}       # the same edit, run otherwise
    assert merge_edits(None, [smile]) == [smile]
    assert merge_edits([smile], []) == [smile]                   # a resume that edits nothing
    assert merge_edits([smile, hair], [hair, longer]) == [smile, hair, longer]
    assert edits_of({"spec": {}}) is None and edits_of({"edits": [hair]}) == [hair]
    assert spec_of({"settings": {"batch_size": 2}}) == {"batch_size": 2}     # older outputs
    assert spec_of({"spec": {"batch_size": 3}}) == {"batch_size": 3} and spec_of(None) == {}


def test_row_files_are_recorded_relative_to_the_output_and_located_where_it_is_now(tmp_path):
    out = Output(str(tmp_path / "o"))
    assert out.put_row_file("images", "a", b"png") == "images/a.png"
    here = f"{tmp_path}/o/images/a.png"
    assert (tmp_path / "o" / "images" / "a.png").read_bytes() == b"png"
    # what this and older outputs recorded: a key, a path relative to the job's folder,
    # an absolute path elsewhere, an s3:// URI: all are the output's own file
    for recorded in ("images/a.png", "demo-out/run/images/a.png", "/old/place/images/a.png",
                     "s3://bucket/run/images/a.png"):
        assert out.locate(recorded) == here
    assert out.locate(None) is None and out.locate(float("nan")) is None
    assert out.locate("/photos/in.png") == "/photos/in.png"      # not a row file: as given


def test_passthrough_columns_keep_their_types_and_may_not_shadow_metrics():
    manifest = pa.schema([("label", pa.int8()), ("align_quad", pa.list_(pa.float64()))])
    schema = passthrough_schema(manifest, ["label", "align_quad", "note", "source_uri"])
    assert schema.field("label").type == pa.int8() and schema.field("note").type == pa.string()
    assert schema.names.count("source_uri") == 1
    with pytest.raises(ValueError, match="would overwrite metrics columns"):
        passthrough_schema(None, ["edited_uri"])


def test_a_write_failing_midway_leaves_the_old_file_or_none(tmp_path):
    """The disk refuses bytes past 64 KiB (RLIMIT_FSIZE, in a child process): a 200 KB
    write fails in the middle, and neither the complete old file nor a missing one is
    replaced by half a file."""
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "a.png").write_bytes(b"the old, complete file")
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
from pipeline.errors import StorageError
from pipeline.output.layout import Output
out = Output({str(out)!r})
for name in ("a.png", "b.png"):
    try:
        out.put("images/" + name, b"x" * 200_000)
        print(name, "written")
    except StorageError as e:
        print(name, "failed:", e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all("failed:" in line and "File too large" in line
                                   for line in lines), lines
    assert (out / "images" / "a.png").read_bytes() == b"the old, complete file"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png"]   # no temp left


def test_on_s3_a_replaced_metrics_file_is_read_afresh(s3_server):
    """A retried batch replaces its metrics file on S3 while this process holds a listing
    of the old one: reading, resuming and dropping stale rows must see the new file."""
    s3_server["fs"].mkdir("outputs-afresh")
    out = Output("s3://outputs-afresh/o", s3_server["options"])
    write_metrics(out, rows(["a", "b"], status="error", at=1.0), METRICS_SCHEMA)
    write_metrics(out, rows(["c"], status="error", at=1.0), METRICS_SCHEMA)
    assert len(read_metrics(out)) == 3                        # listed and read: now cached
    actor = Output("s3://outputs-afresh/o", {**s3_server["options"], "skip_instance_cache": True})
    write_metrics(actor, rows(["a", "b"], at=2.0), METRICS_SCHEMA)   # the same file, replaced
    write_metrics(actor, rows(["c"], at=3.0), METRICS_SCHEMA)       # by another process
    assert drop_stale_rows(out) == 0
    assert read_metrics(out).set_index("id")["status"].to_dict() == {"a": "ok", "b": "ok",
                                                                        "c": "ok"}
