"""`maskface run JOB.yaml`: the main job. Reads a job spec, validates the manifest before
any model loads, runs the edits on Ray (an existing cluster when RAY_ADDRESS or
--address is set, else a local one), prints a summary and writes the HTML report
(OUTPUT/report/index.html; --no-report skips it). Exit code 0: every row ok (or an
empty manifest); 1: a row of this manifest ended in error or is still pending; 2: the
job stopped on a setup error (its message says why; a rerun resumes)."""
from __future__ import annotations

import dataclasses
import sys

from manifests.schema import read_manifest
from pipeline.errors import SetupError, clip_message
from pipeline.runner.spec import JobSpec, JobSpecError, mapping_keys
from pipeline.store.uris import flatten, redact

from .options import parse_set


def load_job_spec(path: str, overrides: list[str] | None = None) -> JobSpec:
    """The job spec at `path`, with `--set key=value` overrides applied (`edit.steps.latent=9`
    and `inputs.allow=[...]` reach inside the mapping keys)."""
    from pipeline.errors import MAX_ECHO
    from pipeline.store.documents import DocumentError, read_yaml
    try:      # a path or any URI (s3://...), bounded: capped, no YAML anchors or aliases
        data = read_yaml(path, what="job spec") or {}
    except DocumentError as e:
        raise JobSpecError(str(e)) from None
    if not isinstance(data, dict):
        raise JobSpecError(f"{redact(path, MAX_ECHO)}: a job spec is a mapping of keys")
    for key, value in parse_set(overrides or []).items():
        top, _, rest = key.partition(".")
        if rest and top in mapping_keys():
            inside = flatten(data.get(top) or {}) if top == "edit" else dict(data.get(top) or {})
            data[top] = {**inside, rest: value}
        else:
            data[key] = value
    return JobSpec.from_dict(data, where=redact(path))


def run_command(args) -> int:
    from pipeline.runner.driver import hold_output
    job = load_job_spec(args.spec, args.set)
    if args.retry_errors:
        job = dataclasses.replace(job, retry_errors=True)
    takeover = getattr(args, "takeover", False)
    if takeover:
        print("warning: --takeover: any run still writing this output stops at its next "
              "heartbeat", file=sys.stderr)
    try:
        # one run per output: held before anything under it is read or written
        lease = hold_output(job, takeover=takeover,
                            command=f"maskface run {redact(args.spec)}")
    except SetupError as e:
        print(clip_message(f"error: {e}"), file=sys.stderr)
        return 2
    with lease:
        try:
            summary = _run_held(job, args, lease)
        except SetupError as e:
            print(clip_message(f"error: the job stopped: {e}"), file=sys.stderr)
            return 2
    if summary is None:
        return 0
    mine = summary["manifest"]
    if not getattr(args, "no_report", False):
        _write_report(job)
    return 1 if mine["error"] or mine["pending"] else 0


def _run_held(job: JobSpec, args, lease) -> dict | None:
    """The job under its output's lease: the manifest validated (the complete rows, a
    resume's, by their ids only) before any model loads or Ray starts; the summary
    printed. None when the manifest is empty."""
    from pipeline.output.layout import Output
    from pipeline.output.ledger import complete_ids
    from pipeline.runner.driver import compact_and_read_history, run_job
    try:
        history = compact_and_read_history(Output(job.output, job.storage_options))
    except OSError as e:                   # fsspec's errors, s3fs's included
        raise SetupError(f"the output {redact(job.output)} cannot be read ({type(e).__name__}: "
                         f"{redact(str(e))}); nothing was run") from None
    manifest = read_manifest(job.manifest, job.storage_options,
                             complete=complete_ids(history, job.retry_errors))
    if not manifest.ids:
        print(f"manifest {job.manifest} has no rows: nothing to do (nothing written to "
              f"{job.output})")
        return None
    done = len(manifest.ids) - len(manifest.rows)
    print(f"manifest: {len(manifest.ids)} rows ({done} complete already, {len(manifest.rows)} "
          f"to edit: valid); output: {job.output}")
    summary = run_job(manifest.rows, job, manifest.schema, address=args.address,
                      manifest_ids=manifest.ids, history=history, lease=lease)
    _print_summary(summary, job)
    return summary


def _print_summary(summary: dict, job: JobSpec) -> None:
    run, mine, whole = summary["this_run"], summary["manifest"], summary["whole_output"]
    print(f"this run: {run['ok']} ok, {run['error']} error, {run['skipped_already_done']} "
          f"already done; {run['images_per_hour']} images/hour")
    print(f"this manifest: {mine['ok']} ok, {mine['error']} error, {mine['pending']} pending "
          f"of {mine['rows']} rows")
    if (whole["ok"], whole["error"]) != (mine["ok"], mine["error"]):
        print(f"whole output (other manifests too): {whole['ok']} ok, {whole['error']} error")
    for attr, s in sorted(summary["per_attribute"].items()):
        print(f"  {attr}: on target {s['on_target']}/{s['rows']}, flipped {s['flipped']}")
    for a in summary.get("per_actor", []):
        if a["engine_busy"] is not None:
            print(f"  actor {a['actor'][:12]} on {a['node']}: engine busy "
                  f"{100 * a['engine_busy']:.0f}% of {sum(a['seconds'].values()):.1f} s")
    for e in summary["errors"]:
        print(f"  error {e['id']}: {e['error']}", file=sys.stderr)
    print(f"results: {job.output} (metrics/, images/, latents/, masks/, summary.json)")


def _write_report(job: JobSpec) -> None:
    """The job's report; a report that fails is said, and leaves the job's result alone."""
    from pipeline.results.report import write_report
    try:
        print(f"report: {write_report(job.output, storage_options=job.storage_options)}")
    except Exception as e:
        print(f"report failed ({type(e).__name__}: {e}); retry with: maskface report "
              f"{job.output}", file=sys.stderr)


def add_parser(commands) -> None:
    p = commands.add_parser("run", help="run a job spec on Ray (local or a cluster)",
                            description=__doc__.split("\n")[0])
    p.add_argument("spec", help="job spec YAML (see jobs/*.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec key; edit.<setting>=V for edit settings")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--retry-errors", action="store_true",
                   help="recompute rows that ended in error and replace their metrics rows")
    p.add_argument("--takeover", action="store_true",
                   help="take the output's lease from the run that holds it, even though its "
                        "heartbeat moves (that run stops when its batch in hand comes back); "
                        "without it, a run whose holder died takes over once the lease expires")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the HTML report (OUTPUT/report/index.html) at the end")
    p.set_defaults(func=run_command)

