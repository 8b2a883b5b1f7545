"""One run per output (pipeline/output/lease.py), on local disk and on a real S3 server:
a second run refuses while the holder's heartbeat moves; a holder killed with SIGKILL is
taken over once its lease expires (or at once, when its pid is known gone); `--takeover`
takes a live lease and its holder learns it; status reads the heartbeat; two real
`maskface run` at once edit no row twice."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import SHORT

from manifests.schema import write_manifest
from pipeline.output.layout import Output
from pipeline.output.lease import FILE, Lease, LeaseHeld, LeaseLost, Owner, read_lease
from pipeline.results.status import read_status, render

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, s3_server):
    """An output URI (fresh for each test) and its storage options, on each store."""
    if request.param == "local":
        return {"uri": str(tmp_path / "out"), "options": None, "env": {}}
    bucket = f"lease-{os.urandom(4).hex()}"
    s3_server["fs"].mkdir(bucket)
    return {"uri": f"s3://{bucket}/out", "options": s3_server["options"],
            "env": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
            "endpoint": s3_server["endpoint"]}


def elsewhere(run_id: str) -> Owner:
    """An owner on another host: its pid says nothing here, only its heartbeat counts."""
    return Owner(run_id=run_id, host=f"host-of-{run_id}", pid=1)


HOLDER = """
import sys, time
from pipeline.output.layout import Output
from pipeline.output.lease import Lease, Owner
uri, options, host = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
owner = Owner.this_process("holder")
if host != "this":
    owner = Owner(owner.run_id, host, owner.pid)
Lease.take(Output(uri, options), owner, heartbeat_s=0.5, expiry_s=float(sys.argv[4]))
print("held", flush=True)
time.sleep(600)
"""


def start_holder(where, host="this", expiry_s=4.0) -> subprocess.Popen:
    """A separate process holding the output's lease, its heartbeat running."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, where["uri"], repr(where["options"]),
                             host, str(expiry_s)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **where["env"]})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_refuses_within_seconds_naming_the_holder(where):
    out = Output(where["uri"], where["options"])
    holder = start_holder(where)
    try:
        started = time.time()
        with pytest.raises(LeaseHeld) as refused:
            Lease.take(out, elsewhere("second"))
        took = time.time() - started
        assert took < 10, took
        text = str(refused.value)
        held = read_lease(out)
        assert held.owner.run_id in text and f"pid {holder.pid}" in text and "heartbeat" in text
        assert "--takeover" in text and len(text) < 2048
        assert held.owner.pid == holder.pid          # the lease was not touched
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_is_taken_over_once_its_lease_expires(where):
    """The holder claims another host, so only its heartbeat can tell it died: the taker
    waits out the expiry (4 s) and takes over with no manual step."""
    out = Output(where["uri"], where["options"])
    holder = start_holder(where, host="a-host-far-away")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.time()
    lease = Lease.take(out, elsewhere("taker"), heartbeat_s=0.5, expiry_s=4)
    try:
        waited = time.time() - killed_at
        assert 2 <= waited < 15, waited              # waited for the expiry, not forever
        assert read_lease(out).owner.run_id == "taker"
    finally:
        lease.release()
    assert read_lease(out) is None                   # released: gone


def test_a_holder_whose_pid_is_gone_on_this_host_is_taken_over_at_once(tmp_path):
    """Two of its heartbeats unchanged (1 s), not its expiry (60 s)."""
    where = {"uri": str(tmp_path / "out"), "options": None, "env": {}}
    holder = start_holder(where, expiry_s=60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.time()
    with Lease.take(Output(where["uri"]), Owner.this_process("taker"), expiry_s=600):
        assert time.time() - started < 10          # no waiting out the 60 s expiry
    assert not (tmp_path / "out" / FILE).exists()        # released


def test_takeover_takes_a_live_lease_and_its_holder_stops(where):
    out = Output(where["uri"], where["options"])
    first = Lease.take(out, elsewhere("first"), heartbeat_s=0.3, expiry_s=60)
    try:
        second = Lease.take(out, elsewhere("second"), takeover=True, heartbeat_s=0.3,
                            expiry_s=60)
        deadline = time.time() + 10
        while first.lost is None and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(LeaseLost, match=r"run second on host-of-second \(pid 1\) took over"):
            first.check()
        first.release()                              # never deletes the taker's lease
        assert read_lease(out).owner.run_id == "second"
        second.release()
        assert read_lease(out) is None
    finally:
        first.release()


def test_a_file_that_is_not_a_lease_is_replaced_not_obeyed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / FILE).write_text("{cut sho")
    with Lease.take(Output(str(tmp_path / "out")), elsewhere("me")) as lease:
        assert read_lease(lease.out).owner.run_id == "me"


