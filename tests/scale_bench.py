"""The scale benchmark: what reading an output costs at 10^4 to 10^6 rows. A figure, not a
test (pytest does not collect it).

    .venv/bin/python tests/scale_bench.py --rows 10000 100000 1000000 [--s3-latency-ms 20]
        [--layout compacted|small-files|both] [--export-up-to 100000] [--work DIR]
        [--code CHECKOUT] [--no-local] [--commands status resume ...] [--cold]

For each N it writes once, with the project's own writer, a synthetic output of N
finished rows as the actors write it: one metrics file per batch of 4, every metrics
column filled (2% error rows), CelebA's 40 `attr_*` labels passed through, the manifest
of the N rows, summary.json. Row k's image, latent and mask are the k % 1000-th of a
pool of 1,000 of each: the report reads only its grid's sample of them, status and
resume none, export each once. Each layout is measured on a fresh copy of its metrics:
compacted as a job leaves it (`compacted`), or left as an output written before
compaction existed (`small files`; hard links to the written files where the disk
allows), read once (the page cache holds it); on local disk (--cold: the page cache
emptied before each command instead), and with --s3-latency-ms on the local S3 server
(moto) behind the tests' fault proxy, which holds every request that long (a remote
store's round trip). It times, as a user runs them (each command a new process, wall
clock), in this order:

    status   maskface status OUT --manifest M --json
    report   maskface report OUT
    export   maskface export OUT --format hf-parquet  (up to --export-up-to rows)
    resume   maskface run JOB --no-report            (every row done: nothing to edit;
                                                      compacts an output of small files)
    status after resume

--code times another checkout's commands on the same outputs (an older commit: the
before of a before/after).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from models.celeba import ATTRIBUTES  # noqa: E402
from pipeline.output.metrics import write_metrics  # noqa: E402
from pipeline.output.layout import Output, npy_bytes  # noqa: E402

CODE = str(ROOT)          # the checkout whose commands are timed (--code)
ALL_COMMANDS = ("status", "report", "export", "resume")
COMMANDS = ALL_COMMANDS   # those timed (--commands)
COLD = False              # page cache emptied before each command (--cold)
BATCH = 4
POOL = 1_000              # the row files, shared by row k % POOL
EDITS = ["smiling", "wearing_lipstick", "black_hair", "big_nose", "male", "young"]


def manifest_rows(n: int, images: str) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    attrs = [EDITS[k % len(EDITS)] for k in range(n)]
    rows = pd.DataFrame({"id": [f"{k:07d}.{a}-1" for k, a in enumerate(attrs)],
                         "image_uri": [f"{images}/{k % POOL:05d}.png" for k in range(n)],
                         "attributes": [[a] for a in attrs], "targets": [[1.0]] * n})
    for name in ATTRIBUTES:
        rows[f"attr_{name}"] = rng.integers(0, 2, n).astype(np.int8)
    return rows


def metrics_rows(manifest: pd.DataFrame, out_uri: str, started: float) -> pd.DataFrame:
    """What the actors would have written for these rows: every metrics column filled,
    about 2% of them errors; then the manifest's passthrough labels. Row k's files are
    the pool's k % POOL (see the module doc)."""
    n = len(manifest)
    rng = np.random.default_rng(1)
    ok = rng.random(n) > 0.02
    names = [f"{k % POOL:05d}" for k in range(n)]
    rows = pd.DataFrame({
        "id": manifest["id"], "status": np.where(ok, "ok", "error"),
        "error": [None if good else "x.png: not a readable image: an HTML page, not an image"
                  for good in ok],
        "source_uri": manifest["image_uri"], "input_uri": manifest["image_uri"],
        "edited_uri": [f"{out_uri}/images/{m}.png" if good else None
                       for m, good in zip(names, ok)],
        "latent_uri": [f"{out_uri}/latents/{m}.npy" if good else None
                       for m, good in zip(names, ok)],
        "mask_uri": [f"{out_uri}/masks/{m}.png" if good else None for m, good in zip(names, ok)],
        "noises_uri": None, "pasted_uri": None,
        "attributes": manifest["attributes"], "targets": manifest["targets"],
        "size": 0.0, "seed": np.arange(n), "mode": ["global" if a[0] in ("male", "young")
                                                    else "local" for a in manifest["attributes"]],
        "prob_input": [[float(p)] for p in rng.random(n)],
        "prob_result": [[float(p)] for p in rng.random(n)],
        "preservation_l1": rng.random(n) * 0.01, "outside_pixels": rng.integers(0, 4000, n),
        "outside_mse": rng.random(n) * 1e-4, "outside_psnr": 40 + rng.random(n) * 10,
        "recon_mse": rng.random(n) * 1e-3, "region_portion_before": rng.random(n) * 0.2,
        "region_portion_after": rng.random(n) * 0.2, "steps": 1501,
        "seconds": 60 + rng.random(n), "prefix": None,
        "time_read_s": 0.02, "time_engine_s": 60 + rng.random(n), "time_write_s": 0.3,
        "time_post_s": 0.4, "time_wait_s": 0.01,
        "identity_distance": rng.random(n) * 0.5, "same_person": True,
        "identity_status": "ok", "identity_seconds": 0.3,
        "node": [f"node-{k % 8}" for k in range(n)], "actor": [f"actor-{k % 8}" for k in range(n)],
        "gpu_ids": "0", "actor_model_loads": 1,
        "generator_sha256": "a" * 64, "face_parser_sha256": "b" * 64,
        "classifier_sha256": "c" * 64, "e4e_sha256": None, "lpips_trunk_sha256": None,
        "tiny_models": False, "written_at": started + np.arange(n) * 0.01})
    probs = rng.random((n, 2, 40), dtype=np.float32)
    rows["prob_all_input"] = list(probs[:, 0])
    rows["prob_all_result"] = list(probs[:, 1])
    rows["entanglement"] = rng.random(n) * 0.1
    rows["unintended_flips"] = [["male"] if k % 17 == 0 else [] for k in range(n)]
    rows["judge_prob_input"] = [[float(p)] for p in rng.random(n)]
    rows["judge_prob_result"] = [[float(p)] for p in rng.random(n)]
    rows["judge_on_target"] = rng.random(n) > 0.3
    rows["judge_sha256"] = "d" * 64
    rows["settings_sha256"] = ["e" * 63 + str(k % 6) for k in range(n)]
    rows["code_version"] = "scale-bench"
    for name in ("prob_input", "prob_result", "identity_distance", "same_person",
                 "preservation_l1", "outside_mse", "outside_psnr", "recon_mse",
                 "region_portion_before", "region_portion_after", "outside_pixels",
                 "prob_all_input", "prob_all_result", "entanglement", "unintended_flips",
                 "judge_prob_input", "judge_prob_result", "judge_on_target",
                 "settings_sha256"):
        rows[name] = rows[name].astype(object).where(ok, None)
    for c in manifest.columns:
        if c.startswith("attr_"):
            rows[c] = manifest[c].to_numpy()
    return rows


