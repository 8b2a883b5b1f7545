"""`maskface status` and the driver's progress: the figures, from real metrics files on
local disk and on a real S3 server (moto). The same command against a job in progress on
a real cluster is in tests/test_cluster.py."""
import io
import json
import logging
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from jobs.cli import main
from manifests.schema import write_manifest
from pipeline.output.metrics import METRICS_SCHEMA, write_metrics
from pipeline.output.layout import Output
from pipeline.output.figures import Figures, rates
from pipeline.runner.progress import DriverProgress
from pipeline.results.status import compute_status, read_status, render

NOW = 1_800_000_000.0          # a fixed clock: every figure below is exact


def metrics_rows(specs):
    """Metrics rows with only the columns status reads; the rest null (as for error rows)."""
    rows = pd.DataFrame([{name: None for name in METRICS_SCHEMA.names} for _ in specs])
    for k, (rid, status, node, actor, at) in enumerate(specs):
        rows.loc[k, ["id", "status", "node", "actor", "written_at"]] = [rid, status, node,
                                                                       actor, at]
        rows.loc[k, "error"] = f"not a readable image: {rid}.png" if status == "error" else None
    rows["written_at"] = rows["written_at"].astype(float)
    return rows


def write_job(out: Output, specs, started_at, manifest="m.parquet", batch=2):
    out.put_json("job.json", {"settings": {"manifest": manifest}, "started_at": started_at,
                              "rows": 0})
    for k in range(0, len(specs), batch):                 # one metrics file per batch, as actors do
        write_metrics(out, metrics_rows(specs[k:k + batch]), METRICS_SCHEMA)


def manifest_of(ids, path, storage_options=None):
    write_manifest(pd.DataFrame({"id": ids, "image_uri": ["x.png"] * len(ids),
                                 "attributes": [["smiling"]] * len(ids),
                                 "targets": [[1.0]] * len(ids)}), path, storage_options)
    return path


# 6 rows of a 10-row manifest: 2 from an earlier run, 4 from this one (started NOW-1200 s),
# 3 of those in the last 10 minutes; one error; plus a row of another manifest.
START = NOW - 1200
SPECS = [("a0", "ok", "n1", "act1", NOW - 3000), ("a1", "ok", "n1", "act1", NOW - 2990),
         ("a2", "ok", "n1", "act1", NOW - 900), ("a3", "error", "n2", "act2", NOW - 500),
         ("a4", "ok", "n2", "act2", NOW - 300), ("a5", "ok", "n1", "act3", NOW - 60),
         ("other", "ok", "n1", "act3", NOW - 30)]
IDS = [f"a{k}" for k in range(10)]


def shifted(now):
    """SPECS as if the clock read `now` (the CLI reads the real clock)."""
    return [(i, s, n, a, t - NOW + now) for i, s, n, a, t in SPECS]


def test_rates_recent_and_overall():
    times = [NOW - 900, NOW - 500, NOW - 300, NOW - 60]
    recent, overall = rates(times, NOW, START, window_s=600)
    assert recent == pytest.approx(3 / 600)              # three rows in the last 10 minutes
    assert overall == pytest.approx(4 / 1200)            # four rows since this run started
    recent, overall = rates(times, NOW, NOW - 120, window_s=600)
    assert recent == pytest.approx(1 / 120)              # a run younger than the window
    assert rates([], NOW, START) == (0.0, 0.0)
    assert rates([NOW - 100, NOW - 50, NOW], NOW, None)[1] == pytest.approx(2 / 100)
    f = Figures(ok=5, error=1, total=10, recent_rate=3 / 600)
    assert (f.done, f.pending, f.eta_s) == (6, 4, pytest.approx(800))
    assert Figures(ok=1, error=0, total=5).eta_s is None  # no rate: no ETA, not a guess
    assert Figures(ok=5, error=0, total=5).eta_s == 0


