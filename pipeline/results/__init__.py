"""After (or during) a job: what its output says, for people and for training loops.

    status.py   `maskface status`: counts, rates, ETA, per node and actor, latest errors
    report.py   `maskface report`: the HTML report
    plots.py    the report's plots (matplotlib, embedded)
    export.py   `maskface export`: the output as a `datasets` Parquet or an ImageFolder
    review.py   a reviewer's verdicts, saved by the report's review pass, read back

Reads only what a job leaves under its output (job.json, summary.json, metrics/ and the
files the metrics rows name), through the output room (pipeline/output/) and the storage
layer (pipeline/store/). May import those, `pipeline.engine`, `pipeline.errors` and
`models`; never the runner (`pipeline.runner`), `manifests` or `jobs`.
"""
