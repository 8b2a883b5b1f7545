"""Measuring the engine: networks of the real shapes with random weights, time per
phase and per kind of step, FLOPs, MFU, and whole edits extrapolated through the
`Schedule`. `maskface bench` prints what these return; nothing here is a test.

A "kind" of step is a distinct set of work: the inversion prefix (generator + masked
recon), the classifier steps, the steps that also run the parser (with gradients for
seg/size, without for dynamic masking alone), and the noise steps. An edit at paper
defaults is so many steps of each kind; timing a few steps of each and multiplying by
the Schedule's counts gives the time of a whole edit without running 1,500 steps.
"""
from __future__ import annotations

import logging
import resource
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.classifier import BranchedTiny
from models.e4e import E4EInitializer, Encoder4Editing
from models.face_parser import FaceParser
from models.loaders import Models
from models.lpips_masked import MaskedLPIPS
from models.stylegan2 import Generator, compute_mean_latent
from models.tiny import tiny_classifier, tiny_generator

from pipeline.engine.batch_size import EVERY_TERM
from pipeline.engine.editor import Editor, EditResult, StartPoint
from pipeline.engine.runtime import Runtime
from pipeline.engine.schedule import Schedule
from pipeline.engine.settings import EditConfig, EditSettings

log = logging.getLogger(__name__)

# preset: (generator px, parser working size, tiny widths)
PRESETS = {"tiny": (64, 64, True), "256": (256, 512, False), "1024": (1024, 512, False)}
# What each mode edits in the bench: every loss term on (hair: seg; size > 0).
BENCH_EDIT = EVERY_TERM


