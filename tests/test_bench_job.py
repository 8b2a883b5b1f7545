"""`maskface bench --pipeline`'s measurement (pipeline/bench/job.py): the same rows through
the real job on a local Ray and through the engine directly, with tiny models."""
import pytest

from jobs.demo import PHOTO
from pipeline.bench.job import job_bench


def test_the_pipeline_bench_runs_the_rows_both_ways_and_times_each():
    import ray
    if ray.is_initialized():
        pytest.skip("needs its own local Ray (another module's is running)")
    try:
        result = job_bench(5, 2, PHOTO)      # raises unless the job edited every row
    finally:
        ray.shutdown()
    assert (result.rows, result.batch) == (5, 2)
    for way in (result.job, result.direct):
        assert way.seconds > 0 and way.steady_per_s > 0      # every row ran, both ways
