"""The main job: validated manifest rows in, edited files and metrics out, on Ray.

    driver.py     run_job: resume, the Ray Data pipeline, resumes after lost nodes, summary
    spec.py       JobSpec: the job spec's keys, each with its default, help and check
    plan.py       what the driver decides once: each edit's settings, networks, batches
    stage.py      EditStage: the model-holding actor, one per GPU; the failure streak
    prefix.py     the shared inversion prefix, cached per image
    outputs.py    the output layout and atomic writes
    metrics.py    the metrics rows: schema, writes, column reads, compaction
    ledger.py     what the metrics rows say: complete, pending, counts, on target, summary
    storage.py    fsspec with the S3 retry policy; storage failures as row errors
    access.py     what a job may read (`inputs.allow`) and the image limits
    images.py     image files in and out: formats, limits, conversions, paste-back
    identity.py   the face-identity metric (dlib descriptors), input against result
    progress.py   the figures of progress, and the driver's bar and log lines

May import: `pipeline.engine`, `pipeline.errors`, `models`, and fsspec, PIL, pandas,
pyarrow, Ray. Never `pipeline.results`, `manifests` or `jobs`; never the engine's bench
(an actor does not load the benchmark).
"""
