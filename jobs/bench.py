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
from pipeline.engine import Editor, EditRequest


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


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="time optimisation steps at several batch sizes",
                            description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--parser-size", type=int, help="face parser working size "
                   "(default: the generator's resolution; 512 for the real models)")
    p.add_argument("--device")
    p.set_defaults(func=run_bench)
