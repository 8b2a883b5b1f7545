"""Benchmarks: measuring the engine and the job for `maskface bench`. Never imported by
the job itself (an actor does not load the benchmark).

    engine.py       the engine measured: random-weight networks of the real shapes, time
                    per phase and per kind of step, FLOPs, peak rates, warm-up, deviation
                    from the plain path, early stopping
    document.py     the `maskface bench` document: those measurements assembled for one
                    preset, mode and runtime at each batch size (BenchPlan in, a dict out)
    payback.py      after how many edits a faster path's longer warm-up is bought back
                    (within one document, or between two: `--payback`)
    job.py          the job measured: images per hour through `run_job` against the engine
                    called directly (`--pipeline`)

May import (the layers contract in pyproject.toml, held by `lint-imports`): what sits
below it: `pipeline.runner`, `pipeline.results`, `manifests`, `pipeline.output`,
`pipeline.engine`, `models` (tiny models included), `pipeline.store`, `pipeline.errors`,
and third-party packages. Never `jobs`, which sits above it and prints what it returns;
and `pipeline.runner` never imports it back.
"""
