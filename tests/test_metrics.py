"""The metrics dataset (pipeline/output/metrics.py): reads of only the columns asked, the
newest row per id, a reader that reads again only what changed, compaction that a kill
at any instant leaves with every row once, on local disk and on a real S3 server."""
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import metrics as m
from pipeline.output.metrics import (METRICS_SCHEMA, MetricsReader, compact, iter_metrics,
                                  metrics_files, metrics_paths, read_metrics, write_metrics)
from pipeline.output.layout import Output

ROOT = Path(__file__).resolve().parents[1]


def rows(ids, at=1.0, status="ok", **extra):
    df = pd.DataFrame({"id": ids, "status": status, "written_at": at, **extra})
    for name in METRICS_SCHEMA.names:
        if name not in df.columns:
            df[name] = None
    df["written_at"] = df["written_at"].astype(float)
    return df


def write_batches(out, ids, batch=4, at=1.0):
    for k in range(0, len(ids), batch):
        write_metrics(out, rows(ids[k:k + batch], at=at + k), METRICS_SCHEMA)


def every_row(out) -> pd.DataFrame:
    return pd.concat([pq.read_table(p, filesystem=out.fs).to_pandas()
                      for p in metrics_paths(out)], ignore_index=True)


def test_a_read_takes_the_columns_asked_and_the_newest_row_of_each_id(tmp_path):
    out = Output(str(tmp_path / "o"))
    write_metrics(out, rows(["a", "b"], at=1.0, status="error", error=["x", "y"]), METRICS_SCHEMA)
    write_metrics(out, rows(["a"], at=2.0), METRICS_SCHEMA)           # a retried row
    read = read_metrics(out, ["id", "status"])
    assert list(read.columns) == ["id", "status"]
    assert read.set_index("id")["status"].to_dict() == {"a": "ok", "b": "error"}
    # a file from before a column existed, and with the result's old name
    legacy = pa.table({"id": ["c", "d"], "status": ["ok", "error"],
                       "image_uri": ["o/images/c.png", "in/d.png"], "written_at": [3.0, 3.0]})
    pq.write_table(legacy, tmp_path / "o" / "metrics" / "part-legacy.parquet")
    read = read_metrics(out, ["id", "edited_uri", "identity_status"]).set_index("id")
    assert read.loc["c", "edited_uri"] == f"{tmp_path}/o/images/c.png"    # located
    assert pd.isna(read.loc["d", "edited_uri"])                # an error row's was its input
    assert read["identity_status"].isna().all()
    assert set(read_metrics(out).columns) >= set(METRICS_SCHEMA.names)
    assert read_metrics(out, ["id"], ids={"b", "zz"})["id"].tolist() == ["b"]


def test_a_reader_reads_again_only_the_files_that_changed(tmp_path, monkeypatch):
    out = Output(str(tmp_path / "o"))
    write_batches(out, [f"r{k}" for k in range(12)])                   # 3 files
    reads = []
    real = m._read_file
    monkeypatch.setattr(m, "_read_file", lambda o, path, *a: reads.append(path) or
                        real(o, path, *a))
    reader = MetricsReader(out, ["id", "status"])
    assert len(reader.read()) == 12 and len(reads) == 3
    reads.clear()
    assert len(reader.read()) == 12 and reads == []                    # nothing changed
    write_batches(out, ["s0", "s1"], at=50.0)
    write_metrics(out, rows(["r0", "r1", "r2", "r3"], at=60.0, status="error"), METRICS_SCHEMA)
    now = reader.read().set_index("id")
    assert len(now) == 14 and now.loc["r0", "status"] == "error"
    assert len(reads) == 2                                   # the new file, the rewritten one
    compact(out)                                             # files replaced by one
    reads.clear()
    again = reader.read().set_index("id")
    assert again.sort_index().equals(now.sort_index()) and len(reads) == 1


# readers: a merged file's rows cut from the middle of one reader's share (1, 3), or
# gathered from shares of one file each (8)
@pytest.mark.parametrize("readers", [1, 3, 8])
def test_compaction_merges_the_batch_files_and_every_row_stays_once(tmp_path, monkeypatch,
                                                                    readers):
    monkeypatch.setattr(m, "_readers", lambda *a, **k: readers)
    out = Output(str(tmp_path / "o"))
    ids = [f"r{k:03d}" for k in range(30)]
    write_batches(out, ids)
    before = read_metrics(out)
    assert compact(out, most_rows=12) == 8                   # 8 files, into 3 of <= 12+ rows
    names = [f.name for f in metrics_files(out)]
    assert all(n.startswith("compact-") for n in names) and len(names) == 3
    sizes = sorted(f.rows for f in metrics_files(out))      # cut at the first file that
    assert sum(sizes) == 30 and 12 <= sizes[1] and sizes[2] < 12 + 4  # reaches 12 rows
    assert sorted(every_row(out)["id"]) == ids               # no copy, none lost
    pd.testing.assert_frame_equal(read_metrics(out).reset_index(drop=True),
                                  before.reset_index(drop=True))
    assert compact(out, most_rows=12) == 0                   # nothing small left
    assert compact(out) == 3                                 # a larger target merges them
    assert [f.rows for f in metrics_files(out)] == [30]


