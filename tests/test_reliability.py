"""Reliability and security of the main job, end to end: a real local Ray (two logical
GPUs), a real S3 server (moto) behind the project's fault-injecting proxy
(tests/s3_faults.py), faults injected into the workers (tests/faults.py).

One bad input fails its row alone; an actor SIGKILLed mid-batch loses and duplicates
nothing; storage faults are retried a bounded number of times, and persistent ones end
rows or the job, never hang it; K batches failing alike stop the job and a rerun
resumes; no URI outside `inputs.allow` is ever requested; credentials reach no output
and no log. The node-loss test is in tests/test_cluster.py (a multi-node cluster).
"""
import logging
import os
import shutil
import tempfile
import threading
import time
from argparse import Namespace
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from corpus import BIG_LIMIT, PHOTO, bad_files, encoded, odd_images, photo
from faults import ENGINE_ERROR, FAIL_SEED
from helpers import SHORT
from s3_faults import FaultProxy

from jobs.run import run_command
from manifests.schema import write_manifest
from pipeline.output.metrics import metrics_paths
from pipeline.output.layout import Output
from pipeline.store.storage import S3_ATTEMPTS, S3FS_RETRIES

BUCKET = "reliability"
# Recognisable fake credentials: every worker has them; no output or log may.
FAKE = {"AWS_ACCESS_KEY_ID": "AKIAFAKELEAKCHECK7Q2X",
        "AWS_SECRET_ACCESS_KEY": "fakeSecretLEAKCHECKq9w8e7r6t5y4u3i2o1p0",
        "AWS_SESSION_TOKEN": "FakeSessionTokenLEAKCHECKzz99yy88",
        "RAY_AUTH_TOKEN": "feedfacecafebeef" * 4}
# Where the rows of this module's manifests lie, recorded in each (`job`): the photo the
# repo ships, and this module's bucket.
ROOTS = (str(PHOTO.parent), f"s3://{BUCKET}/")
OUTPUTS: list[Path] = []          # every local output of this module: searched for FAKE
TRANSCRIPTS: list[str] = []       # every job's captured stdout/stderr: searched for FAKE


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server["endpoint"]) as p:
        s3_server["fs"].mkdir(BUCKET)
        yield p


@pytest.fixture(scope="module")
def cluster(s3_server, proxy):
    """Ray with the fake credentials in every process, its logs in a folder of its own,
    and tests/faults.py installed in its workers."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state
    saved = {k: os.environ.get(k) for k in FAKE}
    os.environ.update(FAKE)
    reset_auth_token_state()          # Ray caches the token per process: read it anew
    temp = Path(tempfile.mkdtemp(prefix="mfrel-", dir="/tmp"))     # short: Ray's sockets
    (temp / "faults").mkdir()
    tests = str(Path(__file__).parent)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=str(temp / "ray"),
             runtime_env={"worker_process_setup_hook": "faults.install",
                          "env_vars": {"PYTHONPATH": tests, "MASKFACE_FAULT_DIR":
                                       str(temp / "faults")}})
    yield {"temp": temp, "faults": temp / "faults", "ray": ray}
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_auth_token_state()          # later modules' Ray: their own token again
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def counting_http():
    """A loopback HTTP server that serves a real photo and counts every request."""
    hits = []
    body = encoded(photo(), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_HEAD = do_GET

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def rows_of(ids, uris, **extra):
    return pd.DataFrame({"id": ids, "image_uri": uris, "attributes": [["smiling"]] * len(ids),
                         "targets": [[1.0]] * len(ids), **extra})


def job(tmp_path, rows, models, capfd, *extra, retry_errors=False, roots=ROOTS, **keys):
    """Write the manifest and spec, run `maskface run`, keep what it printed. No HTML
    report: it reads inputs again, which would blur the request counts these tests make.
    The manifest records `roots` as the folders of its inputs, as a builder does (without
    inputs.allow a job reads only under them and the manifest's folder)."""
    write_manifest(rows, str(tmp_path / "m.parquet"), input_roots=roots)
    keys.setdefault("edit", SHORT)
    keys.setdefault("batch_size", 2)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"manifest": str(tmp_path / "m.parquet"),
                                    "models": str(models / "models.yaml"), **keys}))
    if not keys["output"].startswith("s3://"):
        OUTPUTS.append(Path(keys["output"]))
    rc = run_command(Namespace(spec=str(spec), set=list(extra), address=None,
                               retry_errors=retry_errors, no_report=True))
    captured = capfd.readouterr()
    TRANSCRIPTS.append(captured.out + captured.err)
    return rc, captured.out + captured.err