def test_status_counts_rates_nodes_actors_and_errors(tmp_path):
    now = time.time()
    out = Output(str(tmp_path / "out"))
    write_job(out, shifted(now), START - NOW + now)
    manifest = manifest_of(IDS, str(tmp_path / "m.parquet"))
    status = read_status(str(tmp_path / "out"), manifest_uri=manifest, window_s=600, now=now)
    f = status.figures
    assert (f.ok, f.error, f.done, f.total, f.pending, f.before) == (5, 1, 6, 10, 4, 2)
    assert status.other_rows == 1 and status.state == "running"
    assert f.recent_rate == pytest.approx(3 / 600)
    assert f.overall_rate == pytest.approx(4 / 1200)
    assert f.eta_s == pytest.approx(4 / (3 / 600))
    nodes = {n["node"]: n for n in status.per_node}
    assert nodes["n1"]["rows"] == 4 and nodes["n2"]["rows"] == 2 and nodes["n2"]["error"] == 1
    assert nodes["n1"]["rows_per_hour_recent"] == pytest.approx(1 / 600 * 3600)
    assert nodes["n2"]["rows_per_hour_overall"] == pytest.approx(2 / 1200 * 3600)
    actors = {a["actor"]: a for a in status.per_actor}
    assert set(actors) == {"act1", "act2", "act3"} and actors["act3"]["node"] == "n1"
    assert [e["id"] for e in status.latest_errors] == ["a3"]
    assert "a3.png" in status.latest_errors[0]["error"]

    text = render_cli(str(tmp_path / "out"), "--manifest", manifest)
    for needle in ["6 done of 10 (60.0%): 5 ok, 1 error, 4 pending",
                   "2 of them were complete before this run started",
                   "1 more row(s) under this output belong to other manifests",
                   "18.0 rows/h over the last 10 min, 12.0 rows/h since the run started",
                   "ETA       13m 20s", "latest errors", "a3  not a readable image: a3.png"]:
        assert needle in text, (needle, text)
    assert text.count("\nn1 ") + text.count("\nn2 ") == 2        # the node table
    # without a manifest: counts only, and a pointer to the manifest job.json names
    bare = render_cli(str(tmp_path / "out"))
    assert "7 done: 6 ok, 1 error (pending needs --manifest)" in bare
    assert "job.json names manifest m.parquet" in bare and "ETA       " not in bare
    # the run writes summary.json as it ends: from then on the job reads as ended
    out.put_json("summary.json", {"this_run": {"started_at": START - NOW + now},
                                  "manifest": {"rows": 10, "pending": 4}})
    assert ("state     ended: the run finished (summary.json: 4 of its manifest's 10 rows "
            "pending)") in render_cli(str(tmp_path / "out"))


def test_status_states():
    rows = metrics_rows(SPECS[:2])                        # written at NOW-3000 and NOW-2990
    done = compute_status(rows, output="o", manifest_ids={"a0", "a1"}, now=NOW,
                          started_at=NOW - 3010)
    assert done.state == "complete" and done.figures.eta_s == 0
    # a finished run's rate ends with its last row: it does not decay as time passes
    assert done.figures.overall_rate == pytest.approx(2 / 20)
    assert done.figures.recent_rate == 0 and done.per_node[0]["rows_per_hour_overall"] == 360
    stale = compute_status(rows, output="o", manifest_ids=set(IDS), now=NOW, started_at=START - 2000)
    assert stale.state == "idle"                          # nothing in the last 10 minutes
    assert compute_status(rows, output="o", started_at=NOW - 5, now=NOW).state == "waiting"
    assert compute_status(rows.iloc[:0], output="o", now=NOW).state == "empty"
    # summary.json of this run: it ended, even without a manifest and with rows still fresh
    fresh = compute_status(rows, output="o", started_at=NOW - 3010, now=NOW - 2980)
    assert fresh.state == "running"
    summary = {"this_run": {"started_at": NOW - 3010}}
    ended = compute_status(rows, output="o", started_at=NOW - 3010, now=NOW - 2980,
                           summary=summary)
    assert ended.state == "ended" and ended.figures.overall_rate == pytest.approx(2 / 20)
    stopped = compute_status(rows, output="o", started_at=NOW - 3010, now=NOW - 2980,
                             summary={**summary, "stopped": "3 batches failed alike"})
    assert stopped.state == "stopped" and "3 batches failed alike" in render(stopped)
    # an earlier run's summary says nothing about this one
    assert compute_status(rows, output="o", started_at=NOW - 3005, now=NOW - 2980,
                          summary=summary).state == "running"


def render_cli(*argv) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["status", *argv]) == 0
    return buf.getvalue()


