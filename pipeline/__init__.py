"""maskface's product code, in three rooms; each may import only the rooms below it.

    pipeline.results   after a job: status, report, plots, export.  Reads outputs only.
    pipeline.job       the main job on Ray: plan, stage, outputs, storage, access,
                       image files, identity, the driver's progress.
    pipeline.engine    the editing engine: the editor, schedule, settings, rows,
                       attributes, masks, losses, health, early stopping, runtime.
                       torch only: no fsspec, PIL, pandas or Ray.
    pipeline.errors    the kinds of failure, shared by all three.

Below them lies `models/` (networks, checkpoints); above them `manifests/` and the
command line in `jobs/`. `lint-imports` (pyproject.toml's contracts, run by `make test`)
fails when an import climbs.
"""