def every_row(output, storage_options=None):
    """Every metrics row in every file (not one per id, as read_metrics gives)."""
    out = Output(output, storage_options)
    return pd.concat([pq.read_table(f, filesystem=out.fs).to_pandas()
                      for f in metrics_paths(out)], ignore_index=True)


def s3_options(proxy):
    return {"client_kwargs": {"endpoint_url": proxy.endpoint}}


# ---- inputs: each bad one fails its row alone; a killed actor loses nothing -------------
def test_each_bad_input_fails_alone_and_a_killed_actor_loses_and_duplicates_nothing(
        cluster, proxy, s3_server, counting_http, tiny32, tmp_path, capfd):
    corpus = tmp_path / "corpus"
    odd, bad = odd_images(corpus / "odd"), bad_files(corpus / "bad")
    fs = s3_server["fs"]
    fs.pipe_file(f"{BUCKET}/in/photo.png", PHOTO.read_bytes())
    fs.pipe_file(f"{BUCKET}/in/denied.png", PHOTO.read_bytes())
    fs.pipe_file(f"{BUCKET}/in/big.png", bad["big.png"][0].read_bytes())
    proxy.add("HEAD", rf"/{BUCKET}/in/denied\.png", "403")
    proxy.add("GET", rf"/{BUCKET}/in/denied\.png", "403")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "photo.png").write_bytes(PHOTO.read_bytes())
    http, hits = counting_http

    expect = {f"odd-{n.replace('.', '-')}": (str(p), None) for n, p in odd.items()}
    expect.update({"shipped-photo": (str(PHOTO), None), "kill-photo": (str(PHOTO), None),
                   "s3-photo": (f"s3://{BUCKET}/in/photo.png", None)})
    expect.update({f"bad-{n.replace('.', '-')}": (str(p), words)
                   for n, (p, words) in bad.items()})
    expect.update({
        "s3-denied": (f"s3://{BUCKET}/in/denied.png", "access denied"),
        "s3-no-bucket": ("s3://no-such-bucket-mf/photo.png", "not found"),
        "s3-big": (f"s3://{BUCKET}/in/big.png", f"over the limit of {BIG_LIMIT:,}: refused "
                                                 "before reading"),
        "http-loopback": (f"{http}/photo.png", "refused: not under any inputs.allow prefix"),
        "outside-allow": (str(elsewhere / "photo.png"), "refused: not under any inputs.allow"),
        "dot-dot": (f"{corpus}/odd/../../elsewhere/photo.png", "refused: not under any"),
    })
    ids = sorted(expect)
    rc, log = job(tmp_path, rows_of(ids, [expect[i][0] for i in ids]), tiny32, capfd,
                  output=str(tmp_path / "out"), batch_size=4, storage_options=s3_options(proxy),
                  inputs={"allow": [str(corpus), str(PHOTO.parent), f"s3://{BUCKET}/in",
                                    "s3://no-such-bucket-mf/"], "max_bytes": BIG_LIMIT})
    assert rc == 1, log[-3000:]                        # rows in error, none pending
    rows = every_row(str(tmp_path / "out"))
    assert sorted(rows["id"]) == ids                   # exactly one metrics row per id
    rows = rows.set_index("id")
    for rid, (uri, words) in expect.items():
        status, error = rows.loc[rid, "status"], rows.loc[rid, "error"]
        if words is None:
            assert status == "ok", (rid, error)
            assert Path(tmp_path, "out", "images", f"{rid}.png").is_file()
        else:
            assert status == "error" and words in error, (rid, error)
            assert not Path(tmp_path, "out", "images", f"{rid}.png").exists()
    assert (cluster["faults"] / "kill-photo.npy").exists()     # the actor was killed there
    assert hits == []                                           # no request was made
    assert proxy.attempts("GET", r"/in/big\.png") == 0          # its size sufficed
    assert proxy.attempts("HEAD", r"/in/denied\.png") == 1      # a 403 is not retried
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    ok = sum(words is None for _, words in expect.values())
    assert (ok, len(ids) - ok) == (17, 18)             # 14 odd images + 3; 18 bad inputs
    assert summary["manifest"] == {"rows": len(ids), "ok": ok, "error": len(ids) - ok,
                                   "pending": 0}
    proxy.clear()