def _write_batches(args) -> None:
    out_uri, schema, part = args
    out = Output(out_uri)
    for k in range(0, len(part), BATCH):
        write_metrics(out, part.iloc[k:k + BATCH], schema)


URI_COLUMNS = ["edited_uri", "latent_uri", "mask_uri"]


def written(work: Path, n: int) -> Path:
    """The output of `n` rows as the actors wrote it (small files), made once and never
    measured: each measured output is a copy of it (a resume compacts what it reads)."""
    import pyarrow as pa

    from manifests.schema import write_manifest
    from pipeline.output.metrics import passthrough_schema
    folder = work / f"n{n}" / "written"
    if (folder / "ready").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "inputs").mkdir(parents=True)
    manifest = manifest_rows(n, str(folder / "inputs"))
    write_manifest(manifest, str(folder / "manifest.parquet"))
    started = time.time() - 3600
    rows = metrics_rows(manifest, str(folder / "out"), started)
    schema = passthrough_schema(pa.Schema.from_pandas(manifest, preserve_index=False),
                                [c for c in manifest.columns if c.startswith("attr_")])
    began = time.time()
    parts = [rows.iloc[k:k + 20_000] for k in range(0, n, 20_000)]
    with Pool(os.cpu_count() or 2) as pool:
        pool.map(_write_batches, [(str(folder / "out"), schema, p) for p in parts])
    _row_files(folder, min(n, POOL))
    ok = int((rows["status"] == "ok").sum())
    (folder / "summary.json").write_text(json.dumps({"this_run": {
        "ok": ok, "error": n - ok, "skipped_already_done": 0, "seconds": 3600.0,
        "images_per_hour": ok, "started_at": started},
        "manifest": {"rows": n, "ok": ok, "error": n - ok, "pending": 0}}))
    print(f"  wrote {n:,} rows ({n // BATCH:,} metrics files) in {time.time() - began:.0f} s",
          file=sys.stderr)
    (folder / "ready").write_text("")
    return folder


