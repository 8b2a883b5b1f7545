"""A job's output, as a room of its own: what is written under an output URI, and how it
is read back. The job writes it (pipeline/runner/); status, report, export and review
read it (pipeline/results/); neither reaches into the other.

    layout.py     Output: the file layout (ROW_FILES), whole-or-absent writes, row files
                  recorded relative to the output and located wherever it is now
    metrics.py    the metrics rows: schema, one file per batch, the one reader,
                  compaction
    ledger.py     what the metrics rows say: complete, pending, counts, on target, summary
    figures.py    the figures of progress: rates, ETA, and how each is written
    jobfile.py    job.json: what a run records of its spec and its edits' settings
    lease.py      one run per output: the lease a run holds, its heartbeat, takeover
    images.py     image files in and out: formats, limits, conversions, paste-back

May import: `pipeline.engine` (the on-target rule, the resize rule), `pipeline.store`,
`pipeline.errors`, `models`, and PIL, pandas, pyarrow. Never Ray, the runner or results.
"""
