"""`maskface bench`: seconds per optimisation step, batch 1 against batch N.

Builds tiny random-weight networks in memory (nothing to download), runs the latent
phase with every loss on (a hair edit: recon, classifier, seg, dynamic masking) and
prints seconds per step and per image. A figure, not a test: run it on an idle machine
and compare ratios measured in one run.
"""
from __future__ import annotations

import logging
import time

import torch

from models.face_parser import FaceParser
from models.loaders import Models
from models.stylegan2 import compute_mean_latent
from models.tiny import tiny_classifier, tiny_generator
from pipeline.config import EditConfig
from pipeline.engine import Editor
from pipeline.rows import EditRequest


def tiny_models(resolution: int, parser_size: int, device: str) -> Models:
    torch.manual_seed(0)
    g = tiny_generator(resolution).eval().requires_grad_(False)
    return Models(generator=g.to(device),
                  face_parser=FaceParser(parser_size).eval().requires_grad_(False).to(device),
                  classifier=tiny_classifier().eval().requires_grad_(False).to(device),
                  mean_latent=compute_mean_latent(g, 2000).to(device), e4e=None, lpips=None,
                  hashes={}, tiny=True)


def time_steps(models: Models, batch: int, steps: int, parser_size: int) -> float:
    """Median seconds per latent step (the first step, a warm-up, is left out)."""
    config = EditConfig.from_overrides({
        "steps.latent": steps + 1, "steps.noise": 0, "loss.start_steps.classf": 0,
        "loss.start_steps.seg": 0, "dynamic_masking_iters": steps + 1,
        "parser_size": parser_size})
    g = models.generator
    images = torch.rand(batch, 3, g.size, g.size, device=g.input.input.device)
    stamps = []

    def tick(_):
        if images.is_cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    Editor(models, config).edit(images, [EditRequest(("black_hair",), (1.0,))] * batch,
                                callback=tick)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2]


def run_bench(args) -> int:
    logging.getLogger("pipeline.engine").setLevel(logging.WARNING)   # no per-step lines
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} timed steps")
    print(f"{'px':>5} {'parser':>6} {'batch':>5} {'s/step':>8} {'s/step/img':>10} {'ratio':>6}")
    for res in args.resolution:
        parser_size = args.parser_size or res
        models = tiny_models(res, parser_size, device)
        base = None
        for batch in args.batch:
            per_step = time_steps(models, batch, args.steps, parser_size)
            per_image = per_step / batch
            base = base or per_image
            print(f"{res:>5} {parser_size:>6} {batch:>5} {per_step:>8.3f} {per_image:>10.3f} "
                  f"{per_image / base:>6.2f}")
    print("ratio: seconds per image against the first batch size (lower is better)")
    return 0


PIPELINE_EDIT = {"steps.latent": 40, "steps.noise": 10, "loss.start_steps.classf": 20,
                 "loss.start_steps.seg": 20, "dynamic_masking_iters": 10, "parser_size": 64}


def run_pipeline_bench(args) -> int:
    """Images per hour through `maskface run` (local Ray) against the engine called
    directly in this process, on the same rows with tiny 64 px models."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from jobs.demo import PHOTO
    from manifests.schema import validate, write_manifest
    from models.loaders import load_models
    from models.spec import REQUIRED, read_spec
    from models.tiny import make_tiny
    from pipeline.images import read_image
    from pipeline.job import JobSettings, run_job

    logging.getLogger("pipeline").setLevel(logging.WARNING)
    n, batch = args.pipeline, args.batch[-1]
    work = Path(tempfile.mkdtemp(prefix="maskface-bench-"))
    spec_path = make_tiny(work / "weights", resolution=64)
    rows = pd.DataFrame({"id": [f"r{i:03d}" for i in range(n)], "image_uri": [str(PHOTO)] * n,
                         "attributes": [["smiling"]] * n, "targets": [[1.0]] * n})
    write_manifest(rows, str(work / "m.parquet"))
    settings = JobSettings(manifest=str(work / "m.parquet"), output=str(work / "out"),
                           models=str(spec_path), edit=PIPELINE_EDIT, batch_size=batch,
                           actors=1, cpu_threads=torch.get_num_threads())
    start = time.perf_counter()
    run_job(validate(rows), settings)
    pipe_total = time.perf_counter() - start
    written = pd.read_parquet(work / "out" / "metrics")["written_at"].sort_values().to_numpy()
    first_batch = written[batch - 1]
    pipe_steady = (len(written) - batch) / (written[-1] - first_batch)

    config = EditConfig.from_overrides(PIPELINE_EDIT)
    start = time.perf_counter()
    editor = Editor(load_models(read_spec(str(spec_path)), parser_size=64,
                                networks=REQUIRED), config)
    stamps = []
    for k in range(0, n, batch):
        images = torch.stack([read_image(str(PHOTO), 64) for _ in range(min(batch, n - k))])
        editor.edit(images, [EditRequest(("smiling",), (1.0,))] * len(images))
        stamps.append(time.perf_counter())
    direct_total = time.perf_counter() - start
    direct_steady = (n - batch) / (stamps[-1] - stamps[0])
    print(f"{n} rows, batch {batch}, tiny 64 px models, schedule {PIPELINE_EDIT}")
    print(f"{'':>22} {'images/hour':>12} {'steady images/hour':>19}")
    print(f"{'maskface run (Ray)':>22} {n / pipe_total * 3600:>12.0f} {pipe_steady * 3600:>19.0f}")
    print(f"{'engine directly':>22} {n / direct_total * 3600:>12.0f} {direct_steady * 3600:>19.0f}")
    print(f"ratio (pipeline / direct): whole run {direct_total / pipe_total:.2f}, "
          f"steady state {pipe_steady / direct_steady:.2f}")
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="time optimisation steps at several batch sizes",
                            description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--parser-size", type=int, help="face parser working size "
                   "(default: the generator's resolution; 512 for the real models)")
    p.add_argument("--device")
    p.add_argument("--pipeline", type=int, metavar="ROWS",
                   help="instead: images/hour of `maskface run` over ROWS rows against the "
                        "engine directly (batch: the last --batch value)")
    p.set_defaults(func=lambda args: run_pipeline_bench(args) if args.pipeline else run_bench(args))