# ---- S3 faults: retried, bounded; persistent ones end rows, or the job -------------------
def test_s3_faults_are_retried_a_bounded_number_of_times_then_end_their_rows(
        cluster, proxy, s3_server, tiny32, tmp_path, capfd):
    fs = s3_server["fs"]
    ids = ["p0", "p1", "p2", "s0", "s1", "s2", "s3"]
    for rid in ids:
        fs.pipe_file(f"{BUCKET}/faults/in/{rid}.png", PHOTO.read_bytes())
    out = f"s3://{BUCKET}/faults/out"
    transient = [("GET", "/in/s0", "500", 2), ("HEAD", "/in/s1", "500", 1),
                 ("GET", "/in/s2", "slowdown", 2), ("GET", "/in/s3", "drop", 1),
                 ("PUT", "/out/images/s0", "500", 2), ("PUT", "/out/latents/s1", "slowdown", 2),
                 ("PUT", "/out/masks/s2", "drop-body", 1), ("PUT", "/out/metrics/", "drop", 1)]
    for method, path, fault, times in transient:
        proxy.add(method, path, fault, times)
    proxy.add("GET", "/in/p0", "500")                 # persistent: 5xx on a read
    proxy.add("PUT", "/out/latents/p1", "500")        # persistent: 5xx on a write, mid-row
    proxy.add("GET", "/in/p2", "drop")                # persistent: dropped connections
    started = time.time()
    rc, log = job(tmp_path, rows_of(ids, [f"s3://{BUCKET}/faults/in/{i}.png" for i in ids]),
                  tiny32, capfd, output=out, storage_options=s3_options(proxy))
    assert time.time() - started < 300
    assert rc == 1, log[-3000:]
    opts = {**s3_server["options"], "client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    rows = every_row(out, opts).set_index("id")
    assert sorted(rows.index) == sorted(ids)
    assert (rows.loc[["s0", "s1", "s2", "s3"], "status"] == "ok").all(), rows["error"].to_dict()
    # transient faults: exactly one more attempt per fault (a dropped connection may be
    # sent once more by the HTTP client)
    assert proxy.attempts("GET", "/in/s0") == 3 and proxy.attempts("HEAD", "/in/s1") == 2
    assert proxy.attempts("GET", "/in/s2") == 3 and 2 <= proxy.attempts("GET", "/in/s3") <= 3
    assert proxy.attempts("PUT", "/out/images/s0") == 3
    assert proxy.attempts("PUT", "/out/latents/s1") == 3
    assert 2 <= proxy.attempts("PUT", "/out/masks/s2") <= 3
    # one metrics PUT dropped once: one request more than the batch files written (the
    # driver merges them into one at the end: a PUT of its own, not counted here)
    parts = [path for method, path, _ in proxy.log
             if method == "PUT" and "/out/metrics/part-" in path]
    assert len(parts) == len(set(parts)) + 1
    assert [f.rsplit("/", 1)[-1][:8] for f in metrics_paths(Output(out, opts))] == ["compact-"]
    # persistent faults: the rows end in error with the storage's reason, after a bounded
    # number of attempts (pipeline/store/storage.py): S3_ATTEMPTS on 5xx; on dropped connections
    # S3_ATTEMPTS x S3FS_RETRIES^2 for a read (s3fs wraps it twice), each sent up to twice
    assert "storage error while reading" in rows.loc["p0", "error"]
    assert "internal error" in rows.loc["p0", "error"]
    assert proxy.attempts("GET", "/in/p0") == S3_ATTEMPTS
    assert "ConnectionClosedError" in rows.loc["p2", "error"]
    assert S3_ATTEMPTS * S3FS_RETRIES ** 2 <= proxy.attempts("GET", "/in/p2") \
        <= 2 * S3_ATTEMPTS * S3FS_RETRIES ** 2
    # a write that failed mid-row: its image is there, its row is not complete (error)
    assert rows.loc["p1", "status"] == "error"
    assert "writing outputs" in rows.loc["p1", "error"] and "latents/p1.npy" in rows.loc["p1", "error"]
    assert proxy.attempts("PUT", "/out/latents/p1") == S3_ATTEMPTS
    assert fs.exists(f"{BUCKET}/faults/out/images/p1.png")
    assert not fs.exists(f"{BUCKET}/faults/out/latents/p1.npy")


# The retry budget, row by row as docs/reliability.md gives it: (method, fault, requests
# one operation makes before it fails). Counted by the fault proxy on one operation at a
# time (a read: HEAD then GET; a write: one PUT), through the job's own storage calls.
RETRY_BUDGET = [
    ("GET", "500", S3_ATTEMPTS), ("HEAD", "500", S3_ATTEMPTS), ("PUT", "500", S3_ATTEMPTS),
    ("GET", "slowdown", S3_ATTEMPTS * S3FS_RETRIES),
    ("PUT", "slowdown", S3_ATTEMPTS * S3FS_RETRIES),
    ("HEAD", "drop", 2 * S3_ATTEMPTS * S3FS_RETRIES),
    ("PUT", "drop", 2 * S3_ATTEMPTS * S3FS_RETRIES),
    ("GET", "drop", 2 * S3_ATTEMPTS * S3FS_RETRIES ** 2),
    ("GET", "403", 1),
]


@pytest.fixture
def s3_credentials(monkeypatch):
    """What a worker has: credentials in its environment (moto takes any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.mark.parametrize("method,fault,requests", RETRY_BUDGET)
def test_each_row_of_the_retry_budget_is_exactly_the_requests_made(proxy, s3_server,
                                                                   s3_credentials, method,
                                                                   fault, requests):
    """A persistent fault: exactly the documented number of requests, then the storage
    error. The same fault once: exactly one request more, then success (but a 403, which
    is no retried fault)."""
    from pipeline.errors import StorageError
    from pipeline.store.storage import read_bytes
    fs, opts = s3_server["fs"], s3_options(proxy)
    fs.pipe_file(f"{BUCKET}/budget/x.png", PHOTO.read_bytes())

    def operation(k):
        if method == "PUT":
            Output(f"s3://{BUCKET}/budget/out{k}", opts).put("images/a.png", b"y" * 5000)
        else:
            read_bytes(f"s3://{BUCKET}/budget/x.png", 10 ** 7, opts)
    try:
        proxy.add(method, "/budget/", fault)
        with pytest.raises(StorageError):
            operation(0)
        assert proxy.attempts(method, "/budget/") == requests
        if requests > 1:
            proxy.clear()
            proxy.add(method, "/budget/", fault, times=1)
            operation(1)
            assert proxy.attempts(method, "/budget/") == 2
    finally:
        proxy.clear()


def test_a_missing_object_is_asked_for_once(proxy, s3_server, s3_credentials):
    """404: one HEAD, not retried; s3fs then lists the prefix once, to tell a missing file
    from a folder."""
    from pipeline.errors import StorageError
    from pipeline.store.storage import read_bytes
    try:
        with pytest.raises(StorageError, match="not found"):
            read_bytes(f"s3://{BUCKET}/budget/missing.png", 10 ** 7, s3_options(proxy))
        assert [(m, p.split("?")[0]) for m, p, _ in proxy.log] == [
            ("HEAD", f"/{BUCKET}/budget/missing.png"), ("GET", f"/{BUCKET}")]
    finally:
        proxy.clear()


def test_an_output_that_cannot_be_written_stops_the_job_as_a_setup_error(
        cluster, proxy, s3_server, tiny32, tmp_path, capfd):
    s3_server["fs"].pipe_file(f"{BUCKET}/stop/in/a.png", PHOTO.read_bytes())
    rows = rows_of(["a0", "a1"], [f"s3://{BUCKET}/stop/in/a.png"] * 2)
    out = f"s3://{BUCKET}/stop/out"
    proxy.add("PUT", "/stop/out/job.json", "500")
    rc, log = job(tmp_path, rows, tiny32, capfd, output=out, storage_options=s3_options(proxy))
    assert rc == 2 and "the output cannot be written" in log and "nothing was run" in log
    assert proxy.attempts("GET", "/stop/in/") == 0             # no row ran
    proxy.clear()
    proxy.add("PUT", "/stop/out/metrics/", "500")               # nothing can be recorded
    started = time.time()
    rc, log = job(tmp_path, rows, tiny32, capfd, output=out, storage_options=s3_options(proxy),
                  actors=1)
    assert rc == 2, log[-3000:]
    assert time.time() - started < 180                          # ended, did not hang
    assert "error: the job stopped: cannot write the metrics of 2 row(s)" in log
    assert "Nothing can be recorded" in log
    assert not s3_server["fs"].exists(f"{BUCKET}/stop/out/metrics")
    summary = s3_server["fs"].cat_file(f"{BUCKET}/stop/out/summary.json").decode()
    assert '"stopped"' in summary and '"pending": 2' in summary    # a rerun will do them
    proxy.clear()


# ---- the failure streak: K whole batches failing alike ----------------------------------
def test_a_full_output_disk_stops_the_job_with_exit_2_naming_the_output(
        cluster, proxy, s3_server, tiny32, tmp_path, capfd, caplog):
    """The output fills up mid-run: every write of a metrics file and of summary.json
    fails (a full disk, a revoked bucket policy). The first cause, the metrics that cannot
    be written, is what the job says, with exit code 2; summary.json failing after it is
    logged and replaces nothing."""
    s3_server["fs"].pipe_file(f"{BUCKET}/full/in/a.png", PHOTO.read_bytes())
    rows = rows_of(["f0", "f1"], [f"s3://{BUCKET}/full/in/a.png"] * 2)
    out = f"s3://{BUCKET}/full/out"
    proxy.add("PUT", "/full/out/metrics/", "500")
    proxy.add("PUT", "/full/out/summary.json", "500")
    try:
        with caplog.at_level("WARNING", logger="pipeline.runner.driver"):
            rc, log = job(tmp_path, rows, tiny32, capfd, output=out,
                          storage_options=s3_options(proxy), actors=1)
        assert proxy.attempts("PUT", "/full/out/summary.json") >= 1     # it was tried, and failed
    finally:
        proxy.clear()
    assert rc == 2, log[-3000:]
    assert "error: the job stopped: cannot write the metrics of 2 row(s)" in log
    assert "the output cannot be written" in log
    assert any("summary.json could not be written either" in r.getMessage()
               for r in caplog.records)
    assert not s3_server["fs"].exists(f"{BUCKET}/full/out/summary.json")
    assert not s3_server["fs"].exists(f"{BUCKET}/full/out/lease.json")     # let go


def test_k_batches_failing_alike_stop_the_job_and_a_rerun_resumes(cluster, tiny32, tmp_path,
                                                                  capfd):
    ids = [f"a{k}" for k in range(4)] + [f"f{k}" for k in range(6)]
    seeds = [1] * 4 + [FAIL_SEED] * 6                           # f*: the engine raises
    rows = rows_of(ids, [str(PHOTO)] * len(ids), seed=seeds)
    out = str(tmp_path / "out")
    rc, log = job(tmp_path, rows, tiny32, capfd, output=out, actors=1,
                  stop_after_failed_batches=2)
    assert rc == 2, log[-3000:]
    assert "error: the job stopped: 2 batches in a row failed with RuntimeError" in log
    assert ENGINE_ERROR in log and "--retry-errors" in log
    done = every_row(out).set_index("id")
    assert sorted(done.index) == ["a0", "a1", "a2", "a3", "f0", "f1"]
    assert (done.loc[["a0", "a1", "a2", "a3"], "status"] == "ok").all()
    assert (done.loc[["f0", "f1"], "error"] == f"batch failed: RuntimeError: {ENGINE_ERROR}").all()
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["manifest"]["pending"] == 4 and "2 batches in a row" in summary["stopped"]
    # the cause fixed (here: the rows' seeds), a rerun with --retry-errors does the rest
    rc, log = job(tmp_path, rows.assign(seed=list(range(len(ids)))), tiny32, capfd,
                  retry_errors=True, output=out, actors=1, stop_after_failed_batches=2)
    assert rc == 0, log[-3000:]
    after = every_row(out).set_index("id")
    assert sorted(after.index) == sorted(ids) and (after["status"] == "ok").all()
    for rid in ("a0", "a1", "a2", "a3"):                        # complete rows: untouched
        assert after.loc[rid, "written_at"] == done.loc[rid, "written_at"]


# ---- what a job may read, through `maskface run` ---------------------------------------
@contextmanager
def opened(fifo: Path):
    """`fifo` made a named pipe, and the list of the times a reader opened it: a writer
    thread waits for each reader (and lets it read nothing). No request, no list entry."""
    os.mkfifo(fifo)
    opens: list[float] = []
    done = threading.Event()

    def serve():
        while True:
            fd = os.open(fifo, os.O_WRONLY)            # returns once a reader opens it
            if done.is_set():
                os.close(fd)
                return
            opens.append(time.time())
            os.close(fd)
    writer = threading.Thread(target=serve, daemon=True)
    writer.start()
    try:
        yield opens
    finally:
        done.set()
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)    # the writer's last wait ends
        writer.join(10)
        os.close(fd)


def ways_out(tmp_path, elsewhere):
    """A row inside the manifest's folder (tmp_path), and the four ways out of it to
    `elsewhere/photo.png`: a symlink, `..`, an absolute path, file://."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(PHOTO.read_bytes())
    (tmp_path / "in" / "link.png").symlink_to(elsewhere / "photo.png")
    return {"inside": str(tmp_path / "in" / "photo.png"),
            "symlink": str(tmp_path / "in" / "link.png"),
            "dot-dot": f"{tmp_path}/../{elsewhere.name}/photo.png",
            "absolute": str(elsewhere / "photo.png"),
            "file-uri": f"file://{elsewhere}/photo.png"}


def said(caplog, level=logging.INFO):
    """Our own log records at `level` or above (Ray's are its own)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= level
            and r.name.split(".")[0] in ("pipeline", "manifests", "jobs", "models")]


def test_without_an_allow_list_a_job_reads_only_under_the_manifests_folders(
        cluster, counting_http, tiny32, tmp_path, tmp_path_factory, capfd, caplog):
    """The default rule, through `maskface run`: the rows under the manifest's folder and
    under the root it records are read; a symlink out of them, `..`, an absolute path,
    file:// and an http URI each fail on their own row with the rule named, and none is
    opened (their target is a named pipe that counts its readers; the HTTP server counts
    requests). Said once in the log, before any work, and no warning."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    recorded = tmp_path_factory.mktemp("recorded")
    (recorded / "photo.png").write_bytes(PHOTO.read_bytes())
    http, hits = counting_http
    uris = {**ways_out(tmp_path, elsewhere), "recorded": str(recorded / "photo.png"),
            "http": f"{http}/photo.png"}
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    with opened(elsewhere / "photo.png") as opens:
        rc, log = job(tmp_path, rows_of(list(uris), list(uris.values())), tiny32, capfd,
                      output=str(out), actors=1, roots=[str(recorded)])
    assert rc == 1, log[-3000:]
    rows = every_row(str(out)).set_index("id")
    assert (rows.loc[["inside", "recorded"], "status"] == "ok").all()
    rule = (f"refused: outside the manifest's folder {os.path.realpath(tmp_path)} and the "
            f"roots it records ({os.path.realpath(recorded)}); list it in inputs.allow")
    for rid in ("symlink", "dot-dot", "absolute", "file-uri"):
        assert rows.loc[rid, "status"] == "error"
        assert rows.loc[rid, "error"] == f"{uris[rid]}: {rule}", rows.loc[rid, "error"]
    assert "refused: http:// inputs must be listed in inputs.allow" in rows.loc["http", "error"]
    assert opens == [] and hits == []                        # nothing refused was read
    lines = said(caplog)
    where = [k for k, line in enumerate(lines)
             if line.startswith("inputs: reading only under the manifest's folder")]
    work = next(k for k, line in enumerate(lines) if "already complete" in line)
    assert len(where) == 1 and where[0] < work                # once, before any work
    assert said(caplog, logging.WARNING) == []
    job_json = yaml.safe_load((out / "job.json").read_text())
    assert job_json["spec"]["inputs"]["allow"] is None
    assert "reads_outside_manifest_folder" not in job_json


def test_inputs_allow_any_reads_outside_the_manifests_folders_and_warns_once(
        cluster, counting_http, tiny32, tmp_path, tmp_path_factory, capfd, caplog):
    """The opt-out (`--set 'inputs.allow=[any]'`): the same four ways out are read, one
    warning says so, job.json records it; an http URI is still refused unread."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "photo.png").write_bytes(PHOTO.read_bytes())
    http, hits = counting_http
    uris = {**ways_out(tmp_path, elsewhere), "http": f"{http}/photo.png"}
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    rc, log = job(tmp_path, rows_of(list(uris), list(uris.values())), tiny32, capfd,
                  "inputs.allow=[any]", output=str(out), actors=1, roots=())
    assert rc == 1, log[-3000:]
    rows = every_row(str(out)).set_index("id")
    assert (rows.drop(index="http")["status"] == "ok").all(), rows["error"].to_dict()
    assert "refused: http:// inputs must be listed in inputs.allow" in rows.loc["http", "error"]
    assert hits == []
    warned = said(caplog, logging.WARNING)
    assert len(warned) == 1 and warned[0].startswith("inputs.allow: [any]: this job may read")
    assert yaml.safe_load((out / "job.json").read_text())["spec"]["inputs"]["allow"] == ["any"]


def test_with_an_allow_list_a_symlink_out_of_it_is_refused_before_any_read(
        cluster, tiny32, tmp_path, tmp_path_factory, capfd, caplog):
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "photo.png").write_bytes(PHOTO.read_bytes())           # a good image
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "photo.png").write_bytes(PHOTO.read_bytes())
    (allowed / "link.png").symlink_to(outside / "photo.png")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    rc, log = job(tmp_path, rows_of(["inside", "symlink"], [str(allowed / "photo.png"),
                                                             str(allowed / "link.png")]),
                  tiny32, capfd, output=str(out), actors=1, inputs={"allow": [str(allowed)]})
    assert rc == 1, log[-3000:]
    rows = every_row(str(out)).set_index("id")
    assert rows.loc["inside", "status"] == "ok"
    assert rows.loc["symlink", "status"] == "error"
    assert "link.png: refused: not under any inputs.allow prefix" in rows.loc["symlink", "error"]
    assert f"inputs: reading only under inputs.allow: {allowed}" in said(caplog)


# ---- lost workers, past every resume --------------------------------------------------------
def test_a_row_that_kills_every_actor_ends_the_job_after_the_resumes_run_out(
        cluster, tiny32, tmp_path, capfd, caplog, monkeypatch):
    """A row whose bytes kill the process each time (tests/faults.py `die-*`): Ray gives
    its batch up, the job resumes on what is left, and once the resumes run out it stops
    as a setup error; the rows that finished stay complete, the bad one pending, and a
    rerun without it completes the rest. The retry counts are the job's own constants,
    made small here so that the test takes seconds instead of minutes."""
    from pipeline.runner import driver
    monkeypatch.setattr(driver, "ACTOR_TASK_RETRIES", 0)
    monkeypatch.setattr(driver, "RESUMES_AFTER_LOSS", 1)
    monkeypatch.setattr(driver, "NODE_LOSS_WAIT_S", 1.0)
    ids = ["a0", "a1", "die-0"]
    rows = rows_of(ids, [str(PHOTO)] * 3)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="pipeline.runner.driver")
    rc, log = job(tmp_path, rows, tiny32, capfd, output=str(out), actors=1, batch_size=1)
    assert rc == 2, log[-3000:]
    assert "error: the job stopped: Ray lost edit workers 2 times" in log
    resumes = [r for r in caplog.records if r.name == "pipeline.runner.driver"
               and r.getMessage().startswith("lost edit workers (")]
    assert len(resumes) == 1                                     # one resume, then the end
    done = every_row(str(out)).set_index("id")
    assert "die-0" not in done.index and (done["status"] == "ok").all()
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert "Ray lost edit workers" in summary["stopped"]
    assert summary["manifest"]["pending"] == 3 - len(done)
    rc, log = job(tmp_path, rows[rows["id"] != "die-0"], tiny32, capfd, output=str(out),
                  actors=1, batch_size=1)
    assert rc == 0, log[-3000:]
    after = every_row(str(out))
    assert sorted(after["id"]) == ["a0", "a1"]                   # no duplicate, none lost


# ---- credentials: in every process, in no output and no log -------------------------------
def test_credentials_reach_no_output_and_no_log(cluster, proxy, s3_server):
    """Runs last: searches what every job of this module wrote and logged (bad inputs, a
    killed actor, S3 faults, a job stopped twice, an early stop)."""
    ray = cluster["ray"]
    workers_env = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in FAKE}).remote())
    assert workers_env == FAKE                                   # the workers had them
    assert TRANSCRIPTS and OUTPUTS
    texts = {f"transcript {k}": t for k, t in enumerate(TRANSCRIPTS)}
    for root in [*OUTPUTS, cluster["temp"] / "ray"]:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                texts[str(path)] = path.read_bytes().decode("latin-1")
    fs = s3_server["fs"]
    for key in fs.find(BUCKET):
        texts[f"s3://{key}"] = fs.cat_file(key).decode("latin-1")
    assert any("session_" in name and name.endswith(".log") for name in texts)   # Ray's logs
    assert any(name.endswith("job.json") for name in texts)
    for name, text in texts.items():
        for key, value in FAKE.items():
            assert value not in text, f"{key} found in {name}"
