"""`maskface status OUTPUT_URI`: how far a job is, from another terminal, while it runs or
after it ended: done, error and pending rows against the manifest (--manifest, else the
one job.json names), the recent and overall rate, an ETA, throughput per node and per
actor, and the latest errors. It reads only the metrics rows, job.json and summary.json
under the output (local path or s3://...); with --watch, each refresh reads only the
metrics files that changed since the last."""
from __future__ import annotations

import json
import signal
import sys
import threading

from jobs.options import add_storage_options, storage_options


def status_command(args) -> int:
    from pipeline.results.status import StatusReader, render
    output, manifest, options = args.output, args.manifest, storage_options(args)
    if args.job:
        from jobs.run import load_job_spec       # the job's modules: only for --job
        spec = load_job_spec(args.job)
        output = output or spec.output
        manifest = manifest or spec.manifest
        options = options or spec.storage_options
    if not output:
        raise ValueError("give an OUTPUT_URI or --job JOB.yaml")
    if args.watch is not None and args.watch <= 0:
        raise ValueError("--watch takes a positive number of seconds")
    if args.window <= 0 or args.errors < 0:
        raise ValueError("--window takes a positive number of minutes, --errors a count >= 0")
    tty = sys.stdout.isatty()
    stop = _stop_on_interrupt() if args.watch else threading.Event()
    reader = StatusReader(output, options, manifest)
    while True:
        status = reader.read(window_s=args.window * 60, errors=args.errors)
        if args.json:
            print(json.dumps(status.as_dict(), default=str), flush=True)
        else:
            if args.watch and tty:
                print("\x1b[2J\x1b[H", end="")          # clear the screen, cursor home
            print(render(status), flush=True)
            if args.watch:
                print(f"\n(refreshing every {args.watch:g} s; Ctrl-C to stop)", flush=True)
        if not args.watch or stop.wait(args.watch):
            return 0


def _stop_on_interrupt() -> threading.Event:
    """An event set by Ctrl-C (or SIGTERM): a watch ends after the read under way, rather
    than by an exception raised inside whatever library is reading; a second Ctrl-C
    raises at once. pyarrow's own interruption handlers stay off: they take the signal
    during a read and hand it back afterwards, which a watch does not need."""
    import pyarrow as pa
    pa.enable_signal_handlers(False)
    stop = threading.Event()

    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def add_parser(commands) -> None:
    p = commands.add_parser("status", help="how far a job is: counts, rate, ETA, per node and "
                                           "actor, latest errors",
                            description=__doc__.split("\n")[0])
    p.add_argument("output", nargs="?", help="the job's output URI (local path, s3://...)")
    p.add_argument("--manifest", metavar="URI",
                   help="the job's manifest: pending rows and an ETA against it (default: the "
                        "manifest job.json names)")
    p.add_argument("--job", metavar="JOB.yaml",
                   help="take the output, manifest and storage_options from a job spec")
    add_storage_options(p)
    p.add_argument("--window", type=float, default=10.0, metavar="MINUTES",
                   help="the recent rate is over this many minutes (default 10)")
    p.add_argument("--errors", type=int, default=5, metavar="N",
                   help="show the N latest errors (default 5)")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--json", action="store_true",
                   help="one JSON object (one per refresh with --watch)")
    p.set_defaults(func=status_command)
