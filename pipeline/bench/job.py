"""Measuring the job: images per hour through the real job (`run_job`, local Ray: image
reads, writes, the identity metric) against the engine called directly in this process,
on the same rows with tiny 64 px models (`maskface bench --pipeline`)."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from manifests.schema import read_manifest, write_manifest
from models.loaders import load_models
from models.spec import REQUIRED, read_spec
from models.tiny import make_tiny
from pipeline.engine.editor import Editor
from pipeline.engine.rows import EditRequest
from pipeline.engine.runtime import Runtime
from pipeline.engine.settings import EditConfig
from pipeline.output.images import read_image
from pipeline.runner.driver import run_job
from pipeline.runner.spec import JobSpec

PIPELINE_EDIT = {"steps.latent": 40, "steps.noise": 10, "loss.start_steps.classf": 20,
                 "loss.start_steps.seg": 20, "dynamic_masking_iters": 10, "parser_size": 64}


@dataclass(frozen=True)
class Throughput:
    """Seconds for all the rows, and images per second once the first batch is done."""
    seconds: float
    steady_per_s: float


@dataclass(frozen=True)
class JobBench:
    rows: int
    batch: int
    job: Throughput          # through `run_job`
    direct: Throughput       # the engine called directly


def job_bench(rows: int, batch: int, photo: Path) -> JobBench:
    """`rows` edits (smiling) of `photo`, in batches of `batch`, both ways, with tiny
    models made in a temporary folder."""
    work = Path(tempfile.mkdtemp(prefix="maskface-bench-"))
    spec_path = make_tiny(work / "weights", resolution=64)
    job = _through_the_job(work, spec_path, rows, batch, photo)
    return JobBench(rows, batch, job, _engine_directly(spec_path, rows, batch, photo))


def _through_the_job(work: Path, spec_path: Path, n: int, batch: int,
                     photo: Path) -> Throughput:
    rows = pd.DataFrame({"id": [f"r{i:03d}" for i in range(n)], "image_uri": [str(photo)] * n,
                         "attributes": [["smiling"]] * n, "targets": [[1.0]] * n})
    # the photo's folder recorded as the manifest's input root, as the builders do
    write_manifest(rows, str(work / "m.parquet"), input_roots=[photo.resolve().parent])
    manifest = read_manifest(str(work / "m.parquet"))
    job = JobSpec(manifest=str(work / "m.parquet"), output=str(work / "out"),
                  models=str(spec_path), edit=EditConfig.from_overrides(PIPELINE_EDIT),
                  batch_size=batch, actors=1, cpu_threads=torch.get_num_threads())
    start = time.perf_counter()
    summary = run_job(manifest.rows, job, manifest.schema)
    total = time.perf_counter() - start
    if summary["this_run"]["ok"] != n:         # a rate of failed rows measures nothing
        raise RuntimeError(f"the pipeline bench's job edited {summary['this_run']['ok']} of "
                           f"{n} rows: {summary['errors'][:1]}")
    written = pd.read_parquet(work / "out" / "metrics")["written_at"].sort_values().to_numpy()
    first_batch = written[batch - 1]
    return Throughput(total, (len(written) - batch) / (written[-1] - first_batch))


def _engine_directly(spec_path: Path, n: int, batch: int, photo: Path) -> Throughput:
    config = EditConfig.from_overrides(PIPELINE_EDIT)
    start = time.perf_counter()
    runtime = Runtime()
    runtime.apply(torch.device("cpu"))
    editor = Editor(load_models(read_spec(str(spec_path)), parser_size=64,
                                networks=REQUIRED), config, runtime)
    stamps = []
    for k in range(0, n, batch):
        images = torch.stack([read_image(str(photo), 64) for _ in range(min(batch, n - k))])
        editor.edit(images, [EditRequest(("smiling",), (1.0,))] * len(images))
        stamps.append(time.perf_counter())
    total = time.perf_counter() - start
    return Throughput(total, (n - batch) / (stamps[-1] - stamps[0]))
