"""The metrics dataset (pipeline/output/metrics.py): reads of only the columns asked, the
newest row per id, a reader that reads again only what changed, compaction that a kill
at any instant leaves with every row once, on local disk and on a real S3 server; only
the job's own files read, merged or deleted, a damaged one set aside and its rows
edited again by the real driver."""
import json
import logging
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
LEGACY_KEY = "0123456789abcdef01234567"     # a batch file's name: 24 hex digits


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
    pq.write_table(legacy, tmp_path / "o" / "metrics" / f"part-{LEGACY_KEY}.parquet")
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


# ---- only the job's own files: foreign files left alone, damaged ones set aside ------------
FOREIGN_KEY = "fedcba9876543210fedcba98"     # our batch file's name pattern, another schema


def put_bytes(out, rel, data: bytes) -> None:
    """A file another tool wrote under the output, as it wrote it (not through Output)."""
    with out.fs.open(out.path_of(rel), "wb") as f:
        f.write(data)


def get_bytes(out, rel) -> bytes:
    return out.fs.cat_file(out.path_of(rel))


def parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def foreign_files() -> dict[str, bytes]:
    """What another tool might leave in metrics/: a summary table of its own with our key
    columns (and a row with a null id), a file of our batch name with its own columns, one
    of our merged name whose `written_at` is not ours, and a text file."""
    ours_columns = pa.table({"id": [None, "r000"], "status": ["ok", "ok"],
                             "written_at": [9e9, 9e9], "attribute": ["smiling", "bangs"]})
    return {"metrics/by_attribute.parquet": parquet_bytes(ours_columns),
            f"metrics/part-{FOREIGN_KEY}.parquet": parquet_bytes(
                pa.table({"attribute": ["smiling"], "count": [3]})),
            "metrics/compact-2-0123456789ab.parquet": parquet_bytes(
                pa.table({"id": ["x1", "x2"], "status": ["ok", "ok"], "written_at": [1, 2]})),
            "metrics/notes.txt": b"metrics computed by hand, 2024\n"}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == m.__name__ and r.levelno >= logging.WARNING]


def test_foreign_files_in_metrics_are_never_read_merged_or_deleted(storage, caplog):
    """A file in metrics/ that is not the job's (another name, or our name with other
    columns) survives writes, compactions (while running and at a run's end), stale-row
    drops and every reader byte for byte, and never reaches the history; the driver's
    compaction names each once per run."""
    caplog.set_level(logging.INFO, logger=m.__name__)
    uri, options = storage
    out = Output(uri, options)
    ids = [f"r{k:03d}" for k in range(12)]
    write_batches(out, ids[:8])
    foreign = foreign_files()
    for rel, data in foreign.items():
        put_bytes(out, rel, data)
    for run in range(2):                        # two runs of the driver, as it compacts
        write_batches(out, ids[8:], at=10.0 + run)
        assert compact(out, batch_files_only=True) >= 0
        compact(out, batch_files_only=True)
        said = [w for w in warnings_of(caplog) if "not the job's" in w]
        assert len(said) == 1 and all(rel.rsplit("/", 1)[1] in said[0] for rel in foreign)
        compact(out)                            # the run's last compaction: no second warning
        assert len([w for w in warnings_of(caplog) if "not the job's" in w]) == 1
        caplog.clear()
    m.drop_stale_rows(out)
    history = read_metrics(out)
    reader = MetricsReader(out, ["id", "status"])
    assert sorted(reader.read()["id"]) == sorted(history["id"]) == ids    # no null id, no x1
    assert sorted(b["id"].tolist()[0] for b in iter_metrics(out, rows=1)) == ids
    assert not {"attribute", "count"} & set(m.metrics_schema(out).names)
    assert sorted(u.as_dict()["file"] for u in reader.foreign) == sorted(foreign)
    assert reader.damaged == [] and m.quarantined(out) == []
    ours = [f.rows for f in metrics_files(out) if f"metrics/{f.name}" not in foreign]
    assert ours == [16]                         # ours, merged: r008-r011 written twice
    for rel, data in foreign.items():
        assert get_bytes(out, rel) == data, rel                            # byte for byte


