"""The `maskface bench` document: what `engine.py` measures, assembled for one preset, mode
and runtime (and the plain path beside it with a baseline), at each batch size asked.

Whole edits are extrapolated from timed steps of each kind (no image I/O, no identity
metric, no Ray): `extrapolated_seconds_per_edit`. The warm-up is measured whole: from
process start, the batch probe included, to a first short edit through every kind of
step, less what that edit costs warm.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.loaders import Models
from pipeline.engine.batch_size import auto_batch_size
from pipeline.engine.runtime import AUTOCAST, Runtime, fp32_precision

from .engine import (PRESETS, bench_models, bench_schedule, deviation, early_stop_steps,
                     peak_memory, peak_rates, phase_times, step_kinds, time_kind, warm_up)
from .payback import payback_edits

AUTO_BATCH_CAP = 64         # --batch auto: the most a GPU probe tries
IMPORTED = time.perf_counter()


@dataclass(frozen=True)
class BenchPlan:
    """What one `maskface bench` run measures."""
    preset: str                         # a key of PRESETS
    mode: str                           # local or global
    device: torch.device
    batches: list[int | None]           # sizes; None: probed (GPU), as a job's actor does
    runtime: Runtime                    # the default path's
    steps: int = 3                      # timed steps per measurement
    baseline: bool = False              # also the plain path, and how far ours is from it
    early_stop: dict | None = None      # whole edits with early stopping on, these
    #                                     settings over the preset's (None: not run)


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: /proc; elsewhere since this module
    was imported)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")    # starttime, in ticks
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED


def measure(models: Models, runtime: Runtime, mode: str, batch: int, steps: int,
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


def bench_document(plan: BenchPlan) -> dict:
    """Every measurement of one bench run, as the JSON document `maskface bench` writes."""
    runtime, device = plan.runtime, plan.device
    # the plain path first: runtimes differ in process-wide state (reuse_memory), and the
    # first run of a process is the one that meets glibc's own settings
    runtimes = {**({"baseline": Runtime.plain()} if plan.baseline else {}), "default": runtime}
    models = bench_models(plan.preset, plan.mode, str(device))
    overrides = {"parser_size": PRESETS[plan.preset][1]}
    started_s = seconds_since_process_start()        # imports and the networks built
    batches, probe_s = _batch_sizes(plan, models, overrides)
    warm = {label: warm_up(models, rt, plan.mode, batches[0], overrides)
            for label, rt in runtimes.items()}
    runtime.apply(device)
    dtype = AUTOCAST.get(runtime.autocast or "", torch.float32)
    peaks = [peak_rates(device, dtype)]
    report = _header(plan, models)
    for batch in batches:               # interleaved, so a drifting machine hits both alike
        for label, rt in runtimes.items():
            report["runs"].setdefault(label, []).append(
                measure(models, rt, plan.mode, batch, plan.steps, overrides))
            peaks.append(peak_rates(device, dtype))
    _add_mfu(report, peaks)
    report["warm_up"] = warm_up_report(warm, started_s, probe_s, batches[0])
    report["peak_memory_bytes"] = peak_memory(device)
    _add_comparisons(report, plan, models, warm, batches[0], overrides)
    return report


def _batch_sizes(plan: BenchPlan, models: Models, overrides: dict) -> tuple[list[int], float]:
    """The batch sizes to measure, a probed one in place of None, and the probe's seconds."""
    if None not in plan.batches:
        return [size for size in plan.batches if size is not None], 0.0
    plan.runtime.apply(plan.device)
    began = time.perf_counter()
    probed = auto_batch_size(models, plan.runtime, plan.mode, AUTO_BATCH_CAP,
                             overrides["parser_size"])
    probe_s = time.perf_counter() - began
    return [size or probed for size in plan.batches], probe_s


def _header(plan: BenchPlan, models: Models) -> dict:
    """The document's environment, preset and runtime, its runs still to measure."""
    device, runtime = plan.device, plan.runtime
    return {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device), "autocast": runtime.autocast,
                    "fp32_precision": fp32_precision() if device.type == "cuda" else
                    {"matmul": "ieee", "conv": "ieee"},
                    "flops_method": "torch.utils.flop_counter.FlopCounterMode: matmuls and "
                                    "convolutions, forward and backward"},
            "preset": plan.preset, "mode": plan.mode,
            "runtime": {**vars(runtime), "compiled": runtime.compiles(models)}, "runs": {}}


def _add_mfu(report: dict, peaks: list[dict[str, float]]) -> None:
    """The peak (the highest rate sampled) and each run's share of it."""
    report["env"]["peak_flops_per_s"] = peak = max(max(p.values()) for p in peaks)
    report["env"]["peak_samples"] = peaks      # their spread: how noisy the machine was
    for runs in report["runs"].values():
        for r in runs:
            r["mfu"] = r["achieved_flops_per_s"] / peak


def _add_comparisons(report: dict, plan: BenchPlan, models: Models, warm: dict, batch: int,
                     overrides: dict) -> None:
    """Against the plain path (with a baseline), the shared prefix's saving (local mode)
    and whole edits with early stopping (when asked)."""
    if plan.baseline:
        report["deviation_from_baseline"] = deviation(models, plan.runtime, plan.mode, overrides)
        report["warm_up"]["payback_over_baseline_edits"] = payback_edits(
            report["runs"]["baseline"][0], warm["baseline"]["first_use_s"],
            report["runs"]["default"][0], warm["default"]["first_use_s"])
    if plan.mode == "local":
        report["prefix_saving_14_attributes"] = prefix_saving(report["runs"]["default"][0])
    if plan.early_stop is not None:
        report["early_stop"] = early_stop_steps(models, plan.runtime, plan.mode, batch,
                                                {**overrides, **plan.early_stop})
