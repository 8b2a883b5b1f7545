"""`maskface run JOB.yaml`: the main job. Reads a job spec, validates the manifest before
any model loads, runs the edits on Ray (an existing cluster when RAY_ADDRESS or
--address is set, else a local one), prints a summary and writes the HTML report
(OUTPUT/report/index.html; --no-report skips it). Exit code 0: every row ok (or an
empty manifest); 1: a row of this manifest ended in error or is still pending; 2: the
job stopped on a setup error (its message says why; a rerun resumes)."""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import yaml

from manifests.schema import read_manifest
from pipeline.access import InputPolicy
from pipeline.config import ConfigError, EditConfig, flatten, parse_set
from pipeline.errors import SetupError
from pipeline.job import JobSettings
from pipeline.runtime import Runtime
from pipeline.storage import CREDENTIAL_KEYS



class JobSpecError(ValueError):
    pass


def load_job_spec(path: str, overrides: list[str] | None = None) -> JobSettings:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise JobSpecError(f"job spec not found: {path}") from None
    if not isinstance(data, dict):
        raise JobSpecError(f"{path}: a job spec is a mapping of keys")
    for key, value in parse_set(overrides or []).items():
        top, _, rest = key.partition(".")
        if top == "edit" and rest:
            data.setdefault("edit", {})
            data["edit"] = {**flatten(data["edit"] or {}), rest: value}
        elif top in ("storage_options", "inputs", "runtime") and rest:
            data[top] = {**(data.get(top) or {}), rest: value}
        else:
            data[key] = value
    known = {f.name for f in fields(JobSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise JobSpecError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in ("manifest", "output", "models") if not data.get(k)]
    if missing:
        raise JobSpecError(f"{path}: missing {', '.join(missing)}")
    storage = data.get("storage_options") or {}
    leaked = sorted(k for k in flatten(storage) if k.rsplit(".", 1)[-1].lower() in CREDENTIAL_KEYS)
    if leaked:
        raise JobSpecError(f"{path}: storage_options must not hold credentials ({leaked}); "
                           "use the standard AWS chain or environment variables")
    edit = flatten(data.get("edit") or {})
    try:
        EditConfig.from_overrides(edit)
    except ConfigError as e:
        raise JobSpecError(f"{path}: edit: {e}") from None
    data["edit"] = edit
    for key in ("batch_size", "cpu_threads"):
        if key in data and (not isinstance(data[key], int) or data[key] < 1):
            raise JobSpecError(f"{path}: {key} must be a positive integer, got {data[key]!r}")
    stop = data.get("stop_after_failed_batches", 3)
    if not isinstance(stop, int) or isinstance(stop, bool) or stop < 0:
        raise JobSpecError(f"{path}: stop_after_failed_batches must be an integer >= 0 "
                           f"(0: never stop), got {stop!r}")
    try:
        InputPolicy.from_spec(data.get("inputs"))
    except ValueError as e:
        raise JobSpecError(f"{path}: {e}") from None
    data["inputs"] = dict(data.get("inputs") or {})
    data["runtime"] = dict(data.get("runtime") or {})
    try:
        Runtime(**data["runtime"])
    except (TypeError, ValueError) as e:
        raise JobSpecError(f"{path}: runtime: {e}; keys: "
                           f"{', '.join(f.name for f in fields(Runtime))}") from None
    for key in ("auto_batch", "share_prefix"):
        if not isinstance(data.get(key, True), bool):
            raise JobSpecError(f"{path}: {key} must be true or false, got {data[key]!r}")
    if data.get("actors") is not None and (not isinstance(data["actors"], int) or data["actors"] < 1):
        raise JobSpecError(f"{path}: actors must be a positive integer, got {data['actors']!r}")
    return JobSettings(**data)


def run_command(args) -> int:
    from pipeline.job import run_job
    settings = load_job_spec(args.spec, args.set)
    if args.retry_errors:
        settings.retry_errors = True
    # the manifest is validated before any model loads or Ray starts
    manifest = read_manifest(settings.manifest, settings.storage_options)
    if not len(manifest.rows):
        print(f"manifest {settings.manifest} has no rows: nothing to do (nothing written to "
              f"{settings.output})")
        return 0
    print(f"manifest: {len(manifest.rows)} rows valid; output: {settings.output}")
    try:
        summary = run_job(manifest.rows, settings, manifest.schema, address=args.address)
    except SetupError as e:
        print(f"error: the job stopped: {e}", file=sys.stderr)
        return 2
    run, mine, whole = summary["this_run"], summary["manifest"], summary["whole_output"]
    print(f"this run: {run['ok']} ok, {run['error']} error, {run['skipped_already_done']} "
          f"already done; {run['images_per_hour']} images/hour")
    print(f"this manifest: {mine['ok']} ok, {mine['error']} error, {mine['pending']} pending "
          f"of {mine['rows']} rows")
    if (whole["ok"], whole["error"]) != (mine["ok"], mine["error"]):
        print(f"whole output (other manifests too): {whole['ok']} ok, {whole['error']} error")
    for attr, s in sorted(summary["per_attribute"].items()):
        print(f"  {attr}: on target {s['on_target']}/{s['rows']}, flipped {s['flipped']}")
    for e in summary["errors"]:
        print(f"  error {e['id']}: {e['error']}", file=sys.stderr)
    print(f"results: {settings.output} (metrics/, images/, latents/, masks/, summary.json)")
    if not getattr(args, "no_report", False):
        _write_report(settings)
    return 1 if mine["error"] or mine["pending"] else 0


def _write_report(settings: JobSettings) -> None:
    """The job's report; a report that fails is said, and leaves the job's result alone."""
    from pipeline.report import write_report
    try:
        print(f"report: {write_report(settings.output, storage_options=settings.storage_options)}")
    except Exception as e:
        print(f"report failed ({type(e).__name__}: {e}); retry with: maskface report "
              f"{settings.output}", file=sys.stderr)


def add_parser(commands) -> None:
    p = commands.add_parser("run", help="run a job spec on Ray (local or a cluster)",
                            description=__doc__.split("\n")[0])
    p.add_argument("spec", help="job spec YAML (see jobs/*.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec key; edit.<setting>=V for edit settings")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--retry-errors", action="store_true",
                   help="recompute rows that ended in error and replace their metrics rows")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the HTML report (OUTPUT/report/index.html) at the end")
    p.set_defaults(func=run_command)

