"""`maskface export OUTPUT_URI --format hf-parquet|imagefolder --dest URI`: the edited set
as a dataset a training loop loads directly: Parquet with an image column that Hugging
Face `datasets` decodes, or an ImageFolder with metadata.jsonl. It streams (memory: one
shard of rows and their images), shows a bar over the rows and says its rate. Rows carry the
passthrough labels, `labels_after` (the labels with each edited attribute at its
target; see pipeline/results/export.py for the rule) and the metrics."""
from __future__ import annotations

import sys
import time

from jobs.options import add_storage_options, storage_options


def export_command(args) -> int:
    from tqdm import tqdm

    from pipeline.results.export import export_output
    from pipeline.results.review import read_verdicts
    verdicts = read_verdicts(args.reviewed, storage_options(args)) if args.reviewed else None
    began = time.time()
    with tqdm(unit="row", desc="export", file=sys.stderr, dynamic_ncols=True) as bar:
        result = export_output(args.output, args.format, args.dest, args.only_successful,
                               storage_options(args), progress=bar.update, reviewed=verdicts)
    seconds = time.time() - began
    for rid, why in result.missing:
        print(f"  left out {rid}: {why}", file=sys.stderr)
    if verdicts is not None:
        said = {"reject": "rejected", "unsure": "unsure", "not reviewed": "not reviewed"}
        why = ", ".join(f"{n} {said[verdict]}"
                        for verdict, n in sorted(result.not_accepted.items())) or "none"
        print(f"--reviewed: {result.selected} accepted row(s) kept; left out: {why}",
              file=sys.stderr)
    print(f"exported {result.rows} rows as {args.format} to {result.dest} in {seconds:.0f} s "
          f"({result.rows / max(seconds, 1e-9):.0f} rows/s)"
          + (f" ({len(result.missing)} left out, see above)" if result.missing else ""))
    if args.format == "hf-parquet":
        print(f'load: datasets.load_dataset("parquet", data_files="{result.dest}/data/*.parquet")')
    else:
        print(f'load: datasets.load_dataset("imagefolder", data_dir="{result.dest}")')
    return 1 if result.missing else 0


def add_parser(commands) -> None:
    from pipeline.results.export import FORMATS
    p = commands.add_parser("export", help="export the edited images, labels and metrics as a "
                                           "training-ready dataset",
                            description=__doc__.split("\n")[0])
    p.add_argument("output", help="the job's output URI (local path, s3://...)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf-parquet: Parquet with a `datasets` Image column; imagefolder: "
                        "images + metadata.jsonl under train/")
    p.add_argument("--dest", required=True, metavar="URI", help="where to write the dataset")
    p.add_argument("--only-successful", action="store_true",
                   help="only rows that finished and reached every target (default: every "
                        "row; failed rows have a null image in hf-parquet)")
    p.add_argument("--reviewed", metavar="FILE",
                   help="a verdicts file the report's review pass saved (or a CSV id,verdict): "
                        "only the rows a reviewer accepted")
    add_storage_options(p)
    p.set_defaults(func=export_command)
