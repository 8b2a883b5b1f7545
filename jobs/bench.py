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
import os
import sys
import time
from pathlib import Path

import torch

from pipeline.engine.batch_size import auto_batch_size
from pipeline.engine.bench import (PRESETS, bench_models, bench_schedule, deviation,
                                   early_stop_steps, peak_memory, peak_rates, phase_times,
                                   step_kinds, time_kind, warm_up)
from pipeline.engine.editor import Editor
from pipeline.engine.rows import EditRequest
from pipeline.engine.runtime import AUTOCAST, Runtime, fp32_precision
from pipeline.engine.settings import EditConfig

from .options import parse_set

AUTO_BATCH_CAP = 64         # --batch auto: the most a GPU probe tries
IMPORTED = time.perf_counter()


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: /proc; elsewhere since this module
    was imported)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")    # starttime, in ticks
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED


def measure(models, runtime: Runtime, mode: str, batch: int, steps: int,
            overrides: dict) -> dict:
    """One runtime at one batch size: phases, kinds, the whole edit extrapolated from them,
    FLOPs (MFU is added once the peak is known)."""
    settings, schedule = bench_schedule(mode, overrides)
    phases = phase_times(models, settings, batch, steps, runtime)
    kinds = {}
    for kind in step_kinds(schedule):
        kinds[kind.name] = {"count": kind.count,
                            **time_kind(models, runtime, overrides, kind, mode, batch, steps)}
    edit_s = sum(k["count"] * k["seconds"] for k in kinds.values())
    flops = sum(k["count"] * k["flops"] for k in kinds.values())
    return {
        "batch": batch, "phases_ms_per_step": {k: round(v * 1e3, 2) for k, v in phases.items()},
        "kinds": kinds, "steps_per_edit": schedule.total_iterations,
        "extrapolated_seconds_per_edit": edit_s / batch,
        "extrapolated_images_per_hour": 3600 * batch / edit_s,
        "flops_per_edit": flops / batch, "achieved_flops_per_s": flops / edit_s}


def prefix_saving(result: dict, attributes: int = 14, prefixes: int = 2) -> dict:
    """Steps and time a shared inversion prefix saves over `attributes` local edits of one
    image (CelebA-HQ's 14, with two recon masks: with and without the ears)."""
    recon = result["kinds"].get("recon")
    if recon is None:
        return {}
    edit_steps = result["steps_per_edit"]
    edit_s = result["extrapolated_seconds_per_edit"] * result["batch"]
    prefix_steps, prefix_s = recon["count"], recon["count"] * recon["seconds"]
    without = attributes * edit_steps
    with_prefix = prefixes * prefix_steps + attributes * (edit_steps - prefix_steps)
    time_without = attributes * edit_s
    time_with = prefixes * prefix_s + attributes * (edit_s - prefix_s)
    return {"steps_without": without, "steps_with": with_prefix,
            "steps_saved": 1 - with_prefix / without, "time_saved": 1 - time_with / time_without}


def run_bench(args) -> int:
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    asked = parse_batches(args.batch, device)
    runtime = Runtime(channels_last=args.channels_last,
                      compile="auto" if args.compile is None else args.compile,
                      autocast=args.autocast, tf32=args.tf32)
    # the plain path first: runtimes differ in process-wide state (reuse_memory), and the
    # first run of a process is the one that meets glibc's own settings
    runtimes = {**({"baseline": Runtime.plain()} if args.baseline else {}), "default": runtime}
    models = bench_models(args.preset, args.mode, str(device))
    overrides = {"parser_size": PRESETS[args.preset][1]}
    started_s = seconds_since_process_start()        # imports and the networks built
    probe_s = 0.0
    if None in asked:                                # GPU only (parse_batches)
        runtime.apply(device)
        began = time.perf_counter()
        probed = auto_batch_size(models, runtime, args.mode, AUTO_BATCH_CAP,
                                 overrides["parser_size"])
        probe_s = time.perf_counter() - began
    batches = [size or probed for size in asked]
    warm = {label: warm_up(models, rt, args.mode, batches[0], overrides)
            for label, rt in runtimes.items()}
    runtime.apply(device)
    dtype = AUTOCAST.get(args.autocast or "", torch.float32)
    peaks = [peak_rates(device, dtype)]
    report = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "device": str(device), "autocast": args.autocast,
                      "fp32_precision": fp32_precision() if device.type == "cuda" else
                      {"matmul": "ieee", "conv": "ieee"},
                      "flops_method": "torch.utils.flop_counter.FlopCounterMode: matmuls and "
                                      "convolutions, forward and backward"},
              "preset": args.preset, "mode": args.mode,
              "runtime": {**vars(runtime), "compiled": runtime.compiles(models)}, "runs": {}}
    for batch in batches:               # interleaved, so a drifting machine hits both alike
        for label, rt in runtimes.items():
            report["runs"].setdefault(label, []).append(
                measure(models, rt, args.mode, batch, args.steps, overrides))
            peaks.append(peak_rates(device, dtype))
    report["env"]["peak_flops_per_s"] = peak = max(max(p.values()) for p in peaks)
    report["env"]["peak_samples"] = peaks      # their spread: how noisy the machine was
    for runs in report["runs"].values():
        for r in runs:
            r["mfu"] = r["achieved_flops_per_s"] / peak
    report["warm_up"] = warm_up_report(warm, started_s, probe_s, batches[0])
    report["peak_memory_bytes"] = peak_memory(device)
    if args.baseline:
        report["deviation_from_baseline"] = deviation(models, runtime, args.mode, overrides)
        report["warm_up"]["payback_over_baseline_edits"] = payback_edits(
            report["runs"]["baseline"][0], warm["baseline"]["first_use_s"],
            report["runs"]["default"][0], warm["default"]["first_use_s"])
    if args.mode == "local":
        report["prefix_saving_14_attributes"] = prefix_saving(report["runs"]["default"][0])
    if args.early_stop is not None:
        report["early_stop"] = early_stop_steps(models, runtime, args.mode, batches[0],
                                                {**overrides, **parse_set(args.early_stop)})
    print_table(report)
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