def cut(data: bytes) -> bytes:
    return data[:len(data) // 2]


def bad_footer(data: bytes) -> bytes:
    """The footer's length says 4 bytes of thrift that do not decode (Arrow: OSError)."""
    return data[:-8] + (4).to_bytes(4, "little") + b"PAR1"


@pytest.mark.parametrize("storage,kind", [("local", "cut batch file"), ("local", "cut merged file"),
                                          ("local", "bad footer"), ("local", "not parquet"),
                                          ("s3", "cut batch file"), ("s3", "cut merged file")],
                         indirect=["storage"])
def test_a_damaged_metrics_file_is_skipped_by_readers_and_quarantined_by_compaction(
        storage, kind, caplog):
    """A file of the job's name that is not readable Parquet: every read-only reader skips
    it, names it and leaves it; the driver's compaction moves it, whole, to
    quarantine/metrics/ with a record (file, size, reason, at); its ids are no longer
    complete. The other rows stay, once."""
    from pipeline.output.ledger import HISTORY_COLUMNS, pending_rows
    caplog.set_level(logging.INFO, logger=m.__name__)
    uri, options = storage
    out = Output(uri, options)
    ids = [f"r{k:02d}" for k in range(12)]
    write_batches(out, ids[:8])
    if kind == "cut merged file":
        compact(out)                            # r00-r07 in one merged file
    write_batches(out, ids[8:], at=20.0)
    victim = next(f for f in metrics_files(out) if f.rows is not None) \
        if kind == "cut merged file" else metrics_files(out)[0]
    lost = set(pq.read_table(victim.path, filesystem=out.fs)["id"].to_pylist())
    damage = {"cut batch file": cut, "cut merged file": cut, "bad footer": bad_footer,
              "not parquet": lambda d: b"id,status\nr00,ok\n"}[kind]
    rel = f"metrics/{victim.name}"
    damaged = damage(get_bytes(out, rel))
    put_bytes(out, rel, damaged)

    want = sorted(set(ids) - lost)              # readers: skip it, say it, never move it
    assert sorted(read_metrics(out)["id"]) == want
    assert sorted(read_metrics(out, ["id"], ids=ids)["id"]) == want
    assert sorted(i for b in iter_metrics(out, rows=3) for i in b["id"]) == want
    reader = MetricsReader(out, ["id", "status"])
    assert sorted(reader.read()["id"]) == want
    [seen] = reader.damaged
    assert seen.as_dict()["file"] == rel and seen.size == len(damaged) and reader.foreign == []
    assert "not readable as Parquet" in seen.reason
    assert any(victim.name in w and "skipped" in w for w in warnings_of(caplog))
    assert get_bytes(out, rel) == damaged and m.quarantined(out) == []

    caplog.clear()
    compact(out, batch_files_only=True)         # the driver's: set aside, named
    assert not out.fs.exists(victim.path)
    assert get_bytes(out, f"quarantine/metrics/{victim.name}") == damaged      # never lost
    [record] = m.quarantined(out)
    assert record["file"] == rel and record["size"] == len(damaged)
    assert "not readable as Parquet" in record["reason"] and record["at"] > 0
    assert any(victim.name in w and "quarantine/metrics" in w for w in warnings_of(caplog))
    history = read_metrics(out, HISTORY_COLUMNS)
    assert sorted(history["id"]) == want
    todo = pending_rows(pd.DataFrame({"id": ids}), history, retry_errors=False)
    assert set(todo["id"]) == lost                                  # to be edited again
    assert sorted(every_row(out)["id"]) == want                     # the rest: once each
    reader.read()
    assert reader.damaged == []


# ---- through the real driver -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow                      # ~45 s on 2 cores: Ray's start, six tiny edits
def test_a_run_redoes_the_rows_of_a_cut_metrics_file_and_leaves_foreign_files_alone(
        ray_local, tiny32, tmp_path, caplog):
    """An earlier run's actor wrote two batch files; one is cut in half (another tool
    crashed mid-write), and foreign files lie beside them. `run_job` sets the cut file
    aside with its record, edits its rows again (and the rows never done), leaves the
    other file's rows as they were, and never reads, merges or deletes a foreign file."""
    from helpers import SHORT, write_photos

    from manifests.schema import read_manifest, write_manifest
    from pipeline.engine.rows import passthrough_columns
    from pipeline.output.metrics import passthrough_schema
    from pipeline.runner.driver import run_job
    from pipeline.runner.plan import plan_job
    from pipeline.runner.spec import JobSpec
    from pipeline.runner.stage import EditStage
    caplog.set_level(logging.INFO, logger=m.__name__)
    photos = write_photos(tmp_path, 1)
    ids = [f"r{k}" for k in range(6)]
    write_manifest(pd.DataFrame({"id": ids, "image_uri": [str(photos / "p0.png")] * 6,
                                 "attributes": [["smiling"]] * 6, "targets": [[1.0]] * 6}),
                   str(tmp_path / "m.parquet"))
    manifest = read_manifest(str(tmp_path / "m.parquet"))
    job = JobSpec(manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"),
                  models=str(tiny32 / "models.yaml"), edit=SHORT, batch_size=2, actors=1)
    out = Output(job.output)
    rows = manifest.rows
    schema = passthrough_schema(manifest.schema, passthrough_columns(rows.columns))
    for batch in (["r0", "r1"], ["r2", "r3"]):                 # the earlier run's batches
        done = rows[rows["id"].isin(batch)].reset_index(drop=True)
        assert (EditStage(job, plan_job(done, job, schema))(done)["status"] == "ok").all()
    kept = read_metrics(out).set_index("id")["written_at"]
    victim = next(f for f in metrics_files(out) if "r0" in
                  pq.read_table(f.path)["id"].to_pylist())
    damaged = cut(Path(victim.path).read_bytes())
    Path(victim.path).write_bytes(damaged)
    foreign = foreign_files()
    for rel, data in foreign.items():
        put_bytes(out, rel, data)

    summary = run_job(rows, job, manifest.schema)
    assert summary["manifest"] == {"rows": 6, "ok": 6, "error": 0, "pending": 0}
    assert summary["this_run"]["ok"] == 4 and summary["this_run"]["skipped_already_done"] == 2
    after = read_metrics(out).set_index("id")
    assert sorted(after.index) == ids and (after["status"] == "ok").all()
    assert after.loc[["r2", "r3"], "written_at"].tolist() == kept[["r2", "r3"]].tolist()
    assert (after.loc[["r0", "r1"], "written_at"] > kept.max()).all()       # redone
    assert get_bytes(out, f"quarantine/metrics/{victim.name}") == damaged
    [record] = m.quarantined(out)
    assert record["file"] == f"metrics/{victim.name}" and record["size"] == len(damaged)
    for rel, data in foreign.items():
        assert get_bytes(out, rel) == data, rel
    said = [w for w in warnings_of(caplog) if "not the job's" in w]
    assert len(said) == 1 and "by_attribute.parquet" in said[0] and "notes.txt" in said[0]
