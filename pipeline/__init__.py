"""maskface's product code, in rooms; each may import only the rooms below it.

    pipeline.bench     measuring the engine and the job (`maskface bench`)
    pipeline.results   after a job: status, report, plots, export, review. Reads outputs.
    pipeline.runner    the main job on Ray: driver, spec, plan, stage, prefix, progress,
                       access
    pipeline.output    a job's output: layout, metrics, ledger, figures, job.json, images
    pipeline.engine    the editing engine: the editor, schedule, settings, rows,
                       attributes, masks, losses, health, early stopping, runtime.
                       torch only: no storage, PIL, pandas or Ray.
    (models/)          networks and checkpoints, between the engine and the storage
    pipeline.store     storage at the bottom: URIs, the retry policy, capped reads,
                       whole-or-absent writes. The only importer of fsspec and s3fs.
    pipeline.errors    the kinds of failure, shared by all.

Above them: `manifests/` and the command line in `jobs/`. `lint-imports` (pyproject.toml's
contracts, run by `make test`) fails when an import climbs.
"""
