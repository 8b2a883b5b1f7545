"""Cluster jobs as users run them: `ray job submit` of `maskface run` to a real local
multi-node Ray cluster (a head and two worker raylets with one logical GPU each, token
auth on), with the cluster page's own runtime env; `maskface status` while it runs; a second
submission that resumes; a client without the token refused; a worker node lost mid-job."""
import io
import json
import re
import shutil
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from launch_docs import REPO, page_submits
from ray_cluster import BIN

from jobs.cli import main
from manifests.schema import write_manifest
from models.tiny import make_tiny
from pipeline.output.metrics import metrics_paths, read_metrics
from pipeline.output.layout import Output
from pipeline.results.status import read_status

pytestmark = pytest.mark.cluster

ROWS = 8
# long enough per row (~1 s here) that status can be read while the job runs
EDIT = {"steps.latent": 15, "steps.noise": 1, "loss.start_steps.classf": 1,
        "loss.start_steps.seg": 1, "dynamic_masking_iters": 1, "parser_size": 32,
        "e4e_start_step": 1}
PHOTO = REPO / "jobs" / "demo" / "astronaut-64.png"


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    """The project as a user's checkout (no .venv, no .git) with the job spec in jobs/,
    a manifest of the photo the repo ships, tiny models, an output folder."""
    root = tmp_path_factory.mktemp("cluster-job")
    make_tiny(root / "tiny", resolution=32)
    shutil.copy(PHOTO, root / "photo.png")     # outside the checkout, wherever it lives
    manifest = root / "manifest.parquet"
    write_manifest(pd.DataFrame({"id": [f"c{k}" for k in range(ROWS)],
                                 "image_uri": [str(root / "photo.png")] * ROWS,
                                 "attributes": [["smiling"]] * ROWS,
                                 "targets": [[1.0]] * ROWS}), str(manifest))
    checkout = root / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "demo-out", "weights",
        "build"))
    spec = {"manifest": str(manifest), "output": str(root / "out"),
            "models": str(root / "tiny" / "models.yaml"), "batch_size": 1, "edit": EDIT}
    (checkout / "jobs" / "cluster-test.yaml").write_text(yaml.safe_dump(spec))
    return {"root": root, "checkout": checkout, "manifest": str(manifest),
            "output": str(root / "out")}


def submit_command(cluster, env_vars=None):
    """The cluster page's `ray job submit`, against this cluster, with this job's spec."""
    documented = page_submits()[0]
    runtime_env = dict(documented.runtime_env)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
            "--runtime-env-json", json.dumps(runtime_env), "--",
            *documented.entrypoint[:2], "jobs/cluster-test.yaml"]