def bench_models(preset: str, mode: str, device: str, seed: int = 0) -> Models:
    """Random-weight networks of the preset's real shapes (tiny: the test widths)."""
    size, parser_size, tiny = PRESETS[preset]
    torch.manual_seed(seed)
    g = tiny_generator(size) if tiny else Generator(size, channel_multiplier=2)
    e4e = lpips = None
    if mode == "global":
        widths = (16, 16, 32, 32) if tiny else (64, 128, 256, 512)
        e4e = E4EInitializer(Encoder4Editing(size, widths=widths, style_dim=g.style_dim))
        lpips = MaskedLPIPS()
    def ready(net):
        return net.eval().requires_grad_(False).to(device)
    g = ready(g)
    return Models(generator=g, face_parser=ready(FaceParser(parser_size)),
                  classifier=ready(tiny_classifier() if tiny else BranchedTiny()),
                  mean_latent=compute_mean_latent(g, 1000).to(device),
                  e4e=None if e4e is None else ready(e4e),
                  lpips=None if lpips is None else ready(lpips), hashes={}, tiny=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int,
              pick: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds of `fn` after one warm-up call: the median of `repeats` calls, or what
    `pick` takes from them (`min` for a peak)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return pick(times)


def peak_rates(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """FLOP/s of the densest matrix products this torch build runs on this device, now,
    each the best of a few calls: a square matmul (BLAS) and a 3x3 convolution of 512
    channels at 64x64 (oneDNN's or cuDNN's implicit GEMM, the op StyleGAN2 and the parser
    are made of). MFU divides by the highest: on the AMD CPU we develop on, MKL's sgemm
    reaches ~180 GFLOP/s while oneDNN's convolutions reach ~440 (the AVX-512 peak), so a
    matmul-only peak read MFU above 100%. The bench samples this around every measurement
    (on a shared machine one sample can be far below the peak)."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    batch = 8 if device.type == "cuda" else 1
    x = torch.randn(batch, 512, 64, 64, device=device, dtype=dtype)
    w = torch.randn(512, 512, 3, 3, device=device, dtype=dtype)
    with torch.no_grad():
        matmul = time_call(lambda: a @ b, device, 5, pick=min)
        conv = time_call(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, 5, pick=min)
    return {"matmul": 2 * n ** 3 / matmul, "conv3x3": 2 * batch * 512 * 512 * 9 * 64 * 64 / conv}


def phase_times(models: Models, settings: EditSettings, batch: int, repeats: int,
                runtime: Runtime) -> dict[str, float]:
    """Seconds per step of each network's forward and backward, measured alone."""
    runtime.apply(models.generator.input.input.device)
    m = runtime.prepare(models)
    g = m.generator
    device = g.input.input.device
    latent = m.mean_latent.view(1, 1, -1).repeat(batch, g.n_latent, 1).requires_grad_(True)
    noises = g.make_noise(batch)
    image = runtime.images(torch.rand(batch, 3, g.size, g.size, device=device))
    mask = torch.ones(batch, 1, g.size, g.size, device=device)
    size = settings.parser_size

    def backward_of(fn):
        def run():
            x = image.detach().requires_grad_(True)
            with runtime.autocast_context(device):
                out = fn(x)
            out.float().sum().backward()
        return run

    def generator():
        with runtime.autocast_context(device):
            out = g(latent, noises)
        out.float().square().mean().backward()

    optimizer = torch.optim.Adam([latent], lr=1e-3)
    latent.grad = torch.zeros_like(latent)
    out = {"generator": time_call(generator, device, repeats),
           "parser": time_call(backward_of(lambda x: m.face_parser(
               x, out_size=size, working_size=size)), device, repeats),
           "classifier": time_call(backward_of(m.classifier), device, repeats),
           "optimizer": time_call(optimizer.step, device, repeats)}
    if m.lpips is not None:
        features = m.lpips.layer_features(image)
        out["lpips"] = time_call(backward_of(lambda x: m.lpips(x, image, mask,
                                                                y_features=features)),
                                 device, repeats)
    return out


@dataclass
class StepKind:
    name: str            # e.g. "recon", "recon+classf+parser", "noise"
    count: int           # steps of this kind in one edit
    first: int           # a latent step of this kind (-1: the noise phase)


def bench_schedule(mode: str, overrides: dict) -> tuple[EditSettings, Schedule]:
    """The settings and schedule of the bench's edit (BENCH_EDIT) in this mode."""
    edit = BENCH_EDIT[mode]
    settings = EditConfig.from_overrides(overrides).resolve(edit.attributes)
    return settings, Schedule.for_group(settings, [settings.loss.weights.seg], [edit.size])


def step_kinds(schedule: Schedule) -> list[StepKind]:
    """The kinds of steps of an edit, how many of each, and where each first occurs."""
    def kind(i):
        terms = list(schedule.terms(i))
        if schedule.parser_on(i):
            terms.append("parser" if schedule.seg_on(i) or schedule.size_on(i) else "parser-nograd")
        return "+".join(terms)
    counts = Counter(kind(i) for i in schedule.latent_range)
    firsts: dict[str, int] = {}
    for i in schedule.latent_range:
        firsts.setdefault(kind(i), i)
    kinds = [StepKind(name, counts[name], firsts[name]) for name in firsts]
    if schedule.noise_iterations:
        kinds.append(StepKind("noise", schedule.noise_iterations, -1))
    return kinds


def kind_config(overrides: dict, kind: StepKind, steps: int) -> tuple[EditConfig, int]:
    """The EditConfig and the start step that run exactly `steps` steps of one kind."""
    latent_steps = EditConfig.from_overrides(overrides).base.steps.latent
    if kind.first < 0:          # the noise phase alone: start past the latent phase
        return (EditConfig.from_overrides({**overrides, "steps.noise": steps - 1}),
                latent_steps)
    return (EditConfig.from_overrides({**overrides, "steps.latent": kind.first + steps,
                                       "steps.noise": 0, "steps.log": 10 ** 9}), kind.first)


def _marks(models: Models, runtime: Runtime, overrides: dict, kind: StepKind, mode: str,
           batch: int, steps: int, read: Callable[[], float]) -> list[float]:
    """`read()` after each of `steps` steps of one kind, through the real engine."""
    config, first = kind_config(overrides, kind, steps)
    g = models.generator
    device = g.input.input.device
    images = torch.rand(batch, 3, g.size, g.size, device=device,
                        generator=torch.Generator(device).manual_seed(0))
    latent = models.mean_latent.view(1, 1, -1).repeat(batch, g.n_latent, 1)
    marks = [read()]

    def tick(_info):
        _sync(device)
        marks.append(read())
    Editor(models, config, runtime).edit(images, [BENCH_EDIT[mode]] * batch,
                                         start=StartPoint(latent=latent, step=first),
                                         callback=tick)
    return marks


def flop_counter() -> FlopCounterMode:
    """What the bench counts FLOPs with: torch's counter of matmuls and convolutions,
    forward and backward (2 FLOPs a multiply-add)."""
    return FlopCounterMode(display=False)


def time_kind(models: Models, runtime: Runtime, overrides: dict, kind: StepKind, mode: str,
              batch: int, steps: int) -> dict[str, float]:
    """Median seconds per step of one kind, its FLOPs per step (torch.utils.flop_counter:
    matmuls and convolutions, forward and backward, of the second step of a counted run)
    and the first step's extra time (input masks, compilation)."""
    runtime.apply(models.generator.input.input.device)
    times = _marks(models, runtime, overrides, kind, mode, batch, steps + 1, time.perf_counter)
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    counter = flop_counter()
    with counter:
        flops = _marks(models, Runtime(compile=False), overrides, kind, mode, batch, 2,
                       lambda: float(counter.get_total_flops()))
    seconds = statistics.median(gaps)
    return {"seconds": seconds, "flops": flops[2] - flops[1],
            "first_step_extra_s": times[1] - times[0] - seconds}


def peak_memory(device: torch.device) -> float:
    """Peak bytes: the CUDA allocator's high-water mark, or the process's max RSS."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# A short edit that passes through every kind of step (prefix, classifier, parser with
# and without gradients, noise): long enough for rounding to compound, short enough for
# the 1024 preset's plain path; its first run also meets every graph a compile makes.
EVERY_KIND_EDIT = {"steps.latent": 8, "steps.noise": 2, "loss.start_steps.classf": 2,
                  "loss.start_steps.seg": 4, "dynamic_masking_iters": 2, "steps.log": 10 ** 9}


def deviation(models: Models, runtime: Runtime, mode: str, overrides: dict,
              batch: int = 1) -> dict:
    """How far `runtime` moves an edit's numbers from the plain path's: the same short
    edit (EVERY_KIND_EDIT) of the same random input under both, compared on what a job
    writes. Images are in [0, 1]: 1/255 is one 8-bit level."""
    g = models.generator
    config = EditConfig.from_overrides({**overrides, **EVERY_KIND_EDIT})
    images = torch.rand(batch, 3, g.size, g.size, device=g.input.input.device,
                        generator=torch.Generator(g.input.input.device).manual_seed(2))
    requests = [BENCH_EDIT[mode]] * batch
    plain: list[EditResult] = []
    other: list[EditResult] = []
    for rt, into in ((Runtime.plain(), plain), (runtime, other)):
        rt.apply(g.input.input.device)
        into += Editor(models, config, rt).edit(images, requests)
    if not all(r.ok for r in plain + other):
        return {"error": next(r.error for r in plain + other if not r.ok)}

    def stacked(results: list, field: str) -> torch.Tensor:
        return torch.stack([getattr(r, field) for r in results])

    # the image as a job writes it (clamped to [0, 1])
    edited = (stacked(other, "edited").clamp(0, 1) - stacked(plain, "edited").clamp(0, 1)).abs()
    latent = (stacked(other, "latent") - stacked(plain, "latent")).abs()
    prob = [abs(o.metrics["prob_result"][a] - p.metrics["prob_result"][a])
            for o, p in zip(other, plain) for a in o.metrics["prob_result"]]
    return {"steps": plain[0].metrics["steps"], "edited_max_abs": edited.max().item(),
            "edited_mean_abs": edited.mean().item(),
            "edited_share_off_by_half_a_level": (edited > 0.5 / 255).float().mean().item(),
            "latent_max_abs": latent.max().item(), "prob_result_max_abs": max(prob)}


def warm_up(models: Models, runtime: Runtime, mode: str, batch: int, overrides: dict) -> dict:
    """What a process pays once before it runs at speed, beyond loading: the short edit
    through every kind of step (EVERY_KIND_EDIT) run twice at this batch size; the first
    compiles what the runtime compiles and meets every first use, the second runs warm."""
    g = models.generator
    device = g.input.input.device
    runtime.apply(device)
    editor = Editor(models, EditConfig.from_overrides({**overrides, **EVERY_KIND_EDIT}), runtime)
    images = torch.rand(batch, 3, g.size, g.size, device=device,
                        generator=torch.Generator(device).manual_seed(3))
    seconds = []
    for _ in range(2):
        began = time.perf_counter()
        editor.edit(images, [BENCH_EDIT[mode]] * batch)
        _sync(device)
        seconds.append(time.perf_counter() - began)
    return {"first_edit_s": seconds[0], "warm_edit_s": seconds[1],
            "first_use_s": max(seconds[0] - seconds[1], 0.0),
            "steps": EVERY_KIND_EDIT["steps.latent"] + EVERY_KIND_EDIT["steps.noise"] + 1}


def early_stop_steps(models: Models, runtime: Runtime, mode: str, batch: int,
                     overrides: dict) -> dict:
    """Whole edits at paper defaults with early stopping on (its settings from
    `overrides`): the steps each image ran against the schedule's, and the time."""
    g = models.generator
    device = g.input.input.device
    config = EditConfig.from_overrides({**overrides, "early_stop.enabled": True})
    images = torch.rand(batch, 3, g.size, g.size, device=device,
                        generator=torch.Generator(device).manual_seed(1))
    runtime.apply(device)
    began = time.perf_counter()
    results = Editor(models, config, runtime).edit(images, [BENCH_EDIT[mode]] * batch)
    seconds = time.perf_counter() - began
    full = bench_schedule(mode, {**overrides, "early_stop.enabled": True})[1].total_iterations
    steps = [r.metrics.get("steps", full) for r in results]
    return {"steps_per_image": steps, "schedule_steps": full,
            "steps_saved": 1 - sum(steps) / (full * len(steps)), "seconds": seconds,
            "early_stop": {k: v for k, v in config.base.as_dict().items()
                           if k.startswith("early_stop.")}}
