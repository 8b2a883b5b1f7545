"""`maskface report OUTPUT_URI [--dest URI]`: the job's results as a page a person reads
at a glance: index.html and thumbnails in one folder that opens from disk with no
server (default: OUTPUT_URI/report). Works on local and S3 outputs, while the job runs
or after it ended. `maskface run` writes it at the end unless --no-report. Its grid has
a review pass: a verdict per edit, saved to a file that --reviewed reads back."""
from __future__ import annotations

from jobs.options import add_storage_options, storage_options


def report_command(args) -> int:
    from pipeline.results.report import write_report
    if args.grid < 1:
        raise ValueError("--grid takes a positive number of edits")
    index = write_report(args.output, args.dest, storage_options(args), grid=args.grid,
                         reviewed=args.reviewed)
    print(f"report: {index}")
    return 0


def add_parser(commands) -> None:
    from pipeline.results.report import GRID
    p = commands.add_parser("report", help="an HTML report of a job's output (counts, "
                                           "per-attribute table, before/after grid, failures)",
                            description=__doc__.split("\n")[0])
    p.add_argument("output", help="the job's output URI (local path, s3://...)")
    p.add_argument("--dest", metavar="URI", help="where to write the report folder "
                                                 "(default: OUTPUT_URI/report)")
    p.add_argument("--grid", type=int, default=GRID, metavar="N",
                   help=f"edits in the before/after grid at most; a random sample beyond "
                        f"(default {GRID})")
    p.add_argument("--reviewed", metavar="FILE",
                   help="a verdicts file the review pass saved (or a CSV id,verdict): the "
                        "reviewer's acceptance rate beside the classifier's and the judge's; "
                        "the page's review pass starts from its verdicts")
    add_storage_options(p)
    p.set_defaults(func=report_command)
