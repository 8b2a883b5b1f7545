"""The main job on Ray, and only the job: validated manifest rows in, edits out.

    driver.py     run_job: resume, the Ray Data pipeline, resumes after lost nodes, summary
    spec.py       JobSpec: the job spec's keys, each parsed once into its typed value
    plan.py       what the driver decides once: each edit's settings, networks, batches
    stage.py      EditStage: the model-holding actor, one per GPU; the failure streak
    prefix.py     the shared inversion prefix, cached per image
    access.py     what a job may read (`inputs.allow`), beside the image limits
    progress.py   the driver's progress bar and log lines

What it writes, and how that is read back, is the output room's (pipeline/output/).
May import: `pipeline.output`, `pipeline.engine`, `pipeline.store`, `pipeline.errors`,
`models`, and PIL, pandas, pyarrow, Ray. Never `pipeline.results`, `manifests` or
`jobs`; never the benchmarks (an actor does not load them).
"""