def test_status_tells_a_live_driver_from_a_dead_one(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "job.json").write_text(json.dumps({"started_at": time.time(), "spec": {}}))
    out = Output(str(out_dir))
    lease = Lease.take(out, elsewhere("live"), heartbeat_s=0.3, expiry_s=60)
    lease.rows_done = 7
    time.sleep(0.8)
    try:
        status = read_status(str(out_dir))
        assert status.driver["alive"] and status.driver["rows_done"] == 7
        assert status.state == "waiting"              # alive, no row written yet
        assert "driver    run live on host-of-live (pid 1)" in render(status)
    finally:
        lease._stop.set()                             # the heartbeat stops: a dead driver
    time.sleep(0.5)
    dead = read_status(str(out_dir), now=time.time() + 120)
    assert dead.state == "lost" and not dead.driver["alive"], dead.driver
    assert "the driver stopped without ending the run" in render(dead)


# ---- two real runs -------------------------------------------------------------------------
def _job(where, tmp_path, tiny32, photo, rows=6):
    ids = [f"r{k}" for k in range(rows)]
    frame = pd.DataFrame({"id": ids, "image_uri": [str(photo)] * rows,
                          "attributes": [["smiling"]] * rows, "targets": [[1.0]] * rows})
    write_manifest(frame, str(tmp_path / "m.parquet"))
    spec = {"manifest": str(tmp_path / "m.parquet"), "output": where["uri"],
            "models": str(tiny32 / "models.yaml"), "batch_size": 1, "actors": 1,
            "edit": {**SHORT, "steps.latent": 12}, "inputs": {"allow": [str(photo.parent)]}}
    if where.get("endpoint"):
        spec["storage_options"] = {"client_kwargs": {"endpoint_url": where["endpoint"]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "job.yaml"), ids


@pytest.mark.slow
def test_two_runs_on_one_output_the_second_refuses_and_no_row_is_edited_twice(
        where, tmp_path, tiny32):
    photo = REPO / "jobs" / "demo" / "astronaut-64.png"
    spec, ids = _job(where, tmp_path, tiny32, photo)
    maskface = str(Path(sys.executable).parent / "maskface")
    env = {**os.environ, **where["env"]}
    first = subprocess.Popen([maskface, "run", spec, "--no-report"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    out = Output(where["uri"], where["options"])
    try:
        deadline = time.time() + 120
        while read_lease(out) is None and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second started"
        started = time.time()
        second = subprocess.run([maskface, "run", spec, "--no-report"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        took = time.time() - started
        log, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "is held by run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert took < 30, took           # within 10 s of reading the lease; the rest is startup
    assert first.returncode == 0, log[-3000:]
    metrics = [pq.read_table(p, filesystem=out.fs).to_pandas()
               for p in out.fs.ls(out.path_of("metrics")) if p.endswith(".parquet")]
    rows = pd.concat(metrics)
    assert sorted(rows["id"]) == ids                 # one row per id: none edited twice
    assert read_lease(out) is None                   # the first run let it go


def test_an_output_that_cannot_hold_a_lease_is_a_setup_error_naming_it(tmp_path):
    from pipeline.errors import SetupError
    from pipeline.runner.driver import hold_output
    from pipeline.runner.spec import JobSpec
    (tmp_path / "a-file").write_text("not a folder")
    job = JobSpec(manifest="m.parquet", output=str(tmp_path / "a-file"), models="models.yaml")
    with pytest.raises(SetupError, match=r"a-file cannot be written \(NotADirectoryError"):
        hold_output(job)
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_lease_file_with_hostile_values_is_not_obeyed_and_said_briefly(tmp_path, caplog):
    """Values of the wrong types, an expiry of 1e30 s (which would make a run wait
    forever), a 100 KB host: not a lease. It is replaced; what is said of it stays short,
    and status reads it as a driver gone."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / FILE).write_text(json.dumps({
        "owner": {"run_id": 7, "host": "h" * 100_000, "pid": "x"}, "started_at": 0,
        "heartbeat_at": "soon", "heartbeat_s": 5, "expiry_s": 1e30}))
    (tmp_path / "out" / "job.json").write_text(json.dumps({"started_at": time.time()}))
    status = read_status(str(tmp_path / "out"))
    assert status.driver is not None and not status.driver["alive"]
    started = time.time()
    with Lease.take(Output(str(tmp_path / "out")), elsewhere("me")) as lease:
        assert time.time() - started < 10
        assert read_lease(lease.out).owner.run_id == "me"
    assert all(len(r.getMessage()) < 2048 for r in caplog.records)


def test_a_release_that_fails_is_said_and_never_raises(tmp_path, caplog):
    """Cleanup must not replace a run's outcome: the output folder replaced by a file
    under a holding run, its release logs a warning and returns."""
    import shutil
    out = Output(str(tmp_path / "out"))
    lease = Lease.take(out, elsewhere("me"), heartbeat_s=60, expiry_s=120)
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").write_text("a file now")
    lease.release()
    assert any("could not delete the lease" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out").read_text() == "a file now"