def test_a_batch_file_written_again_during_a_compaction_is_kept(tmp_path, monkeypatch):
    """A retried batch rewrites its file while the driver merges: the rewrite survives."""
    out = Output(str(tmp_path / "o"))
    write_batches(out, [f"r{k}" for k in range(8)])
    put = Output.put

    def put_and_retry(self, rel, data):
        if "compact-" in rel:               # the batch files are read; one is written again
            write_metrics(out, rows(["r0", "r1", "r2", "r3"], at=77.0, status="error"),
                          METRICS_SCHEMA)
        put(self, rel, data)
    monkeypatch.setattr(Output, "put", put_and_retry)
    assert compact(out) == 2
    monkeypatch.setattr(Output, "put", put)
    assert len(metrics_files(out)) == 2                      # the merged file and the rewrite
    read = read_metrics(out).set_index("id")
    assert len(read) == 8 and read.loc["r0", "status"] == "error"
    compact(out)
    assert [f.rows for f in metrics_files(out)] == [12]      # r0-r3 twice, written apart
    assert read_metrics(out).set_index("id").loc["r0", "status"] == "error"


def test_while_running_only_batch_files_are_merged(tmp_path):
    out = Output(str(tmp_path / "o"))
    write_batches(out, [f"r{k}" for k in range(8)])
    compact(out, batch_files_only=True)
    write_batches(out, [f"s{k}" for k in range(8)])
    assert compact(out, batch_files_only=True) == 2          # the merged file stays as it is
    assert sorted(f.rows for f in metrics_files(out)) == [8, 8]
    assert compact(out) == 2 and [f.rows for f in metrics_files(out)] == [16]


def test_a_run_merges_an_old_outputs_batch_files_before_it_reads_what_is_done(tmp_path):
    """An output of many small files is read once, by the merge; the history comes from
    the merged file."""
    from pipeline.runner.driver import compact_and_read_history
    out = Output(str(tmp_path / "o"))
    ids = [f"r{k:02d}" for k in range(10)]
    write_batches(out, ids)
    write_metrics(out, rows(["r03"], at=99.0, status="error"), METRICS_SCHEMA)
    history = compact_and_read_history(out).set_index("id")
    assert sorted(history.index) == ids and list(history.columns) == ["status", "written_at"]
    assert history.loc["r03", "status"] == "error" and history.loc["r04", "status"] == "ok"
    assert [f.rows for f in metrics_files(out)] == [11]         # one file, every row written


def test_rows_stream_in_batches_newest_only(tmp_path):
    out = Output(str(tmp_path / "o"))
    write_batches(out, [f"r{k}" for k in range(10)])
    write_metrics(out, rows(["r1"], at=99.0, status="error"), METRICS_SCHEMA)
    batches = list(iter_metrics(out, rows=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    seen = pd.concat(batches).set_index("id")
    assert sorted(seen.index) == sorted(f"r{k}" for k in range(10))
    assert seen.loc["r1", "status"] == "error"


# ---- a compaction killed at any instant -------------------------------------------------
KILLED = """
import json, os, signal, sys
from pipeline.output import metrics
from pipeline.output.layout import Output
uri, options, point = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
out = Output(uri, options)
put, rm = Output.put, out.fs.rm

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killing_put(self, rel, data):
    if "compact-" in rel:
        if point == "before-write":
            die()
        if point == "mid-write":             # local: half the bytes at the temporary name;
            if self.local:                   # S3: an upload cut short stores nothing
                folder, _, name = self.path_of(rel).rpartition("/")
                with open(f"{folder}/.tmp-killed-{name}", "wb") as f:
                    f.write(data[:len(data) // 2])
            die()
    put(self, rel, data)
    if "compact-" in rel and point == "after-write":
        die()

def killing_rm(paths, *args, **kwargs):
    if point == "mid-delete":
        rm(paths[:len(paths) // 2], *args, **kwargs)
        die()
    rm(paths, *args, **kwargs)

Output.put = killing_put
out.fs.rm = killing_rm
metrics.compact(out, most_rows=16)
"""


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "o"), {}
    s3 = request.getfixturevalue("s3_server")
    bucket = f"compact-{uuid.uuid4().hex[:12]}"
    s3["fs"].mkdir(bucket)
    return f"s3://{bucket}/o", s3["options"]


@pytest.mark.parametrize("point", ["before-write", "mid-write", "after-write", "mid-delete"])
def test_a_compaction_killed_at_any_point_loses_no_row_and_duplicates_none(storage, point):
    uri, options = storage
    out = Output(uri, options)
    ids = [f"r{k:03d}" for k in range(40)]
    write_batches(out, ids)
    want = read_metrics(out).sort_values("id").reset_index(drop=True)
    run = subprocess.run([sys.executable, "-c", KILLED, uri, json.dumps(options), point],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    got = read_metrics(out).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)                  # every row, once
    assert compact(out, most_rows=16) > 0                     # the next compaction finishes
    assert sorted(every_row(out)["id"]) == ids                # and leaves no copy
    pd.testing.assert_frame_equal(read_metrics(out).sort_values("id").reset_index(drop=True),
                                  want)