def test_status_on_s3_with_json(s3_server, monkeypatch, tmp_path):
    """Credentials from the environment, the endpoint from --storage-options (or a spec)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3_server["fs"].mkdir("status")
    opts = {"client_kwargs": {"endpoint_url": s3_server["endpoint"]}}
    now = time.time()
    write_job(Output("s3://status/out", opts), shifted(now), now - 1200)
    manifest = manifest_of(IDS, "s3://status/m.parquet", opts)
    got = json.loads(render_cli("s3://status/out", "--manifest", manifest,
                                "--storage-options", json.dumps(opts), "--json"))
    assert got["figures"]["ok"] == 5 and got["figures"]["pending"] == 4
    assert got["figures"]["rows_per_hour_recent"] == pytest.approx(18.0, abs=0.5)
    assert {n["node"] for n in got["per_node"]} == {"n1", "n2"}
    assert got["latest_errors"][0]["id"] == "a3" and got["state"] == "running"
    # the same through a job spec
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"manifest": manifest, "output": "s3://status/out",
                                "models": "m.yaml", "storage_options": opts}))
    assert json.loads(render_cli("--job", str(spec), "--json"))["figures"]["total"] == 10


def test_status_errors_are_clear(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 1
    assert "no job output at" in capsys.readouterr().err
    assert main(["status", str(tmp_path), "--storage-options", '{"key": "AKIA", "secret": "x"}']) == 1
    err = capsys.readouterr().err
    assert "must not hold credentials" in err and "AKIA" not in err
    out = Output(str(tmp_path / "out"))
    write_job(out, SPECS[:1], START)
    assert main(["status", str(tmp_path / "out"), "--manifest", str(tmp_path / "no.parquet")]) == 1
    assert "manifest not found" in capsys.readouterr().err


def test_status_watch_refreshes_until_interrupted(tmp_path):
    out = Output(str(tmp_path / "out"))
    write_job(out, SPECS[:2], START)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "maskface"), "status",
                             str(tmp_path / "out"), "--watch", "0.3", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        lines = []
        while time.time() < deadline and len(lines) < 1:
            lines = [proc.stdout.readline()]
        write_metrics(out, metrics_rows(SPECS[2:4]), METRICS_SCHEMA)   # the job moves on
        seen = []
        while time.time() < deadline:
            got = json.loads(proc.stdout.readline())
            seen.append(got["figures"]["done"])
            if got["figures"]["done"] == 4:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)       # reads both pipes: none can fill
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"a watch went on after Ctrl-C; its stderr: {proc.communicate()[1]}")
    assert json.loads(lines[0])["figures"]["done"] == 2 and seen[-1] == 4
    assert proc.returncode == 0, err                    # Ctrl-C ends a watch cleanly


def test_status_starts_without_loading_torch(tmp_path):
    """A status read from another terminal loads no deep-learning stack (seconds saved
    at every start, and no GPU library on a login node)."""
    out = Output(str(tmp_path / "out"))
    write_job(out, SPECS[:2], START)
    code = ("import sys; from jobs.cli import main; rc = main(['status', sys.argv[1], '--json']); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["figures"]["done"] == 2
    assert run.stderr.strip().splitlines()[-1] == "False"


def test_driver_progress_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.runner.progress")

    def lines():
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    with DriverProgress(total=10, before=2, interval_s=0.2, tty=False) as progress:
        progress.update(["ok", "error"])
        progress.update(["ok"])
        deadline = time.time() + 60          # a loaded machine may tick late: wait for two
        while len(lines()) < 2 and time.time() < deadline:
            time.sleep(0.05)
    lines = lines()
    assert len(lines) >= 3                                 # on a timer, and once at the end
    assert all("5/10 done (2 ok, 1 error, 2 done before this run), 5 pending" in l for l in lines)
    assert "ETA" in lines[-1] and "finished in" in lines[-1]


def test_driver_progress_bar_in_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    screen = Terminal()
    with DriverProgress(total=8, before=3, stream=screen) as progress:
        progress.update(["ok", "ok", "error"])
    text = screen.getvalue()
    assert "edits" in text and "6/8" in text and "2 ok, 1 error" in text


def test_ray_data_progress_bars_only_with_verbose():
    from pipeline.runner.progress import ray_data_progress_wanted
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)                          # `maskface`
        assert not ray_data_progress_wanted()
        root.setLevel(logging.DEBUG)                         # `maskface -v`
        assert ray_data_progress_wanted()
    finally:
        root.setLevel(level)


def test_progress_interval_from_the_environment(monkeypatch):
    from pipeline.runner.progress import interval_from_env
    monkeypatch.setenv("MASKFACE_PROGRESS_INTERVAL_S", "5")
    assert interval_from_env() == 5
    monkeypatch.setenv("MASKFACE_PROGRESS_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="MASKFACE_PROGRESS_INTERVAL_S must be a number"):
        interval_from_env()
    monkeypatch.delenv("MASKFACE_PROGRESS_INTERVAL_S")
    assert interval_from_env() == 60



def test_status_uses_the_manifest_job_json_names_and_a_watch_rereads_only_changes(
        tmp_path, monkeypatch):
    from pipeline.output import metrics
    from pipeline.results import status as status_module
    now = time.time()
    out = Output(str(tmp_path / "out"))
    manifest = manifest_of(IDS, str(tmp_path / "m.parquet"))
    write_job(out, shifted(now), START - NOW + now, manifest=manifest)
    files, manifests = [], []
    real_file, real_ids = metrics._read_file, status_module.manifest_ids
    monkeypatch.setattr(metrics, "_read_file", lambda o, p, *a: files.append(p) or
                        real_file(o, p, *a))
    monkeypatch.setattr(status_module, "manifest_ids", lambda *a: manifests.append(a) or
                        real_ids(*a))
    reader = status_module.StatusReader(str(tmp_path / "out"))      # no --manifest
    first = reader.read(window_s=600, now=now)
    assert (first.figures.total, first.figures.pending) == (10, 4)
    assert first.manifest == manifest and len(files) == 4 and len(manifests) == 1
    files.clear()
    write_metrics(out, metrics_rows([("a6", "ok", "n2", "act2", now)]), METRICS_SCHEMA)
    second = reader.read(window_s=600, now=now)
    assert second.figures.pending == 3
    assert len(files) == 1 and len(manifests) == 1       # the new file; the manifest once


def test_status_names_metrics_files_whose_rows_do_not_count(tmp_path):
    """A damaged metrics file (cut short), set aside by a run's compaction, and a foreign
    one beside it: status names each with its size and reason, and moves nothing."""
    from pipeline.output.metrics import compact, metrics_paths
    now = time.time()
    out = Output(str(tmp_path / "out"))
    write_job(out, shifted(now), START - NOW + now)
    cut = Path(metrics_paths(out)[0])
    cut.write_bytes(cut.read_bytes()[:300])
    (tmp_path / "out" / "metrics" / "by_attribute.parquet").write_bytes(
        Path(metrics_paths(out)[1]).read_bytes())
    before = read_status(str(tmp_path / "out"), now=now)
    said = {(n["why"], n["file"].rsplit("/", 1)[-1]) for n in before.not_counted}
    assert said == {("damaged", cut.name), ("foreign", "by_attribute.parquet")}
    assert cut.exists()                                   # status moved nothing
    compact(out, batch_files_only=True)                   # what a run does as it starts
    after = read_status(str(tmp_path / "out"), now=now)
    aside = [n for n in after.not_counted if n["why"] == "set aside"]
    assert len(aside) == 1 and aside[0]["size"] == 300 and aside[0]["reason"]
    assert "set aside: metrics/" + cut.name in render(after)
    assert "foreign: metrics/by_attribute.parquet" in render(after)


def test_status_shows_each_actors_engine_busy_share(tmp_path):
    """Rows carrying their actor's time per phase: status's actor table shows the
    engine's share; rows written before those columns show a dash."""
    now = time.time()
    out = Output(str(tmp_path / "out"))
    out.put_json("job.json", {"spec": {"manifest": "m.parquet"}, "started_at": now - 100})
    rows = metrics_rows([("t0", "ok", "n1", "act1", now - 50), ("t1", "ok", "n1", "act1", now - 40),
                         ("t2", "ok", "n2", "act2", now - 30)])
    for column, values in (("time_read_s", [1, 1, None]), ("time_engine_s", [6, 2, None]),
                           ("time_write_s", [1, 1, None]), ("time_post_s", [1, 1, None]),
                           ("time_wait_s", [1, 3, None])):
        rows[column] = values
    write_metrics(out, rows, METRICS_SCHEMA)
    status = read_status(str(tmp_path / "out"), now=now)
    busy = {a["actor"]: a["engine_busy"] for a in status.per_actor}
    assert busy == {"act1": pytest.approx(8 / 18), "act2": None}
    table = render(status)
    assert "engine busy" in table and "44%" in table
