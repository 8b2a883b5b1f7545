"""Benchmarks: measuring the engine and the job for `maskface bench`. Never imported by
the job itself (an actor does not load the benchmark)."""
