"""`maskface bench`: what an edit costs on this machine, per phase, per kind of step,
and whole at paper defaults; FLOPs and MFU; our default path against the plain one.

    maskface bench --preset 1024 --batch 1 4 [--mode local|global] [--baseline]
        [--channels-last] [--compile | --no-compile] [--autocast bf16] [--tf32]
        [--json out.json]
    maskface bench --payback EAGER.json COMPILED.json

Networks have the real shapes (config-f StyleGAN2, DeepLabV3-ResNet50 at 512,
BranchedTiny; global adds e4e and LPIPS-VGG) with random weights: nothing to download.
A figure, not a test: compare ratios measured in one run on an idle machine. With
--baseline it also runs one short edit under both paths and reports how far the
default path's image, latent and probabilities are from the plain path's.

The whole-edit figures are extrapolated from timed steps of each kind (no image I/O,
no identity metric, no Ray): `extrapolated_seconds_per_edit`. `--pipeline` measures a
real job end to end instead. The warm-up is measured whole: from process start, the
batch probe included, to a first short edit through every kind of step, less what that
edit costs warm; `--payback` says after how many edits a compiled run's longer warm-up
is bought back.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from pipeline.bench.document import AUTO_BATCH_CAP, BenchPlan, bench_document
from pipeline.bench.engine import PRESETS
from pipeline.bench.payback import compare_documents
from pipeline.engine.runtime import AUTOCAST, Runtime

from .options import parse_set


def run_bench(args) -> int:
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = BenchPlan(
        preset=args.preset, mode=args.mode, device=device,
        batches=parse_batches(args.batch, device), steps=args.steps, baseline=args.baseline,
        runtime=Runtime(channels_last=args.channels_last,
                        compile="auto" if args.compile is None else args.compile,
                        autocast=args.autocast, tf32=args.tf32),
        early_stop=None if args.early_stop is None else parse_set(args.early_stop))
    report = bench_document(plan)
    print_table(report)
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


def run_payback(args) -> int:
    """--payback EAGER.json COMPILED.json: two bench runs of the same preset, batch and
    device, each in its own process."""
    eager, compiled = (json.loads(Path(p).read_text()) for p in args.payback)
    try:
        compared = compare_documents(eager, compiled)
    except ValueError as e:
        raise SystemExit(f"bench --payback: {e}") from None
    warm, edit, edits = (compared["warm_up_s"], compared["seconds_per_edit"],
                         compared["payback_edits"])
    print(f"warm-up, whole: {warm['eager']:.1f} s eager, {warm['compiled']:.1f} s compiled; an "
          f"edit (extrapolated): {edit['eager']:.1f} s eager, {edit['compiled']:.1f} s compiled")
    print("compiling never pays back: its edits are no faster" if edits is None else
          f"compiling pays back its warm-up after {edits:.1f} edit(s)")
    return 0


def parse_batches(asked: list[str], device: torch.device) -> list[int | None]:
    """--batch values: sizes, or None for "auto" (GPU only: the size a job's actor probes
    for, the largest whose heaviest step fits, up to AUTO_BATCH_CAP)."""
    sizes: list[int | None] = []
    for value in asked:
        if value == "auto" and device.type != "cuda":
            raise SystemExit("bench: --batch auto probes GPU memory; give sizes on a CPU")
        if value != "auto" and not (value.isdigit() and int(value) > 0):
            raise SystemExit(f"bench: --batch takes positive sizes or auto, got {value!r}")
        sizes.append(None if value == "auto" else int(value))
    return sizes


def print_table(report: dict) -> None:
    env = report["env"]
    best = {op: max(p[op] for p in env["peak_samples"]) / 1e9 for op in env["peak_samples"][0]}
    precision = env["fp32_precision"]
    print(f"preset {report['preset']} ({report['mode']}), {env['device']}, autocast "
          f"{env['autocast'] or 'off'}, fp32 matmul {precision['matmul']} / conv "
          f"{precision['conv']}, torch {env['torch']}, {env['threads']} threads, compiled: "
          f"{'yes' if report['runtime']['compiled'] else 'no'}; peak "
          f"{env['peak_flops_per_s'] / 1e9:.0f} GFLOP/s (best of "
          f"{len(env['peak_samples'])} samples: "
          + ", ".join(f"{op} {v:.0f}" for op, v in best.items()) + ")", file=sys.stderr)
    for label, runs in report["runs"].items():
        for r in runs:
            phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_ms_per_step"].items())
            print(f"[{label}] batch {r['batch']}: extrapolated "
                  f"{r['extrapolated_seconds_per_edit']:.1f} s/edit, "
                  f"{r['extrapolated_images_per_hour']:.1f} img/h (steps only: no "
                  f"I/O, identity or Ray), MFU {r['mfu']:.1%}; ms/step: {phases}",
                  file=sys.stderr)
            for name, k in r["kinds"].items():
                print(f"    {name:40s} x{k['count']:<5d} {k['seconds'] * 1e3:9.1f} ms/step "
                      f"{k['flops'] / 1e9:9.1f} GFLOP/step  first step "
                      f"+{k['first_step_extra_s']:.1f} s", file=sys.stderr)
    if "baseline" in report["runs"]:
        for d, b in zip(report["runs"]["default"], report["runs"]["baseline"]):
            ratio = b["extrapolated_seconds_per_edit"] / d["extrapolated_seconds_per_edit"]
            print(f"default / baseline, batch {d['batch']}: {ratio:.2f}x faster", file=sys.stderr)
    warm = report["warm_up"]
    for label, whole in warm["whole_s"].items():
        w = warm["runs"][label]
        print(f"[{label}] warm-up, whole: {whole:.1f} s (process start to networks "
              f"{warm['process_start_to_networks_s']:.1f} s, probe {warm['probe_s']:.1f} s, "
              f"first {w['steps']}-step edit {w['first_edit_s']:.1f} s against "
              f"{w['warm_edit_s']:.1f} s warm)", file=sys.stderr)
    if "payback_over_baseline_edits" in warm:
        edits = warm["payback_over_baseline_edits"]
        print("the default path's extra warm-up " + ("never pays back" if edits is None else
              f"pays back after {edits:.1f} edit(s)") + " against the plain path",
              file=sys.stderr)
    dev = report.get("deviation_from_baseline")
    if dev and "error" in dev:
        print(f"deviation from the plain path: not measured ({dev['error']})", file=sys.stderr)
    elif dev:
        print(f"deviation from the plain path after a {dev['steps']}-step edit: image max "
              f"{dev['edited_max_abs'] * 255:.2f} / mean {dev['edited_mean_abs'] * 255:.4f} "
              f"8-bit levels ({dev['edited_share_off_by_half_a_level']:.2%} of values off by "
              f"half a level or more), latent max {dev['latent_max_abs']:.2e}, target "
              f"probability max {dev['prob_result_max_abs']:.2e}", file=sys.stderr)
    stop = report.get("early_stop")
    if stop:
        print(f"early stopping {stop['early_stop']}: {stop['steps_saved']:.1%} of "
              f"{stop['schedule_steps']} steps saved per image (steps run: "
              f"{stop['steps_per_image']}), {stop['seconds']:.0f} s", file=sys.stderr)
    saving = report.get("prefix_saving_14_attributes")
    if saving:
        print(f"shared prefix, 14 local attributes per image: {saving['steps_saved']:.1%} fewer "
              f"steps, {saving['time_saved']:.1%} less time", file=sys.stderr)


def run_job_bench(args) -> int:
    """Images per hour through `maskface run` (local Ray) against the engine called
    directly in this process, on the same rows with tiny 64 px models."""
    from jobs.demo import PHOTO
    from pipeline.bench.job import PIPELINE_EDIT, job_bench   # pandas and Ray: only here

    logging.getLogger("pipeline").setLevel(logging.WARNING)
    batch = parse_batches(args.batch[-1:], torch.device("cpu"))[0]
    if args.pipeline <= batch:
        raise ValueError(f"--pipeline {args.pipeline}: give more rows than the batch ({batch}); "
                         "the steady rate is measured after the first batch")
    result = job_bench(args.pipeline, batch, PHOTO)
    n, job, direct = result.rows, result.job, result.direct
    print(f"{n} rows, batch {batch}, tiny 64 px models, schedule {PIPELINE_EDIT}: measured "
          "end to end (image reads, writes, identity metric, Ray)")
    print(f"{'':>22} {'images/hour':>12} {'steady images/hour':>19}")
    print(f"{'maskface run (Ray)':>22} {n / job.seconds * 3600:>12.0f} "
          f"{job.steady_per_s * 3600:>19.0f}")
    print(f"{'engine directly':>22} {n / direct.seconds * 3600:>12.0f} "
          f"{direct.steady_per_s * 3600:>19.0f}")
    print(f"ratio (pipeline / direct): whole run {direct.seconds / job.seconds:.2f}, "
          f"steady state {job.steady_per_s / direct.steady_per_s:.2f}")
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="what an edit costs here: per phase, per step kind, "
                                          "whole edits, FLOPs and MFU",
                            description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="network shapes: tiny (64 px test widths), 256, 1024 (config-f)")
    p.add_argument("--mode", choices=("local", "global"), default="local",
                   help="global adds e4e and LPIPS-VGG")
    p.add_argument("--batch", nargs="+", default=["1", "4"],
                   help="batch sizes, or auto (GPU: the largest that fits, up to "
                        f"{AUTO_BATCH_CAP}, as a job's actor probes)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--device")
    p.add_argument("--baseline", action="store_true",
                   help="also run the plain path (eager, NCHW, fp32, a device read per step) "
                        "and print the ratio")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the networks (default: the runtime's auto rule, "
                        "on for CPUs at 256 px and more)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST), help="networks in this precision")
    p.add_argument("--tf32", action="store_true", help="CUDA: TF32 matmuls and convolutions")
    p.add_argument("--early-stop", nargs="*", metavar="KEY=VALUE",
                   help="also run whole edits at paper defaults with early stopping on "
                        "(optionally early_stop.margin=0.05 ...) and print the steps saved")
    p.add_argument("--json", metavar="FILE", help="write the JSON document here, not stdout")
    p.add_argument("--pipeline", type=int, metavar="ROWS",
                   help="instead: images/hour of `maskface run` over ROWS rows, measured end "
                        "to end, against the engine directly (batch: the last --batch value)")
    p.add_argument("--payback", nargs=2, metavar=("EAGER.json", "COMPILED.json"),
                   help="instead: after how many edits the compiled run's longer warm-up is "
                        "paid back (two --json documents of the same preset and batch)")
    p.set_defaults(func=lambda args: (run_payback(args) if args.payback else
                                      run_job_bench(args) if args.pipeline else
                                      run_bench(args)))
