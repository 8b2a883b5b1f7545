"""The report's plots (pipeline/results/plots.py): when each is drawn."""
import pandas as pd

from pipeline.results.plots import identity_histogram, steps_vary


def test_steps_vary_only_between_rows_with_the_same_settings():
    same = pd.DataFrame({"attributes": [["smiling"], ["smiling"], ["male"]],
                         "mode": ["local", "local", "global"], "steps": [1501, 1501, 2001]})
    assert not steps_vary(same)                     # local and global differ by design
    stopped = same.assign(steps=[1501, 900, 2001])
    assert steps_vary(stopped)                      # early stopping
    assert not steps_vary(same.iloc[:0])


def test_the_identity_histogram_is_an_embedded_png_or_nothing():
    assert identity_histogram(pd.Series([0.2, 0.4, 0.7])).startswith("data:image/png;base64,")
    assert identity_histogram(pd.Series([], dtype=float)) is None