def _row_files(folder: Path, count: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    image = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(buf, "PNG")
    mask = buf.getvalue()
    latent = npy_bytes(rng.standard_normal((10, 64)).astype(np.float32))
    out = Output(str(folder / "out"))
    for k in range(count):
        out.put_row_file("images", f"{k:05d}", image)
        out.put_row_file("latents", f"{k:05d}", latent)
        out.put_row_file("masks", f"{k:05d}", mask)
        (folder / "inputs" / f"{k:05d}.png").write_bytes(image)


def local_copy(source: Path, folder: Path, compacted: bool) -> str:
    """A copy of `source`'s output in `folder`: its metrics files as they are (their
    URIs still name `source`'s row files, which status, resume and report never list),
    job.json and summary.json; compacted as a job leaves it, unless an old output of
    small files is wanted. Returns its URI."""
    from pipeline.output.metrics import compact
    shutil.rmtree(folder, ignore_errors=True)
    # hard links where the disk allows: a million rows' 250,000 files in seconds, not a
    # 15 GB copy (a compaction deletes the copy's names; the source keeps its own)
    shutil.copytree(source / "out" / "metrics", folder / "out" / "metrics",
                    copy_function=_link_or_copy)
    out = Output(str(folder / "out"))
    _job_files(source, out, None)
    if compacted:
        compact(out)
    return out.uri


def _read_every_file(folder: Path) -> None:
    """Every file of `folder` read once: in the page cache, as a copy's would be."""
    def read(path: Path) -> None:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, folder.iterdir()))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def s3_copy(source: Path, local_out: str, dest_uri: str, storage: dict) -> None:
    """A local copy's metrics files on S3, their URIs pointed at the row files, which are
    uploaded too; job.json and summary.json."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    out = Output(dest_uri, storage)
    written_out = str(source / "out")

    def metrics(path: Path) -> None:
        table = pq.read_table(path)
        for col in URI_COLUMNS:
            i = table.schema.get_field_index(col)
            table = table.set_column(i, col, pc.replace_substring(table[col], written_out,
                                                                   dest_uri.rstrip("/")))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        out.put(f"metrics/{path.name}", buf.getvalue())

    def row_file(path: Path) -> None:
        out.put(str(path.relative_to(source / "out")), path.read_bytes())
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(metrics, sorted(Path(local_out, "metrics").glob("*.parquet"))))
        list(pool.map(row_file, [p for kind in ("images", "latents", "masks")
                                 for p in (source / "out" / kind).iterdir()]))
    _job_files(source, out, storage)


def _job_files(source: Path, out: Output, storage: dict | None) -> None:
    from pipeline.runner.spec import JobSpec
    job = JobSpec(manifest=str(source / "manifest.parquet"), output=out.uri,
                  models="unused.yaml", storage_options=storage or {})
    summary = json.loads((source / "summary.json").read_text())
    out.put_json("job.json", {"spec": job.as_dict(), "code_version": "scale-bench",
                              "started_at": summary["this_run"]["started_at"],
                              "rows": summary["manifest"]["rows"]})
    out.put_json("summary.json", {"output": out.uri, **summary})


def paths_of(source: Path, out_uri: str, folder: Path, storage: dict | None) -> dict:
    """What `measure` needs; the job spec of a resume of `out_uri`, written into `folder`."""
    from pipeline.runner.spec import JobSpec
    folder.mkdir(parents=True, exist_ok=True)
    job = JobSpec(manifest=str(source / "manifest.parquet"), output=out_uri,
                  models="unused.yaml", storage_options=storage or {})
    (folder / "job.yaml").write_text(json.dumps(job.as_dict()))
    return {"out": out_uri, "manifest": str(source / "manifest.parquet"),
            "job": str(folder / "job.yaml"), "folder": str(folder)}


def timed(argv: list[str], env: dict | None = None) -> float | str:
    """Seconds `maskface argv...` took, run from CODE (this checkout, or --code's); with
    --cold, the page cache emptied first (an output not read since it was written)."""
    if COLD:
        drop_page_cache()
    env = dict(env or os.environ)
    env["PYTHONPATH"] = CODE
    began = time.time()
    run = subprocess.run([sys.executable, "-c", "import sys; from jobs.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", *argv],
                         capture_output=True, text=True, env=env, cwd=CODE, timeout=3600)
    seconds = time.time() - began
    if run.returncode not in (0, 1):
        return f"failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}"
    return seconds


def drop_page_cache() -> None:
    """Empty Linux's page cache (root only): the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root on Linux to empty the page cache: {e}") from None


def measure(paths: dict, n: int, export_up_to: int, storage: dict | None = None,
            env: dict | None = None) -> dict:
    """status, report, export, then resume (which compacts an output of small files: the
    status after it reads the output as the job leaves it); only those in COMMANDS."""
    options = ["--storage-options", json.dumps(storage)] if storage else []
    status = ["status", paths["out"], "--manifest", paths["manifest"], "--json", *options]
    dest = Path(paths["folder"])
    shutil.rmtree(dest / "export", ignore_errors=True)
    commands = {
        "status": status,
        "report": ["report", paths["out"], "--dest", str(dest / "report"), *options],
        "export": (["export", paths["out"], "--format", "hf-parquet",
                    "--dest", str(dest / "export"), *options] if n <= export_up_to else None),
        "resume": ["run", paths["job"], "--no-report"],
        "status after resume": status,
    }
    wanted = {*COMMANDS, *(["status after resume"] if "resume" in COMMANDS else [])}
    return {name: timed(argv, env) for name, argv in commands.items()
            if argv is not None and name in wanted}


def on_s3(source: Path, local_out: str, work: Path, latency_ms: float,
          export_up_to: int) -> dict:
    """A local copy, on the local S3 server (moto), read through the fault proxy, which
    holds every request `latency_ms` (a remote store's round trip)."""
    from moto.server import ThreadedMotoServer
    from s3_faults import FaultProxy
    logging.getLogger("werkzeug").setLevel(logging.ERROR)      # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    direct = {"client_kwargs": {"endpoint_url": endpoint}}
    fs = Output("s3://unused", direct).fs
    bucket = f"scale-{uuid.uuid4().hex[:8]}"       # moto's buckets outlive its server
    try:
        fs.mkdir(bucket)
        began = time.time()
        s3_copy(source, local_out, f"s3://{bucket}/out", direct)
        print(f"  copied to S3 in {time.time() - began:.0f} s", file=sys.stderr)
        with FaultProxy(endpoint, latency_s=latency_ms / 1000) as proxy:
            storage = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
            figures = measure(paths_of(source, f"s3://{bucket}/out", work / "s3", storage),
                              rows_of(source), export_up_to, storage, env)
            figures["requests"] = len(proxy.log)
            return figures
    finally:
        fs.rm(bucket, recursive=True)
        server.stop()


def rows_of(source: Path) -> int:
    return json.loads((source / "summary.json").read_text())["manifest"]["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--s3-latency-ms", type=float, default=None)
    parser.add_argument("--layout", choices=["compacted", "small-files", "both"],
                        default="both", help="the output as a job leaves it (compacted), "
                        "as written before compaction existed (small files), or both")
    parser.add_argument("--export-up-to", type=int, default=100_000)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "maskface-scale"))
    parser.add_argument("--code", default=str(ROOT),
                        help="time the commands of another checkout (an older commit, for a "
                             "before/after) on the same outputs")
    parser.add_argument("--no-local", action="store_true", help="only the S3 figures")
    parser.add_argument("--commands", nargs="+", choices=ALL_COMMANDS,
                        default=list(ALL_COMMANDS),
                        help="time only these (`resume` includes the status after it)")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before each command (Linux, root): an "
                             "output not read since it was written, as an old one is")
    parser.add_argument("--s3-small-files-up-to", type=int, default=100_000,
                        help="S3 figures of the small-files layout up to this many rows (a "
                             "million rows are 250,000 uploads to moto)")
    args = parser.parse_args()
    global CODE, COMMANDS, COLD
    CODE, COMMANDS, COLD = str(Path(args.code).resolve()), tuple(args.commands), args.cold
    layouts = {"compacted": [True], "small-files": [False], "both": [True, False]}[args.layout]
    for n in args.rows:
        source = written(Path(args.work), n)
        for compacted in layouts:
            layout = "compacted" if compacted else "small files"
            figures: dict = {"rows": n, "layout": layout, "code": CODE, "cold": COLD}
            folder = source.parent / layout.replace(" ", "-")
            began = time.time()
            out = local_copy(source, folder, compacted)
            if not COLD:                   # hard links share the source's cache state
                _read_every_file(folder / "out" / "metrics")
            print(f"  {layout} copy in {time.time() - began:.0f} s", file=sys.stderr)
            # S3 first: the local resume compacts a copy of small files
            if args.s3_latency_ms is not None and (compacted or n <= args.s3_small_files_up_to):
                figures[f"s3 +{args.s3_latency_ms:g} ms"] = on_s3(
                    source, out, folder, args.s3_latency_ms, args.export_up_to)
            if not args.no_local:
                figures["local"] = measure(paths_of(source, out, folder, None), n,
                                           args.export_up_to)
            shutil.rmtree(folder, ignore_errors=True)
            print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
