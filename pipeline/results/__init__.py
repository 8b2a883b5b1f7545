"""After (or during) a job: what its output says, for people and for training loops.

    status.py       `maskface status`: counts, rates, ETA, per node and actor, latest errors
    report.py       `maskface report`: reads an output, writes thumbnails, renders the page
    report_data.py  the report's figures as plain data (every aggregate; no markup)
    templates/      the page as package data: report.html.j2 and its partials (Jinja2,
                    every value escaped), report.css and report.js (inlined at render)
    plots.py        the report's plots (matplotlib, embedded as data URIs)
    export.py       `maskface export`: the output as a `datasets` Parquet or an ImageFolder
    review.py       a reviewer's verdicts, saved by the report's review pass, read back

Reads only what a job leaves under its output (job.json, summary.json, metrics/ and the
files the metrics rows name), through the output room (pipeline/output/) and the storage
layer (pipeline/store/). May import those, `pipeline.engine`, `pipeline.errors` and
`models`; never the runner (`pipeline.runner`), `manifests` or `jobs`.
"""