def status_text(*argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["status", *argv]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def first_run(ray_multinode, job_files):
    """Submit the job and, while `ray job submit` streams its log, read its status the way
    another terminal would."""
    proc = subprocess.Popen(submit_command(ray_multinode, {"MASKFACE_PROGRESS_INTERVAL_S": "2"}),
                            cwd=job_files["checkout"], env=ray_multinode.client_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    during, during_text = None, None
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            if during is None and Path(job_files["output"], "metrics").is_dir():
                status = read_status(job_files["output"], manifest_uri=job_files["manifest"])
                if 0 < status.figures.done < ROWS:
                    during = status
                    during_text = status_text(job_files["output"], "--manifest",
                                              job_files["manifest"])
            time.sleep(0.3)
        log, _ = proc.communicate(timeout=max(deadline - time.time(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"rc": proc.returncode, "log": log, "during": during, "during_text": during_text,
            "after": read_status(job_files["output"], manifest_uri=job_files["manifest"])}


def test_a_submitted_job_attaches_and_puts_one_actor_on_each_worker_gpu(ray_multinode,
                                                                        job_files, first_run):
    log = first_run["log"]
    assert first_run["rc"] == 0, log[-4000:]
    assert "succeeded" in log
    # `maskface run` attached to this cluster (RAY_ADDRESS), not a local Ray of its own
    assert "attached to the Ray cluster at" in log and "3 node(s), 3 CPU, 2 GPU" in log, log
    metrics = read_metrics(Output(job_files["output"]))
    assert sorted(metrics["id"]) == [f"c{k}" for k in range(ROWS)]
    assert (metrics["status"] == "ok").all(), metrics["error"].tolist()
    for rid in metrics["id"]:
        assert Path(job_files["output"], "images", f"{rid}.png").is_file()
        assert Path(job_files["output"], "latents", f"{rid}.npy").is_file()
    workers = {n.node_id[:12] for n in ray_multinode.worker_nodes}
    nodes = {n.rsplit("/", 1)[1] for n in metrics["node"]}
    assert nodes == workers                        # both worker nodes, never the head
    assert metrics["actor"].nunique() == 2
    assert metrics.groupby("actor")["node"].nunique().max() == 1   # one actor per node's GPU
    assert set(metrics["gpu_ids"]) == {"0"}        # each worker's only GPU
    # the driver's progress in a non-interactive log: a line every 2 s, then the end;
    # Ray Data's own progress bars stay off without -v
    lines = [l for l in log.splitlines() if "progress: " in l]
    assert len(lines) >= 2, log
    assert f"{ROWS}/{ROWS} done ({ROWS} ok, 0 error), 0 pending" in lines[-1]
    assert "finished in" in lines[-1] and "ETA 0s" in lines[-1]
    assert "Progress bars disabled" in log            # Ray Data says so itself


def test_status_reads_a_job_in_progress_and_after_it_ends(ray_multinode, job_files, first_run):
    during = first_run["during"]
    assert during is not None, "the job ended before status saw it in progress"
    f = during.figures
    assert 0 < f.done < ROWS and f.pending == ROWS - f.done and f.total == ROWS
    assert during.state == "running" and during.per_node and during.started_at
    # the text is another read, a moment later, of a job that moved on: it is checked
    # against its own figures, never against the read above
    text = first_run["during_text"]
    done, total, ok, error, pending = map(int, re.search(
        r"(\d+) done of (\d+) \([\d.]+%\): (\d+) ok, (\d+) error, (\d+) pending", text).groups())
    assert total == ROWS and done == ok + error and pending == total - done
    assert done >= f.done and "ETA" in text
    after = first_run["after"]
    assert after.state == "complete" and after.figures.pending == 0
    assert after.figures.ok == ROWS and after.figures.eta_s == 0
    workers = {n.node_id[:12] for n in ray_multinode.worker_nodes}
    assert {n["node"].rsplit("/", 1)[1] for n in after.per_node} == workers
    assert len(after.per_actor) == 2 and sum(a["rows"] for a in after.per_actor) == ROWS
    text = status_text(job_files["output"], "--manifest", job_files["manifest"])
    assert f"{ROWS} done of {ROWS} (100.0%): {ROWS} ok, 0 error, 0 pending" in text
    assert "complete" in text


def test_a_second_submission_resumes_and_does_nothing(ray_multinode, job_files, first_run):
    out = Output(job_files["output"])
    files = {f: pq.read_table(f)["written_at"].to_pylist() for f in metrics_paths(out)}
    again = subprocess.run(submit_command(ray_multinode), cwd=job_files["checkout"],
                           env=ray_multinode.client_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert f"{ROWS} rows: {ROWS} already complete, 0 to edit" in again.stdout
    assert {f: pq.read_table(f)["written_at"].to_pylist() for f in metrics_paths(out)} == files
    summary = json.loads(Path(job_files["output"], "summary.json").read_text())
    assert summary["this_run"]["skipped_already_done"] == ROWS
    assert summary["this_run"]["ok"] == 0
    assert summary["manifest"] == {"rows": ROWS, "ok": ROWS, "error": 0, "pending": 0}


def test_the_same_spec_submitted_twice_at_once_the_second_refuses(ray_multinode, job_files):
    """Two `ray job submit` of one spec (a retried CI step, two people): the second job
    finds the first's lease with a moving heartbeat and fails, naming it; no row is
    edited twice."""
    out = job_files["root"] / "out-twice"
    spec = yaml.safe_load((job_files["checkout"] / "jobs" / "cluster-test.yaml").read_text())
    (job_files["checkout"] / "jobs" / "cluster-twice.yaml").write_text(
        yaml.safe_dump({**spec, "output": str(out)}))
    command = [*submit_command(ray_multinode)[:-1], "jobs/cluster-twice.yaml"]
    first = subprocess.Popen(command, cwd=job_files["checkout"], env=ray_multinode.client_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "lease.json").is_file() and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first job ended before the second was submitted"
        holder = json.loads((out / "lease.json").read_text())["owner"]
        second = subprocess.run(command, cwd=job_files["checkout"],
                                env=ray_multinode.client_env(), capture_output=True, text=True,
                                timeout=300)
        log, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    said = second.stdout + second.stderr
    assert second.returncode != 0, said[-3000:]
    assert f"is held by run {holder['run_id']}" in said, said[-3000:]
    assert holder["submission"] and f"Ray job {holder['submission']}" in said
    assert first.returncode == 0, log[-3000:]
    every = pd.concat([pq.read_table(f).to_pandas() for f in metrics_paths(Output(str(out)))])
    assert sorted(every["id"]) == [f"c{k}" for k in range(ROWS)]    # none edited twice
    assert not (out / "lease.json").exists()


def test_a_client_without_the_token_is_refused(ray_multinode, job_files, tmp_path):
    home = tmp_path / "home"                  # no ~/.ray/auth_token, no RAY_AUTH_* at all
    home.mkdir()
    env = {k: v for k, v in ray_multinode.client_env().items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    refused = subprocess.run(submit_command(ray_multinode), cwd=job_files["checkout"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr
    # a wrong token fails too, and names no token
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong))
    refused = subprocess.run(submit_command(ray_multinode), cwd=job_files["checkout"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert ray_multinode.token_path.read_text() not in refused.stdout + refused.stderr


def test_a_worker_node_lost_mid_job_loses_and_duplicates_nothing(ray_multinode, job_files,
                                                                  tmp_path):
    """A preempted GPU node, as Ray sees it: one worker node SIGKILLed while its actor
    edits. The job goes on on the node left, once Ray gives the lost batch up, and ends
    with exactly one metrics row per id. Runs last: it leaves this module's cluster with
    one worker."""
    rows = 8
    manifest = tmp_path / "m.parquet"
    write_manifest(pd.DataFrame({"id": [f"n{k}" for k in range(rows)],
                                 "image_uri": [str(job_files["root"] / "photo.png")] * rows,
                                 "attributes": [["smiling"]] * rows,
                                 "targets": [[1.0]] * rows}), str(manifest),
                   input_roots=[job_files["root"]])        # the photo's folder, as a builder records it
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"manifest": str(manifest), "output": str(out),
                                    "models": str(job_files["root"] / "tiny" / "models.yaml"),
                                    "batch_size": 1, "edit": EDIT}))
    env = ray_multinode.node_env()
    env["RAY_ADDRESS"] = ray_multinode.address              # a driver attached to the cluster
    proc = subprocess.Popen([str(BIN / "maskface"), "run", str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lost = ray_multinode.node("w0")
    killed_after = None
    deadline = time.time() + 400
    try:
        while proc.poll() is None and time.time() < deadline:
            if killed_after is None and (out / "metrics").is_dir():
                nodes = {n.rsplit("/", 1)[1] for n in read_metrics(Output(str(out)))["node"]}
                if lost.node_id[:12] in nodes and len(nodes) == 2:   # both actors at work
                    ray_multinode.remove_worker(lost)
                    killed_after = len(read_metrics(Output(str(out))))
            time.sleep(0.2)
        log, _ = proc.communicate(timeout=max(deadline - time.time(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_after is not None and killed_after < rows, "the node was not lost mid-job"
    assert proc.returncode == 0, log[-4000:]
    assert "lost edit workers" in log and "resuming on the nodes still alive" in log
    every = pd.concat([pq.read_table(f).to_pandas() for f in metrics_paths(Output(str(out)))])
    assert sorted(every["id"]) == [f"n{k}" for k in range(rows)]    # one row each
    assert (every["status"] == "ok").all(), every["error"].tolist()
    survivor = ray_multinode.node("w1").node_id[:12]
    by_node = every.groupby(every["node"].str.rsplit("/", n=1).str[1]).size()
    assert by_node[survivor] >= rows - killed_after                 # the rest ran there