def warm_up_report(warm: dict, started_s: float, probe_s: float, batch: int) -> dict:
    """The warm-up, whole: process start to the networks built (imports, model building),
    the batch probe, and each runtime's first short edit beyond what it costs warm
    (compilation, first uses). The first runtime measured met a fresh process; a later
    one shares what the first already paid (say so when quoting it)."""
    first = next(iter(warm))
    return {"batch": batch, "process_start_to_networks_s": started_s, "probe_s": probe_s,
            "runs": warm, "first_measured": first,
            "whole_s": {label: started_s + probe_s + w["first_use_s"]
                        for label, w in warm.items()}}


def payback_edits(slower_run: dict, slower_warm_up_s: float, faster_run: dict,
                  faster_warm_up_s: float) -> float | None:
    """After how many edits a faster path's extra warm-up is paid back by its faster
    edits (0: it warms up no slower; None: its edits are not faster)."""
    extra = faster_warm_up_s - slower_warm_up_s
    saved = (slower_run["extrapolated_seconds_per_edit"]
             - faster_run["extrapolated_seconds_per_edit"])
    if extra <= 0:
        return 0.0
    return extra / saved if saved > 0 else None


def run_payback(args) -> int:
    """--payback EAGER.json COMPILED.json: two bench runs of the same preset, batch and
    device, each in its own process."""
    eager, compiled = (json.loads(Path(p).read_text()) for p in args.payback)
    for name, r in (("eager", eager), ("compiled", compiled)):
        if "warm_up" not in r:
            raise SystemExit(f"bench --payback: the {name} JSON has no warm_up (an older bench)")
    keys = [(r["preset"], r["mode"], r["env"]["device"], r["runs"]["default"][0]["batch"])
            for r in (eager, compiled)]
    if keys[0] != keys[1]:
        raise SystemExit(f"bench --payback: the runs differ (preset, mode, device, batch): "
                         f"{keys[0]} against {keys[1]}")
    e_run, c_run = eager["runs"]["default"][0], compiled["runs"]["default"][0]
    e_warm = eager["warm_up"]["whole_s"]["default"]
    c_warm = compiled["warm_up"]["whole_s"]["default"]
    edits = payback_edits(e_run, e_warm, c_run, c_warm)
    print(f"warm-up, whole: {e_warm:.1f} s eager, {c_warm:.1f} s compiled; an edit "
          f"(extrapolated): {e_run['extrapolated_seconds_per_edit']:.1f} s eager, "
          f"{c_run['extrapolated_seconds_per_edit']:.1f} s compiled")
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
    from pipeline.runner.driver import run_job
    from pipeline.output.images import read_image
    from pipeline.runner.spec import JobSpec

    logging.getLogger("pipeline").setLevel(logging.WARNING)
    n, batch = args.pipeline, parse_batches(args.batch[-1:], torch.device("cpu"))[0]
    work = Path(tempfile.mkdtemp(prefix="maskface-bench-"))
    spec_path = make_tiny(work / "weights", resolution=64)
    rows = pd.DataFrame({"id": [f"r{i:03d}" for i in range(n)], "image_uri": [str(PHOTO)] * n,
                         "attributes": [["smiling"]] * n, "targets": [[1.0]] * n})
    write_manifest(rows, str(work / "m.parquet"))
    job = JobSpec(manifest=str(work / "m.parquet"), output=str(work / "out"),
                  models=str(spec_path), edit=PIPELINE_EDIT, batch_size=batch, actors=1,
                  cpu_threads=torch.get_num_threads())
    start = time.perf_counter()
    run_job(validate(rows), job)
    pipe_total = time.perf_counter() - start
    written = pd.read_parquet(work / "out" / "metrics")["written_at"].sort_values().to_numpy()
    first_batch = written[batch - 1]
    pipe_steady = (len(written) - batch) / (written[-1] - first_batch)

    config = EditConfig.from_overrides(PIPELINE_EDIT)
    start = time.perf_counter()
    runtime = Runtime()
    runtime.apply(torch.device("cpu"))
    editor = Editor(load_models(read_spec(str(spec_path)), parser_size=64,
                                networks=REQUIRED), config, runtime)
    stamps = []
    for k in range(0, n, batch):
        images = torch.stack([read_image(str(PHOTO), 64) for _ in range(min(batch, n - k))])
        editor.edit(images, [EditRequest(("smiling",), (1.0,))] * len(images))
        stamps.append(time.perf_counter())
    direct_total = time.perf_counter() - start
    direct_steady = (n - batch) / (stamps[-1] - stamps[0])
    print(f"{n} rows, batch {batch}, tiny 64 px models, schedule {PIPELINE_EDIT}: measured "
          "end to end (image reads, writes, identity metric, Ray)")
    print(f"{'':>22} {'images/hour':>12} {'steady images/hour':>19}")
    print(f"{'maskface run (Ray)':>22} {n / pipe_total * 3600:>12.0f} {pipe_steady * 3600:>19.0f}")
    print(f"{'engine directly':>22} {n / direct_total * 3600:>12.0f} {direct_steady * 3600:>19.0f}")
    print(f"ratio (pipeline / direct): whole run {direct_total / pipe_total:.2f}, "
          f"steady state {pipe_steady / direct_steady:.2f}")
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
                                      run_pipeline_bench(args) if args.pipeline else
                                      run_bench(args)))
